"""hl.SharpnessMonitor: each record's numbers against dense float64 references, the edge of
stability on full-batch gradient descent, the products a record costs, and training left
bit-identical."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hesslens as hl
from hesslens.errors import HesslensInputError
from tests.reference import dense_hessian

MSE = nn.MSELoss()


def _net(seed=0, width=8, dropout=False, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers += [nn.Linear(width, 6), nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)


def _dense(model, x, y):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    H = dense_hessian(model, MSE, [(x, y)], names)
    params = [p for _, p in model.named_parameters()]
    copy = [p.detach().double().requires_grad_() for p in params]
    out = torch.func.functional_call(
        model.double(), dict(zip(names, copy)), (x.double(),))
    model.float() if params[0].dtype == torch.float32 else None
    grad = torch.autograd.grad(MSE(out, y.double()), copy)
    return H, torch.cat([g.flatten() for g in grad])


def test_directional_sharpness_gradient_share_and_overlap_against_dense():
    model = _net(0).double()
    x, y = _data()
    x, y = x.double(), y.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    mon = hl.SharpnessMonitor(model, MSE, (x, y), opt, every=3, k=2, tol=1e-10)
    checked = 0
    previous = None
    for step in range(7):
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt.zero_grad()
        MSE(model(x), y).backward()
        opt.step()
        rec = mon.update(step)
        if rec is None:
            continue
        H, g = _dense(model, x, y)
        evals, evecs = torch.linalg.eigh(H)
        V = evecs[:, -2:].flip(1).T  # top-2 eigenvectors as rows
        assert rec["eigenvalues"] == pytest.approx(evals[-2:].flip(0).tolist(), rel=1e-8)
        u = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        assert rec["directional_sharpness"] == pytest.approx(float(u @ H @ u / (u @ u)),
                                                             rel=1e-8)
        share = float(((V @ g) ** 2).sum() / (g @ g))
        assert rec["gradient_share"] == pytest.approx(share, rel=1e-6, abs=1e-12)
        assert rec["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
        assert rec["threshold"] == pytest.approx(2 * 1.9 / 0.2)
        assert rec["ratio"] == pytest.approx(rec["sharpness"] / rec["threshold"])
        if previous is None:
            assert rec["overlap"] is None
        else:
            assert rec["overlap"] == pytest.approx(abs(float(V[0] @ previous)), rel=1e-6)
        previous = V[0]
        checked += 1
    assert checked == 3
    assert [r["step"] for r in mon.history] == [0, 3, 6]


def _adam_reference(model, opt, x, y, shift=0.0):
    """Dense P^(-1/2) (H + shift I) P^(-1/2) from the optimizer's state (Cohen et al. 2022),
    with each group's learning rate relative to the largest folded into P."""
    H, _ = _dense(model, x, y)
    lr_ref = max(g["lr"] for g in opt.param_groups)
    d = []
    for p in model.parameters():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        (b1, b2), eps, st = group["betas"], group["eps"], opt.state[p]
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
        P = (1 - b1**t) * ((v.double() / (1 - b2**t)).sqrt() + eps) * lr_ref / group["lr"]
        d.append(P.flatten())
    d = torch.cat(d)
    S = torch.diag(torch.full_like(d, shift))
    return (H + S) / d.sqrt()[:, None] / d.sqrt()[None, :]


@pytest.mark.parametrize("make_opt, shift", [
    (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), 0.0),
    (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True), 0.1),
    (lambda m: torch.optim.AdamW([{"params": m[0].parameters(), "lr": 2e-2},
                                  {"params": list(m[2:].parameters()), "lr": 5e-3}],
                                 weight_decay=0.05), 0.0),
])
def test_adam_preconditioned_sharpness_against_dense(make_opt, shift):
    model = _net(1).double()
    x, y = (t.double() for t in _data(seed=1))
    opt = make_opt(model)
    mon = hl.SharpnessMonitor(model, MSE, (x, y), opt, every=2, tol=1e-10)
    for step in range(5):
        opt.zero_grad()
        MSE(model(x), y).backward()
        opt.step()
        rec = mon.update(step)
        if rec is None:
            continue
        M = _adam_reference(model, opt, x, y, shift)
        ref = float(torch.linalg.eigvalsh(M)[-1])
        assert rec["compared"] == "preconditioned_sharpness"
        assert rec["preconditioned_sharpness"] == pytest.approx(ref, rel=1e-8)
        lr = max(g["lr"] for g in opt.param_groups)
        assert rec["threshold"] == pytest.approx(38 / lr, rel=1e-12)
        assert rec["ratio"] == pytest.approx(ref / (38 / lr), rel=1e-8)
        # every product is counted: the top eigenvalue's, the one along the update and the
        # preconditioned matrix's (which its own operator counts)
        assert rec["n_hvp_preconditioned"] >= 2
        assert rec["n_hvp"] == (rec["n_hvp_sharpness"] + rec["n_hvp_preconditioned"]
                                + (rec["directional_sharpness"] is not None))
    assert len(mon.history) == 3


