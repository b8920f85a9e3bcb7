"""HessianTracePenalty against a dense float64 Hessian (torch.func.hessian over flat params)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.training.layers_select import discover_layers, middle_indices, select_layers
from hesslens.training.penalty import HessianTracePenalty, default_fd_eps
from tests.training._htr_dense import Dense, tanh_mlp

CE = nn.functional.cross_entropy


@pytest.fixture()
def setup():
    model = tanh_mlp()  # 5 Linear layers '0', '2', '4', '6', '8'; 56 parameters
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (12,), generator=g)
    return model, x, y, Dense(model, x, y)


def _names(model, layers):
    return [n for ns in select_layers(model, layers).values() for n in ns]


SELECTIONS = ["all", "middle", ["4"], ["0", "8"]]


@pytest.mark.parametrize("layers", SELECTIONS, ids=str)
def test_quadratic_form_is_exact_for_given_probe(setup, layers):
    model, x, y, dense = setup
    pen = HessianTracePenalty(model, layers=layers, n_probes=3, seed=0)
    idx = dense.index(_names(model, layers))
    H = dense.block(idx)
    probes = pen.sample_probes()
    value = pen(CE(model(x), y), probes=probes)
    expected = sum(dense.flat_probe(v, None) @ H @ dense.flat_probe(v, None)
                   for v in probes) / 3
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("layers", ["middle", ["0", "8"]], ids=str)
def test_mean_over_probes_is_the_sum_of_block_traces(setup, layers, distribution):
    model, x, y, dense = setup
    n = 1000
    pen = HessianTracePenalty(model, layers=layers, n_probes=n, seed=3,
                              distribution=distribution)
    names = _names(model, layers)
    Hfull = dense.hessian()
    idx = dense.index(names)
    H = Hfull[idx][:, idx]
    # The exact target: the sum of the chosen layers' diagonal-block traces.
    target = sum(float(torch.diagonal(Hfull[dense.index(ns)][:, dense.index(ns)]).sum())
                 for ns in select_layers(model, layers).values())
    assert target == pytest.approx(float(torch.trace(H)), rel=1e-12)
    off = H - torch.diag(torch.diagonal(H))
    var = 2 * float((off**2).sum()) if distribution == "rademacher" else 2 * float((H**2).sum())
    se = math.sqrt(var / n)
    # The tolerance is tight enough to catch a factor 2 or the wrong block.
    assert 4 * se < 0.25 * abs(target)
    wrong_block = float(torch.trace(Hfull)) - target
    assert abs(wrong_block - target) > 8 * se
    value = float(pen(CE(model(x), y)).detach())
    assert abs(value - target) < 4 * se, (value, target, se)


@pytest.mark.parametrize("layers", SELECTIONS, ids=str)
def test_gradient_for_given_probe_is_exact(setup, layers):
    model, x, y, dense = setup
    pen = HessianTracePenalty(model, layers=layers, n_probes=2, seed=5)
    idx = dense.index(_names(model, layers))
    probes = pen.sample_probes()
    vs = [dense.flat_probe(v, None) for v in probes]

    def quad(flat):
        H = torch.func.hessian(dense.loss)(flat)[idx][:, idx]
        return sum(v @ H @ v for v in vs) / len(vs)

    expected = dense.grad_of(quad)
    model.zero_grad()
    pen(CE(model(x), y), probes=probes).backward()
    torch.testing.assert_close(dense.model_grad(), expected, rtol=1e-9, atol=1e-11)


def test_mean_gradient_is_the_derivative_of_the_block_trace(setup):
    model, x, y, dense = setup
    layers = "middle"
    n = 600
    idx = dense.index(_names(model, layers))

    def block(flat):
        return torch.func.hessian(dense.loss)(flat)[idx][:, idx]

    exact = dense.grad_of(lambda f: torch.trace(block(f)))
    T = torch.func.jacrev(block)(dense.theta)  # T[i, j, k] = d H_ij / d theta_k
    off = T.clone()
    ii = torch.arange(len(idx))
    off[ii, ii, :] = 0
    sd = torch.sqrt(2 * (off**2).sum(dim=(0, 1)))  # per-probe std of each gradient entry
    pen = HessianTracePenalty(model, layers=layers, n_probes=n, seed=11)
    model.zero_grad()
    pen(CE(model(x), y)).backward()
    got = dense.model_grad()
    se = sd / math.sqrt(n)
    # the check has power: a factor 2 (or a zero gradient) would be many errors off
    assert bool((exact.abs() > 10 * se).any())
    assert bool(((got - exact).abs() <= 5 * se + 1e-12).all()), (got - exact) / (se + 1e-30)
    # the gradient reaches the first layer, which the penalty does not differentiate by
    first = dense.index(["0.weight", "0.bias"])
    assert float(got[first].abs().sum()) > 0


def test_middle_selects_the_documented_layers():
    assert [list(middle_indices(n)) for n in (1, 2, 3, 4, 5, 8, 11)] == [
        [0], [1], [1], [1, 2], [1, 2, 3], [2, 3, 4, 5], list(range(3, 8))]
    model = tanh_mlp()
    assert list(discover_layers(model)) == ["0", "2", "4", "6", "8"]
    assert list(select_layers(model, "middle")) == ["2", "4", "6"]
    pen = HessianTracePenalty(model, layers="middle")
    assert pen.layers == ["2", "4", "6"]
    assert pen.param_names == ["2.weight", "2.bias", "4.weight", "4.bias", "6.weight", "6.bias"]


def test_layers_of_nested_modules_and_batchnorm():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()),
        nn.Flatten(), nn.Linear(8, 3, bias=False), nn.Linear(3, 2))
    assert discover_layers(model) == {
        "0.0": ["0.0.weight", "0.0.bias"], "0.1": ["0.1.weight", "0.1.bias"],
        "2": ["2.weight"], "3": ["3.weight", "3.bias"]}
    assert list(select_layers(model, "middle")) == ["0.1", "2"]
    model[3].bias.requires_grad_(False)
    assert discover_layers(model)["3"] == ["3.weight"]


def test_named_layers_and_comma_string(setup):
    model, *_ = setup
    assert HessianTracePenalty(model, layers=["8", "2"]).layers == ["2", "8"]
    assert HessianTracePenalty(model, layers="2,8").layers == ["2", "8"]


def test_unknown_layer_name_lists_the_valid_ones(setup):
    model, *_ = setup
    with pytest.raises(HesslensInputError, match=r"unknown layer.*'features'.*'0', '2'"):
        HessianTracePenalty(model, layers=["features"])
    with pytest.raises(HesslensInputError, match="no layers"):
        HessianTracePenalty(model, layers=[])


@pytest.mark.parametrize("kwargs, msg", [
    ({"n_probes": 0}, "n_probes"),
    ({"distribution": "uniform"}, "distribution"),
    ({"method": "exact"}, "method"),
    ({"fd_eps": -1.0}, "fd_eps"),
])
def test_bad_arguments(setup, kwargs, msg):
    model, *_ = setup
    with pytest.raises(HesslensInputError, match=msg):
        HessianTracePenalty(model, **kwargs)


def test_bad_loss(setup):
    model, x, y, _ = setup
    pen = HessianTracePenalty(model)
    with pytest.raises(HesslensInputError, match="scalar"):
        pen(CE(model(x), y, reduction="none"))
    with pytest.raises(HesslensInputError, match="not finite"):
        pen(CE(model(x), y) * float("nan"))
    with pytest.raises(HesslensInputError, match="not finite"):
        pen(CE(model(x), y) + float("inf"))
    with torch.no_grad():
        detached = CE(model(x), y)
    with pytest.raises(HesslensInputError, match="require grad"):
        pen(detached)
    with pytest.raises(HesslensInputError, match="Tensor"):
        pen(1.0)


def test_probes_are_reproducible_and_resumable(setup):
    model, x, y, _ = setup
    a = HessianTracePenalty(model, seed=7)
    b = HessianTracePenalty(model, seed=7)
    loss = CE(model(x), y)
    assert float(a(loss).detach()) == float(b(loss).detach())
    state = a.state_dict()
    nxt = float(a(loss).detach())
    c = HessianTracePenalty(model, seed=0)
    c.load_state_dict(state)
    assert float(c(loss).detach()) == nxt
    assert float(HessianTracePenalty(model, seed=8)(loss).detach()) != nxt


def test_rademacher_probes_are_signs(setup):
    model, *_ = setup
    (v,) = HessianTracePenalty(model, seed=0).sample_probes(1)
    flat = torch.cat([t.reshape(-1) for t in v])
    assert set(flat.tolist()) == {-1.0, 1.0}


def test_middle_does_not_differentiate_the_first_layer(setup):
    """The penalty's own backward passes skip the first layer's weight gradient."""
    model, x, y, _ = setup
    calls = []
    handle = model[0].weight.register_hook(lambda g: calls.append(1))
    try:
        for layers, expect_calls in (("middle", False), ("all", True)):
            calls.clear()
            loss = CE(model(x), y)
            pen = HessianTracePenalty(model, layers=layers, n_probes=2, seed=0)
            pen(loss)
            assert bool(calls) is expect_calls, layers
    finally:
        handle.remove()


# ---------------------------------------------------------------------- finite differences
def _phi_derivatives(dense, idx, v, order=4):
    """Derivatives of phi(t) = L(theta + t v) at t = 0 (v over the chosen block)."""
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    full = torch.zeros_like(dense.theta)
    full[idx] = v
    out = [dense.loss(dense.theta + t * full)]
    for _ in range(order):
        (d,) = torch.autograd.grad(out[-1], t, create_graph=True)
        out.append(d)
    return [float(o.detach()) for o in out]


@pytest.mark.parametrize("layers", ["all", ["4"]], ids=str)
def test_fd_matches_hvp_within_its_truncation_bias(setup, layers):
    model, x, y, dense = setup
    rel = 1e-2
    fd = HessianTracePenalty(model, layers=layers, method="fd", fd_eps=rel, loss_fn=CE,
                             seed=2, n_probes=1)
    hvp = HessianTracePenalty(model, layers=layers, seed=2, n_probes=1)
    idx = dense.index(_names(model, layers))
    for _ in range(3):
        probes = fd.sample_probes()
        loss = CE(model(x), y)
        a = float(fd(loss, inputs=x, targets=y, probes=probes).detach())
        b = float(hvp(loss, probes=probes).detach())
        (eps,) = fd.last_fd_steps
        theta = dense.theta[idx]
        v = dense.flat_probe(probes[0], None)
        assert eps == pytest.approx(rel * float(theta.norm()) / float(v.norm()))
        _, _, d2, _, d4 = _phi_derivatives(dense, idx, v)
        assert b == pytest.approx(d2, rel=1e-10)
        bias = eps**2 * d4 / 12
        # fd - hvp is the documented O(eps^2) truncation term, up to O(eps^4)
        assert abs(a - b) <= 2 * abs(bias) + 1e-10
        assert abs(a - b - bias) <= 0.05 * abs(bias) + 1e-10


def test_fd_gradient_matches_hvp_gradient_in_float64(setup):
    model, x, y, dense = setup
    fd = HessianTracePenalty(model, layers="middle", method="fd", fd_eps=1e-4, loss_fn=CE,
                             seed=4, n_probes=2)
    hvp = HessianTracePenalty(model, layers="middle", seed=4, n_probes=2)
    probes = fd.sample_probes()
    model.zero_grad()
    loss = CE(model(x), y)
    fd(loss, inputs=x, targets=y, probes=probes).backward()
    g_fd = dense.model_grad()
    model.zero_grad()
    hvp(CE(model(x), y), probes=probes).backward()
    g_hvp = dense.model_grad()
    torch.testing.assert_close(g_fd, g_hvp, rtol=1e-4, atol=1e-6)


def test_fd_default_step_float32_smooth_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 4, (64,), generator=g)
    fd = HessianTracePenalty(model, method="fd", loss_fn=CE, seed=0)
    ref = HessianTracePenalty(model.double(), seed=0)
    model.float()
    assert default_fd_eps(torch.float32) == pytest.approx(0.041, abs=1e-3)
    errs = []
    for _ in range(5):
        probes = fd.sample_probes()
        a = float(fd(CE(model(x), y), inputs=x, targets=y, probes=probes).detach())
        m64 = model.double()
        b = float(ref(CE(m64(x.double()), y),
                      probes=[[v.double() for v in probes[0]]]).detach())
        model.float()
        errs.append(abs(a - b) / abs(b))
    assert max(errs) < 0.05, errs


def test_fd_needs_loss_fn_and_batch(setup):
    model, x, y, _ = setup
    loss = CE(model(x), y)
    with pytest.raises(HesslensInputError, match="loss_fn"):
        HessianTracePenalty(model, method="fd")(loss, inputs=x, targets=y)
    with pytest.raises(HesslensInputError, match="inputs=x, targets=y"):
        HessianTracePenalty(model, method="fd", loss_fn=CE)(loss)


def test_fd_leaves_batchnorm_statistics_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = CE(model(x), y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    pen = HessianTracePenalty(model, method="fd", loss_fn=CE, seed=0)
    value = pen(loss, inputs=x, targets=y)
    assert torch.isfinite(value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_fd_warns_about_dropout():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pen = HessianTracePenalty(model, method="fd", loss_fn=CE, seed=0)
    with pytest.warns(UserWarning, match="dropout"):
        pen(CE(model(x), y), inputs=x, targets=y)


def test_penalty_is_a_plain_loss_term_with_any_optimizer(setup):
    """Gradient accumulation: two half-batches accumulate the same as two separate calls."""
    model, x, y, _ = setup
    halves = ((x[:6], y[:6]), (x[6:], y[6:]))
    pen = HessianTracePenalty(model, layers="middle", seed=0)
    probes = [pen.sample_probes(), pen.sample_probes()]
    separate = []
    for (xs, ys), pr in zip(halves, probes):
        model.zero_grad()
        loss = CE(model(xs), ys)
        (loss + 0.1 * pen(loss, probes=pr)).backward()
        separate.append([p.grad.clone() for p in model.parameters()])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad()
    for (xs, ys), pr in zip(halves, probes):
        loss = CE(model(xs), ys)
        (loss + 0.1 * pen(loss, probes=pr)).backward()
    for p, a, b in zip(model.parameters(), *separate):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-12, atol=1e-14)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_penalty_is_zero_where_the_loss_is_linear_in_the_chosen_layers():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = model(x).mean()  # linear in the last layer's weight and bias
    pen = HessianTracePenalty(model, layers=["2"], n_probes=3, seed=0)
    value = pen(loss)
    assert float(value.detach()) == 0.0
    value.backward()  # still a valid graph
    assert float(HessianTracePenalty(model, layers=["0"], seed=0)(model(x).mean()).detach()) != 0


class _TiedMLP(nn.Module):
    """One Linear applied twice (weight sharing): the perturbed passes must move both uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.again = self.shared  # the same module under a second name
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.again(h))
        return self.out(h)


