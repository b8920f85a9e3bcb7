"""The trainer's cheap curvature tracking: the sharpness against the optimizer's threshold
after every N epochs, its numbers against a dense reference, and training left unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hesslens.analysis.epoch_sharpness import EpochSharpness
from hesslens.errors import HesslensInputError
from hesslens.training import TrainConfig
from hesslens.training.trainer import TensorData, train
from tests.reference import dense_hessian


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return model, TensorData(x, y, x[:8], y[:8], num_classes=3)


def test_trainer_records_the_sharpness_and_trains_as_without_it(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.05, momentum=0.5, schedule="none",
                      val_fraction=0.0)
    plain, data = _setup()
    train(cfg, tmp_path / "plain", progress=False, model=plain, dataset=data)
    watched, data = _setup()
    cb = EpochSharpness(data.x_train[:24], data.y_train[:24], every=2, last_epoch=3, tol=1e-10)
    recs = train(cfg, tmp_path / "watched", progress=False, model=watched, dataset=data,
                 callbacks=[cb])["epochs"]
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["epoch"] for r in recs if "sharpness" in r] == [2, 3]
    last = recs[-1]
    assert last["threshold"] == pytest.approx(2 * 1.5 / 0.05)
    names = [n for n, _ in watched.named_parameters()]
    H = dense_hessian(watched.eval(), nn.functional.cross_entropy,
                      [(data.x_train[:24], data.y_train[:24])], names)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert last["sharpness"] == pytest.approx(top, rel=1e-6)  # a float32 model
    assert last["tracking_seconds"] > 0 and last["sharpness_n_hvp"] > 0


def test_a_record_before_start_is_refused():
    cb = EpochSharpness(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(HesslensInputError, match=r"start\(run\)"):
        cb(1, {}, nn.Linear(4, 2))
    with pytest.raises(HesslensInputError, match="every must be a positive integer"):
        EpochSharpness(torch.zeros(2, 4), torch.zeros(2), every=0)
