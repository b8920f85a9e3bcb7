"""The curvature tracker's measurement (CurvatureRecorder, hl.CurvatureTracker without its
report): curvature in any training loop, checked against dense float64 Hessians, and proved not
to change training. The report's tests are in tests/report/test_tracking.py."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import hesslens as hl
from hesslens.analysis.tracker import HISTORY_CSV, HISTORY_JSON, SCHEMA, CurvatureRecorder
from hesslens.errors import HesslensInputError

LOSS = nn.functional.cross_entropy


def _model(seed=0, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers += [nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers)


def _data(n=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _train(model, x, y, steps, tracker=None, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        model.train()
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        if tracker is not None:  # after the step: the record is of the weights it left
            grads = [p.grad.clone() for p in model.parameters()]
            tracker.update(step)
            assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    return model


def _dense_reference(model, x, y):
    """Dense float64 Hessian of the eval-mode loss, by torch.func, independent of hesslens."""
    model = model.eval()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.view_as(params[n]) for n, c in zip(names, chunks)}
        return LOSS(torch.func.functional_call(model, {**p, **buffers}, (x,)), y)

    flat = torch.cat([params[n].flatten() for n in names])
    H = torch.func.hessian(loss)(flat)
    return (H + H.T) / 2, names, sizes


def test_records_match_dense_float64_hessians_and_a_fresh_operator():
    x, y = _data(dtype=torch.float64)
    model = _model().double()
    tracker = CurvatureRecorder(model, LOSS, (x, y), k=2)
    _train(model, x, y, steps=3, tracker=tracker)
    assert [r["step"] for r in tracker.history] == [0, 1, 2]
    last = tracker.history[-1]
    H, names, sizes = _dense_reference(model, x, y)
    top2 = torch.linalg.eigvalsh(H)[-2:].flip(0).tolist()
    assert last["full"]["top_eigenvalues"] == pytest.approx(top2, rel=1e-6)
    assert last["full"]["trace"] == pytest.approx(
        float(H.trace()), rel=1e-9, abs=4 * last["full"]["trace_stderr"])
    # each layer block (module owning weight and bias) against the dense diagonal block
    offsets = np.cumsum([0, *sizes])
    layer_of = {n: n.rsplit(".", 1)[0] for n in names}
    assert list(last["layers"]) == ["0", "1", "3", "5"]
    for layer, entry in last["layers"].items():
        idx = torch.cat([torch.arange(offsets[i], offsets[i + 1])
                         for i, n in enumerate(names) if layer_of[n] == layer])
        block = H[idx][:, idx]
        ref = torch.linalg.eigvalsh(block)[-2:].flip(0).tolist()
        assert entry["top_eigenvalues"] == pytest.approx(ref, rel=1e-6, abs=1e-9), layer
        assert entry["dim"] == len(idx)
    assert sum(e["trace"] for e in last["layers"].values()) == pytest.approx(
        last["full"]["trace"], rel=1e-9)
    # the last record is what a fresh operator on the final weights gives
    fresh = hl.Hessian(model.eval(), LOSS, (x, y))
    assert last["full"]["top_eigenvalues"][0] == pytest.approx(
        float(fresh.eigenvalues(k=1).values[0]), rel=1e-6)
    assert last["seconds"] > 0 and last["n_hvp"] > 0


def test_estimated_traces_repeat_a_fresh_operator_on_the_same_weights():
    # large enough (1,290 parameters) for the trace to be a stochastic estimate, not exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 10, (64,), generator=g)
    tracker = CurvatureRecorder(model, LOSS, (x, y), trace_rtol=0.05)
    _train(model, x, y, steps=2, tracker=tracker)
    last = tracker.history[-1]
    H = hl.Hessian(model, LOSS, (x, y))
    _, layers = H.traces(rtol=0.05)
    assert last["full"]["trace_stderr"] > 0 and last["full"]["trace_converged"]
    # same probes, same stop: equal up to float32 rounding of the products (the fresh operator
    # may choose another product path than the tracker's pinned "reverse")
    assert last["full"]["trace"] == pytest.approx(H.trace(rtol=0.05).value, rel=1e-6)
    for name, result in layers.items():
        assert last["layers"][name]["trace"] == pytest.approx(result.value, rel=1e-6), name
    assert last["full"]["top_eigenvalues"][0] == pytest.approx(
        float(H.eigenvalues(k=1).values[0]), rel=1e-6)


def test_default_settings_are_the_operators():
    import inspect

    tracker = CurvatureRecorder(_model(), LOSS, _data())
    for method, arg, value in (("trace", "rtol", tracker.trace_rtol),
                               ("trace", "max_hvp", tracker.trace_max_hvp),
                               ("eigenvalues", "tol", tracker.eig_tol)):
        default = inspect.signature(getattr(hl.Hessian, method)).parameters[arg].default
        assert value == default, (method, arg)


def test_a_loop_with_the_tracker_ends_bit_identical_to_one_without():
    x, y = _data()
    plain = _train(_model(dropout=True), x, y, steps=4)
    after_plain = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    tracked_model = _model(dropout=True)
    tracker = CurvatureRecorder(tracked_model, LOSS, (x, y), density=True, similarity=True)
    _train(tracked_model, x, y, steps=4, tracker=tracker)
    after_tracked = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    assert len(tracker.history) == 4
    for (name, a), b in zip(plain.state_dict().items(), tracked_model.state_dict().values()):
        assert torch.equal(a, b), name  # parameters and BatchNorm statistics
    assert torch.equal(after_plain[0], after_tracked[0])
    assert np.array_equal(after_plain[1], after_tracked[1])
    assert after_plain[2] == after_tracked[2]


def test_update_restores_the_mode_of_every_module():
    x, y = _data()
    model = _model(dropout=True)
    model.train()
    model[1].eval()  # a mixed state, as a user may set it
    CurvatureRecorder(model, LOSS, (x, y)).update(0)
    assert model.training and not model[1].training and model[3].training


def test_every_records_on_the_first_call_and_every_nth_after():
    x, y = _data()
    tracker = CurvatureRecorder(_model(), LOSS, (x, y), every=3, layers=False, trace=False)
    made = [tracker.update(s) is not None for s in range(7)]
    assert made == [True, False, False, True, False, False, True]
    assert [r["step"] for r in tracker.history] == [0, 3, 6]
    assert tracker.history[0]["layers"] == {} and "trace" not in tracker.history[0]["full"]


def test_layer_choices():
    x, y = _data()
    model = _model()
    only = CurvatureRecorder(model, LOSS, (x, y), layers=["5"], trace=False).update(0)
    assert list(only["layers"]) == ["5"]
    grouping = {"first": ["0.weight", "0.bias", "1.weight", "1.bias"],
                "rest": ["3.weight", "3.bias", "5.weight", "5.bias"]}
    grouped = CurvatureRecorder(model, LOSS, (x, y), layers=grouping).update(0)
    assert list(grouped["layers"]) == ["first", "rest"]
    assert grouped["layers"]["first"]["dim"] == 5 * 7 + 7 + 7 + 7


def test_files_are_written_per_record_and_a_new_tracker_continues_them(tmp_path):
    x, y = _data()
    model = _model()
    t1 = CurvatureRecorder(model, LOSS, (x, y), out=tmp_path)
    t1.update(0)
    saved = json.loads((tmp_path / HISTORY_JSON).read_text())
    assert saved["schema"] == SCHEMA and [r["step"] for r in saved["records"]] == [0]
    t1.update(10)
    t1.update(20)
    t1.close()  # "killed" here (which gives back the folder's lock): a new tracker continues
    t2 = CurvatureRecorder(model, LOSS, (x, y), out=tmp_path)
    assert [r["step"] for r in t2.history] == [0, 10, 20]
    t2.update(10)  # a run resumed from step 10 measures it again: 10 and 20 are replaced
    t2.update(15)
    saved = json.loads((tmp_path / HISTORY_JSON).read_text())
    assert [r["step"] for r in saved["records"]] == [0, 10, 15]
    assert saved["records"][1] == json.loads(json.dumps(t2.history[1]))
    rows = list(csv.DictReader((tmp_path / HISTORY_CSV).open()))
    assert [r["step"] for r in rows] == ["0", "10", "15"]
    assert float(rows[2]["full.top_eigenvalue"]) == pytest.approx(
        t2.history[2]["full"]["top_eigenvalues"][0], rel=1e-12)
    assert float(rows[2]["layers.3.trace"]) == pytest.approx(
        t2.history[2]["layers"]["3"]["trace"], rel=1e-12)


def test_a_foreign_history_file_is_refused(tmp_path):
    (tmp_path / HISTORY_JSON).write_text(json.dumps({"epochs": []}))
    x, y = _data()
    with pytest.raises(HesslensInputError, match="not a hesslens curvature history"):
        CurvatureRecorder(_model(), LOSS, (x, y), out=tmp_path)


def test_densities_and_similarities():
    x, y = _data()
    model = _model()
    rec = CurvatureRecorder(model, LOSS, (x, y), density=True, similarity=True, k=2).update(0)
    assert sum(rec["full"]["density"]["weights"]) == pytest.approx(1.0, abs=1e-9)
    for name, entry in rec["layers"].items():
        assert sum(entry["density"]["weights"]) == pytest.approx(1.0, abs=1e-9), name
        assert entry["similarity"]["wasserstein"] >= 0
    custom = CurvatureRecorder(model, LOSS, (x, y), similarity=lambda full, layer: 0.5).update(0)
    assert {e["similarity"] for e in custom["layers"].values()} == {0.5}
    assert "density" in custom["full"]  # a similarity needs the densities


@pytest.mark.parametrize("kw, msg", [
    (dict(every=0), "every must be a positive integer"),
    (dict(k=0), "k must be a positive integer"),
    (dict(layers=3), "layers must be True, False"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(trace_rtol=0), "trace_rtol must be positive"),
])
def test_bad_settings_are_named(kw, msg):
    x, y = _data()
    with pytest.raises(HesslensInputError, match=msg):
        CurvatureRecorder(_model(), LOSS, (x, y), **kw)


def test_bad_model_and_step(tmp_path):
    x, y = _data()
    with pytest.raises(HesslensInputError, match=r"torch\.nn\.Module"):
        CurvatureRecorder(lambda t: t, LOSS, (x, y))
    tracker = CurvatureRecorder(_model(), LOSS, (x, y), layers=False, trace=False)
    with pytest.raises(HesslensInputError, match="step must be a number"):
        tracker.update("one")
    (tmp_path / "f").write_text("")
    with pytest.raises(HesslensInputError, match="is a file"):
        CurvatureRecorder(_model(), LOSS, (x, y), out=tmp_path / "f")


def test_data_is_passed_to_the_operator_as_it_is():
    x, y = _data(dtype=torch.float64)
    model = _model().double()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    by_batches = CurvatureRecorder(model, LOSS, loader, trace=False).update(0)
    whole = CurvatureRecorder(model, LOSS, (x, y), trace=False).update(0)
    # batches of 16, 16 and 8 are weighted by size: the same mean loss, the same Hessian
    assert by_batches["full"]["top_eigenvalues"][0] == pytest.approx(
        whole["full"]["top_eigenvalues"][0], rel=1e-8)
    for name, entry in whole["layers"].items():
        assert by_batches["layers"][name]["top_eigenvalues"][0] == pytest.approx(
            entry["top_eigenvalues"][0], rel=1e-8, abs=1e-12), name