def _mnist1d_mse(n_per_class, width, seed=0):
    import hesslens.zoo as zoo

    ds = zoo.load_dataset("mnist1d")
    x, y = zoo.analysis_subset(*ds.train, per_class=n_per_class, seed=0)
    x = x.reshape(len(x), -1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], width), nn.Tanh(), nn.Linear(width, width),
                          nn.Tanh(), nn.Linear(width, 10))
    return model, x, nn.functional.one_hot(y, 10).float()


def _half_sse(out, target):
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def test_full_batch_gradient_descent_reaches_and_hovers_at_2_over_lr():
    # Cohen et al. 2021 on an MNIST-1D subset: a tanh MLP, square loss, full-batch GD: the
    # sharpness rises until it reaches 2 / lr and then stays near it.
    lr = 0.3
    model, x, Y = _mnist1d_mse(10, 32)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = hl.SharpnessMonitor(model, _half_sse, (x, Y), opt, every=5)
    for step in range(600):
        opt.zero_grad()
        _half_sse(model(x), Y).backward()
        opt.step()
        mon.update(step)
    ratio = np.array([r["ratio"] for r in mon.history])
    assert ratio[0] < 0.6  # progressive sharpening first
    crossed = int(np.argmax(ratio >= 1.0))
    assert ratio[crossed] >= 1.0 and 20 <= crossed < len(ratio) - 40
    after = ratio[crossed:]
    assert 0.97 <= float(np.median(after)) <= 1.15
    lo, hi = np.quantile(after, [0.05, 0.95])
    assert lo >= 0.85 and hi <= 1.3
    # a record at the final weights (warm-started at the edge) is the dense Hessian's top
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, _half_sse, [(x, Y)], names)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert mon.record(600)["sharpness"] == pytest.approx(top, rel=2e-3)
    # along the update, the curvature sits at the edge too
    directional = np.array([r["directional_sharpness"] for r in mon.history[crossed + 10:-1]])
    assert 0.8 <= float(np.median(directional)) * lr / 2 <= 1.1


