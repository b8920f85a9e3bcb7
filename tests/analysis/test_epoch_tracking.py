"""The trainer's curvature tracking (EpochTracking, a trainer callback): its numbers against
dense references, epoch 0, the cost, and training that is the same with tracking as without."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hesslens.analysis.epoch_tracking import EpochTracking
from hesslens.curvature import Hessian
from hesslens.training import TensorData, TrainConfig, train
from hesslens.training.trainer import TIMING_KEYS


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def test_measure_records_full_and_layer_curvature():
    model, x, y = _setup()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracker = EpochTracking(x, y, every=2, seed=0)
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
    assert tracker.due(0) and tracker.due(2) and tracker.due(4) and not tracker.due(3)
    assert not EpochTracking(x, y, initial=False).due(0)


def test_densities_and_similarity_hook():
    model, x, y = _setup()
    tracker = EpochTracking(x, y, densities=True, similarity=lambda full, layer: 0.25)
    out = tracker.measure(model)
    assert abs(sum(out["density"]["weights"]) - 1) < 1e-6
    assert set(out["layer_density"]) == set(out["layer_similarity"]) == {"0", "1", "3"}
    assert set(out["layer_similarity"].values()) == {0.25}
    default = EpochTracking(x, y, densities=True).measure(model)["layer_similarity"]
    assert all(set(v) == {"wasserstein", "js_divergence"} for v in default.values())


def test_trainer_tracks_every_n_epochs_and_the_last(tmp_path):
    model, x, y = _setup()
    data = TensorData(x, y, x[:8], y[:8], num_classes=3)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, track_every=2, track_per_class=4,
                      val_fraction=0.0)
    recs = train(cfg, tmp_path / "r", progress=False, model=model, dataset=data,
                 callbacks=[EpochTracking()])["epochs"]
    tracked = [r["epoch"] for r in recs if "trace" in r]
    assert tracked == [0, 2, 3]  # initialisation, every 2nd epoch, the last
    assert "train_loss" not in recs[0] and recs[0]["test_acc"] is not None
    doc = json.loads((tmp_path / "r" / "metrics.json").read_text())
    saved = doc["epochs"]
    assert set(saved[2]["layer_trace"]) == {"0", "1", "3"}
    assert saved[2]["tracking_seconds"] > 0
    cost = doc["tracking"]
    assert cost["seconds"] == pytest.approx(sum(r.get("tracking_seconds", 0) for r in saved))
    assert cost["training_seconds"] == pytest.approx(
        sum(r.get("epoch_seconds", 0) for r in saved))
    assert cost["fraction"] == pytest.approx(cost["seconds"] / cost["training_seconds"])


def _dropout_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    return model, TensorData(x, y, x[:8], y[:8], num_classes=3)


CURVATURE_KEYS = {"top_eigenvalue", "trace", "trace_stderr", "trace_converged", "layer_trace",
                  "layer_trace_stderr", "layer_top_eigenvalue", *TIMING_KEYS}


def test_tracking_does_not_change_training(tmp_path):
    cfg = dict(epochs=3, batch_size=8, lr=0.05, track_per_class=3, val_fraction=0.0,
               htr_gamma=1e-2, htr_every=2)
    runs = {}
    for every in (0, 1):
        model, data = _dropout_setup()
        result = train(TrainConfig(track_every=every, **cfg), tmp_path / str(every),
                       progress=False, model=model, dataset=data, callbacks=[EpochTracking()])
        runs[every] = (result, model.state_dict())
    (off, w_off), (on, w_on) = runs[0], runs[1]
    for k, v in w_off.items():  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(v, w_on[k]), k
    assert [r["epoch"] for r in on["epochs"]] == [0, 1, 2, 3]
    strip = [{k: v for k, v in r.items() if k not in CURVATURE_KEYS} for r in on["epochs"][1:]]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                     for r in off["epochs"]]
    assert off["tracking"] is None and on["tracking"]["seconds"] > 0


class _Kill(Exception):
    pass


def test_resumed_run_repeats_the_tracked_numbers(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, track_per_class=3, val_fraction=0.0,
                      track_every=1)
    model, data = _dropout_setup()
    straight = train(cfg, tmp_path / "a", progress=False, model=model, dataset=data,
                     callbacks=[EpochTracking()])

    def kill(epoch, record, model):
        if epoch == 2:
            raise _Kill

    model, data = _dropout_setup()
    with pytest.raises(_Kill):
        train(cfg, tmp_path / "b", progress=False, model=model, dataset=data,
              callbacks=[EpochTracking(), kill])
    model, data = _dropout_setup()
    resumed = train(cfg, tmp_path / "b", progress=False, resume=True, model=model,
                    dataset=data, callbacks=[EpochTracking()])

    def strip(recs):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]

    assert strip(resumed["epochs"]) == strip(straight["epochs"])
    assert [r["epoch"] for r in resumed["epochs"]] == [0, 1, 2, 3]
