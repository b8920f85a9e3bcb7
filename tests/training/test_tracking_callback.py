"""The curvature-tracking callback (needs the curvature package's Hessian)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hesslens.training import CurvatureTracker, TensorData, TrainConfig, train


def _hessian_or_skip():
    try:
        from hesslens.training.tracking import _hessian_class

        return _hessian_class()
    except ImportError as e:  # the curvature package is written in parallel
        pytest.skip(f"hesslens.Hessian not importable yet: {e}")


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def test_measure_records_full_and_layer_curvature():
    Hessian = _hessian_or_skip()
    model, x, y = _setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = CurvatureTracker(x, y, every=2, seed=0)
    out = tracker.measure(model)
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    layers = ["0", "1", "3"]
    assert set(out["layer_trace"]) == set(layers) == set(out["layer_top_eigenvalue"])
    # against the operator computed directly (eval-mode BatchNorm)
    model.eval()
    H = Hessian(model, nn.functional.cross_entropy, (x, y))
    dense = H.dense().double()
    top = float(torch.linalg.eigvalsh(dense)[-1])  # independent of the tracker's Lanczos
    assert out["top_eigenvalue"] == pytest.approx(top, rel=1e-4)
    offset = 0
    for layer in H.layers:  # each layer's top eigenvalue: its diagonal block, densely
        size = H.block(layer).dim
        block = dense[offset:offset + size, offset:offset + size]
        offset += size
        assert out["layer_top_eigenvalue"][layer] == pytest.approx(
            float(torch.linalg.eigvalsh(block)[-1]), rel=1e-4, abs=1e-6), layer
    exact = torch.diagonal(H.dense())
    assert out["trace"] == pytest.approx(float(exact.sum()), abs=5 * out["trace_stderr"] + 1e-6)
    assert sum(out["layer_trace"].values()) == pytest.approx(out["trace"], rel=1e-6)
    assert out["tracking_seconds"] > 0
    assert tracker.due(2) and tracker.due(4) and not tracker.due(3)


def test_densities_and_similarity_hook():
    _hessian_or_skip()
    model, x, y = _setup()
    tracker = CurvatureTracker(x, y, densities=True, similarity=lambda full, layer: 0.25)
    out = tracker.measure(model)
    assert abs(sum(out["density"]["weights"]) - 1) < 1e-6
    assert set(out["layer_density"]) == set(out["layer_similarity"]) == {"0", "1", "3"}
    assert set(out["layer_similarity"].values()) == {0.25}


def test_trainer_tracks_every_n_epochs_and_the_last(tmp_path):
    _hessian_or_skip()
    model, x, y = _setup()
    data = TensorData(x, y, x[:8], y[:8], num_classes=3)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, track_every=2, track_per_class=4,
                      val_fraction=0.0)
    recs = train(cfg, tmp_path / "r", progress=False, model=model, dataset=data)["epochs"]
    tracked = [r["epoch"] for r in recs if "trace" in r]
    assert tracked == [2, 3]
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())["epochs"]
    assert set(saved[1]["layer_trace"]) == {"0", "1", "3"}
    assert saved[1]["tracking_seconds"] > 0