def test_warm_start_keeps_a_record_to_a_few_products_on_a_smooth_run():
    medians = {}
    for warm in (True, False):
        model, x, Y = _mnist1d_mse(10, 32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = hl.SharpnessMonitor(model, _half_sse, (x, Y), opt, every=5, warm_start=warm)
        for step in range(200):
            opt.zero_grad()
            _half_sse(model(x), Y).backward()
            opt.step()
            mon.update(step)
        assert all(r["converged"] for r in mon.history)
        medians[warm] = float(np.median([r["n_hvp"] for r in mon.history]))  # with u'Hu
    assert medians[True] <= 5
    assert medians[False] >= medians[True] + 3


def _loop(model, opt, data, monitor_factory=None, steps=6):
    x, y = data
    mon = monitor_factory(model, opt) if monitor_factory else None
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad()
        MSE(model(x[idx]), y[idx]).backward()
        opt.step()
        torch.rand(1)  # the global random state goes on being used by the loop
        if mon is not None:
            mon.update(step)
    return model, mon


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_records_leave_training_bit_identical(tmp_path, opt_cls):
    data = _data(64, seed=2)

    def run(with_monitor):
        torch.manual_seed(5)
        model = _net(3, dropout=True, bn=True).train()
        opt = opt_cls(model.parameters(), lr=0.05)
        factory = (lambda m, o: hl.SharpnessMonitor(m, MSE, (data[0][:32], data[1][:32]), o,
                                                    every=2, k=2, out=tmp_path / "m")
                   ) if with_monitor else None
        model, mon = _loop(model, opt, data, factory)
        return model, mon, torch.rand(3)

    plain, _, plain_rng = run(False)
    watched, mon, watched_rng = run(True)
    assert len(mon.history) == 3 and watched.training and watched[2].training
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    assert torch.equal(plain_rng, watched_rng)
    saved = json.loads((tmp_path / "m" / "sharpness.json").read_text())
    assert [r["step"] for r in saved["records"]] == [0, 2, 4]


def test_a_monitor_on_an_existing_folder_continues_its_history(tmp_path):
    model = _net(4)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = hl.SharpnessMonitor(model, MSE, (x, y), opt, out=tmp_path)
    for step in range(3):
        first.record(step)
    first.close()
    again = hl.SharpnessMonitor(model, MSE, (x, y), opt, out=tmp_path)
    assert [r["step"] for r in again.history] == [0, 1, 2]
    again.record(1)  # a resumed run measures step 1 again: the later records go
    assert [r["step"] for r in again.history] == [0, 1]
    page = again.write_report(tmp_path / "report")
    assert page.name == "report.html"
    assert {p.name for p in page.parent.iterdir()} >= {
        "sharpness.json", "sharpness.csv", "sharpness.png", "gradient_share.png"}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sharpness.json").write_text("{}")
    with pytest.raises(HesslensInputError, match="not a hesslens sharpness history"):
        hl.SharpnessMonitor(model, MSE, (x, y), opt, out=tmp_path / "bad")


def test_unknown_optimizer_records_sharpness_and_warns_once():
    model = _net(5)
    x, y = _data()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    mon = hl.SharpnessMonitor(model, MSE, (x, y), opt)
    with pytest.warns(UserWarning, match="no stability threshold is known for RMSprop"):
        first = mon.record(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = mon.record(1)
    for rec in (first, second):
        assert rec["threshold"] is None and rec["ratio"] is None and rec["sharpness"] > 0


def test_no_optimizer_and_bad_arguments():
    model = _net(6)
    x, y = _data()
    rec = hl.SharpnessMonitor(model, MSE, (x, y), None).record()
    assert rec["threshold"] is None and rec["directional_sharpness"] is None
    with pytest.raises(HesslensInputError, match="every must be a positive integer"):
        hl.SharpnessMonitor(model, MSE, (x, y), None, every=0)
    with pytest.raises(HesslensInputError, match=r"torch\.optim\.Optimizer"):
        hl.SharpnessMonitor(model, MSE, (x, y), "sgd")
    with pytest.raises(HesslensInputError, match="tol must be a positive number"):
        hl.SharpnessMonitor(model, MSE, (x, y), None, tol=0)
    mon = hl.SharpnessMonitor(model, MSE, (x, y), None)
    with pytest.raises(HesslensInputError, match="info may not set the measured keys"):
        mon.record(0, info={"sharpness": 1.0})
    with pytest.raises(HesslensInputError, match="nothing recorded yet"):
        mon.write_report("unused")


def test_the_update_is_kept_only_before_a_step_a_record_follows():
    model = _net(7)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = hl.SharpnessMonitor(model, MSE, (x, y), opt, every=3)
    copies = []
    real = mon._before_step

    def spy(*args):
        real(*args)
        copies.append(mon._captured)

    mon._hook.remove()
    mon._hook = opt.register_step_pre_hook(spy)
    for step in range(6):
        opt.zero_grad()
        MSE(model(x), y).backward()
        opt.step()
        mon.update(step)
    # a copy before steps 0 and 3 (records follow), none before the others
    assert copies == [True, False, False, True, False, False]
    mon.keep_next_step = False
    opt.step()
    assert mon.record()["directional_sharpness"] is None


def test_groups_that_differ_in_momentum_are_refused_when_the_monitor_is_made():
    model = _net(8)
    x, y = _data()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "momentum": 0.9},
                           {"params": list(model[2:].parameters())}], lr=0.1)
    with pytest.raises(HesslensInputError, match="differ in 'momentum'"):
        hl.SharpnessMonitor(model, MSE, (x, y), opt)


def test_two_monitors_cannot_write_into_one_folder(tmp_path):
    """The folder is a monitor's until it is closed: a second one gets a named error at once,
    and one made after close() continues the first one's history."""
    from hesslens.errors import OutputLockedError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = hl.SharpnessMonitor(model, torch.nn.functional.cross_entropy, (x, y), opt,
                                out=tmp_path)
    first.update(0)
    with pytest.raises(OutputLockedError, match="in use"):
        hl.SharpnessMonitor(model, torch.nn.functional.cross_entropy, (x, y), opt, out=tmp_path)
    first.close()
    with pytest.raises(hl.HesslensInputError, match="was closed"):
        first.record(1)
    with hl.SharpnessMonitor(model, torch.nn.functional.cross_entropy, (x, y), opt,
                             out=tmp_path) as second:
        assert [r["step"] for r in second.history] == [0]
        second.update(1)
    assert [r["step"] for r in second.history] == [0, 1]