def test_fd_moves_tied_weights_everywhere_they_are_used():
    model = _TiedMLP().double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    fd = HessianTracePenalty(model, method="fd", fd_eps=1e-4, loss_fn=CE, seed=1)
    hvp = HessianTracePenalty(model, seed=1)
    assert fd.layers == ["inp", "shared", "out"]
    for _ in range(3):
        probes = fd.sample_probes()
        loss = CE(model(x), y)
        a = float(fd(loss, inputs=x, targets=y, probes=probes).detach())
        b = float(hvp(loss, probes=probes).detach())
        # Moving only one of the two uses of the shared weight is off by O(1), not O(eps^2).
        assert a == pytest.approx(b, rel=1e-5)


class _SharedWeight(nn.Module):
    """Two modules holding one parameter (``b.weight = a.weight``), as in tied embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("cls", [_TiedMLP, _SharedWeight])
def test_fd_leaves_a_model_with_shared_weights_intact(cls):
    model = cls().double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8,), generator=g)
    before = {n: (id(p), p.detach().clone())
              for n, p in model.named_parameters(remove_duplicate=False)}
    fd = HessianTracePenalty(model, method="fd", fd_eps=1e-4, loss_fn=CE, seed=2)
    hvp = HessianTracePenalty(model, seed=2)
    probes = fd.sample_probes()
    loss = CE(model(x), y)
    a = float(fd(loss, inputs=x, targets=y, probes=probes).detach())
    for n, p in model.named_parameters(remove_duplicate=False):
        assert id(p) == before[n][0] and torch.equal(p.detach(), before[n][1]), n
    assert a == pytest.approx(float(hvp(loss, probes=probes).detach()), rel=1e-5)


def test_state_from_another_kind_of_device_continues_the_stream(setup):
    """A probe-generator state saved on a GPU (16 bytes) cannot be set on a CPU generator: the
    stream continues from a derived seed instead of failing or repeating its first probes."""
    model, *_ = setup
    pen = HessianTracePenalty(model, seed=7)
    first = pen.sample_probes()
    pen.sample_probes()
    state = pen.state_dict()
    assert state["device"] == "cpu" and state["draws"] == 2
    state = {**state, "generator": torch.zeros(16, dtype=torch.uint8), "device": "cuda"}
    resumed = HessianTracePenalty(model, seed=7)
    resumed.load_state_dict(state)
    nxt = resumed.sample_probes()
    assert not all(torch.equal(a, b) for a, b in zip(nxt[0], first[0]))
    again = HessianTracePenalty(model, seed=7)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.sample_probes()[0], nxt[0]))


def test_penalty_on_a_sliced_transformer_block_is_the_quadratic_form_of_that_block():
    """layers=[q] of the transformer grouping: q is a slice of the fused in_proj weight; the
    probe is zero outside it and the penalty is v^T H_qq v of the dense float64 Hessian."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import cross_entropy

    from hesslens.curvature.blocks import block_flat_indices
    from tests.reference import dense_hessian

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(3 * 8, 4)).double()
    x, y = torch.randn(6, 3, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    pen = HessianTracePenalty(model, layers=["0.layers.0.attn.q"], grouping="transformer",
                              seed=3, loss_fn=cross_entropy)
    assert pen.param_names == ["0.layers.0.self_attn.in_proj_weight",
                               "0.layers.0.self_attn.in_proj_bias"]
    probes = pen.sample_probes(2)
    names = [n for n, p in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    idx = block_flat_indices(pen.blocks["0.layers.0.attn.q"], shapes)
    with sdpa_kernel([SDPBackend.MATH]):
        H = dense_hessian(model, cross_entropy, [(x, y)], names)
    offsets = dict(zip(names, torch.cumsum(torch.tensor([0] + [p.numel() for p in
                                                              model.parameters()]), 0)))
    for probe in probes:
        flat = torch.zeros(H.shape[0], dtype=torch.float64)
        for name, v in zip(pen.param_names, probe):
            flat[int(offsets[name]): int(offsets[name]) + v.numel()] = v.flatten()
        outside = torch.ones(H.shape[0], dtype=torch.bool)
        outside[idx] = False
        assert flat[outside].abs().max() == 0 and flat[idx].abs().min() == 1
        # LayerNorm: the penalty re-evaluates the loss (written-out norms, and attention on a
        # kernel with double backward), so the default attention of the training pass is fine
        value = pen(cross_entropy(model(x), y), x, y, probes=[probe])
        assert torch.allclose(value, flat @ H @ flat, rtol=1e-10)
    # Without a re-evaluation (a model without LayerNorm), the default attention kernel has no
    # double backward: a named error says what to do.
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
    head = nn.Linear(8, 4).double()
    bare = nn.ModuleDict({"attn": attn, "head": head})
    pen = HessianTracePenalty(bare, layers="all", seed=0)
    h = attn(x, x, x, need_weights=False)[0]
    with pytest.raises(HesslensInputError, match="sdpa_kernel"):
        pen(cross_entropy(head(h.mean(1)), y))
