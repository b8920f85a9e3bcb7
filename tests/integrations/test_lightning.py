"""The Lightning callback with a real lightning.pytorch.Trainer on a small network."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import hesslens as hl
from hesslens.integrations.lightning import CurvatureCallback

LOSS = nn.functional.cross_entropy


class _Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                 nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return LOSS(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    return x, y, loader


def _fit(callbacks, epochs=2):
    x, y, loader = _data()
    module = _Net()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks,
                         deterministic=True)
    trainer.fit(module, loader)
    return module, (x, y)


def test_records_at_steps_and_epochs_and_leaves_training_unchanged(tmp_path):
    x, y, _ = _data()
    callback = CurvatureCallback((x[:24], y[:24]), every_n_steps=3, every_n_epochs=1,
                                 loss_fn=LOSS, out=tmp_path, k=2)
    tracked, _ = _fit([callback])
    plain, _ = _fit([])
    for (name, a), b in zip(plain.state_dict().items(), tracked.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics, bit for bit
    # 4 steps per epoch: steps 3, 6 and the epoch ends at 4 and 8
    assert [r["step"] for r in callback.history] == [3, 4, 6, 8]
    assert [r["epoch"] for r in callback.history] == [0, 1, 1, 2]
    last = callback.history[-1]
    H = hl.Hessian(tracked.eval(), LOSS, (x[:24], y[:24]))
    ref = H.eigenvalues(k=2).values.tolist()
    assert last["full"]["top_eigenvalues"] == pytest.approx(ref, rel=1e-5)
    assert list(last["layers"]) == ["net.0", "net.1", "net.4"]
    assert (tmp_path / "curvature.json").exists() and (tmp_path / "curvature.csv").exists()


def test_only_global_zero_writes(tmp_path):
    x, y, _ = _data()
    module = _Net()
    callback = CurvatureCallback((x, y), every_n_steps=1, loss_fn=LOSS, out=tmp_path / "c",
                                 layers=False, trace=False, at_start=True)
    trainer = SimpleNamespace(is_global_zero=False, global_step=0, current_epoch=0)
    callback.on_fit_start(trainer, module)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert [r["step"] for r in callback.history] == [0, 1]
    assert not (tmp_path / "c").exists()


def test_sharpness_is_logged_with_log_dict_and_leaves_training_unchanged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    x, y, loader = _data()
    callback = CurvatureCallback((x[:24], y[:24]), every_n_steps=2, loss_fn=LOSS,
                                 sharpness=True, out=tmp_path / "sharp")
    module = _Net()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], deterministic=True, log_every_n_steps=1,
                         logger=CSVLogger(tmp_path, name="logs", version=0))
    trainer.fit(module, loader)
    plain, _ = _fit([])
    for (name, a), b in zip(plain.state_dict().items(), module.state_dict().values()):
        assert torch.equal(a, b), name
    # 4 steps an epoch: steps 2, 4, 6, 8 by steps, and the epoch ends (4, 8) already recorded
    assert [r["step"] for r in callback.history] == [2, 4, 6, 8]
    last = callback.history[-1]
    assert last["threshold"] == pytest.approx(38.0) and last["compared"] == "sharpness"
    assert all(r["directional_sharpness"] is not None for r in callback.history)
    H = hl.Hessian(module.eval(), LOSS, (x[:24], y[:24]))
    assert last["sharpness"] == pytest.approx(float(H.eigenvalues(k=1).values[0]), rel=1e-3)
    import csv

    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["hesslens/sharpness"])) for r in rows
              if r.get("hesslens/sharpness")]
    # each record at Lightning's 0-based step of its optimizer step (Lightning may repeat a
    # callback's on-step value at the next logging step)
    for r in callback.history:
        assert (r["step"] - 1, pytest.approx(r["sharpness"])) in logged
    assert sorted({v for _, v in logged}) == pytest.approx(
        sorted(r["sharpness"] for r in callback.history), rel=1e-6)


def test_tracker_records_carry_the_threshold_and_its_report_draws_it(tmp_path):
    x, y, _ = _data()
    callback = CurvatureCallback((x[:24], y[:24]), loss_fn=LOSS, layers=False, trace=False)
    _fit([callback], epochs=1)
    rec = callback.history[-1]
    assert rec["lr"] == 0.1 and rec["threshold"] == pytest.approx(38.0)
    page = callback.write_report(tmp_path)
    assert (tmp_path / "sharpness.png").exists()
    assert "Sharpness and the edge of stability" in page.read_text()
