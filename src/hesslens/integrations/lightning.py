"""Curvature during Lightning training: :class:`CurvatureCallback` for
``lightning.pytorch.Trainer``.

The callback records with :class:`hesslens.CurvatureTracker` on fixed analysis data, with the
LightningModule as the model (its ``forward``) and ``loss_fn(outputs, targets)`` (or the model's
own loss with ``loss_fn=None``), in eval mode (restored afterwards); only the global-zero
process writes files. Importing this module imports ``lightning``
(``pip install hesslens[lightning]``).

With ``sharpness=True`` it records with :class:`hesslens.SharpnessMonitor` instead, against the
edge of stability of the module's optimizer (``trainer.optimizers``; one optimizer), and logs
each record's numbers (``hesslens/sharpness``, ``hesslens/threshold``, ...) with the module's
``log_dict``, so they reach the Trainer's loggers (TensorBoard, CSV, W&B, MLflow).

Example:
    >>> import torch, lightning.pytorch as pl
    >>> from torch import nn
    >>> from hesslens.integrations.lightning import CurvatureCallback
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    ...     def forward(self, x):
    ...         return self.net(x)
    ...     def training_step(self, batch, batch_idx):
    ...         return nn.functional.cross_entropy(self(batch[0]), batch[1])
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    >>> callback = CurvatureCallback((x, y), loss_fn=nn.functional.cross_entropy)
    >>> trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False,
    ...                      enable_model_summary=False, callbacks=[callback])
    >>> trainer.fit(Net(), loader)
    >>> [(r["step"], r["epoch"]) for r in callback.history]
    [(4, 1), (8, 2)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback

from hesslens.errors import HesslensInputError
from hesslens.integrations._schedule import TrackerCallbackBase

__all__ = ["CurvatureCallback"]


class CurvatureCallback(TrackerCallbackBase, Callback):
    """A Lightning ``Callback`` that records curvature during training.

    Args:
        data: the fixed analysis data (``(inputs, targets)``, a list of batches, or anything
            :class:`hesslens.Hessian` accepts); moved to the module's device at the start.
        every_n_steps: record after every n-th optimizer step (``trainer.global_step``).
        every_n_epochs: record after every n-th epoch (neither given: every epoch).
        out: folder for the history files (global-zero process only).
        loss_fn: ``loss_fn(outputs, targets)``; ``None`` for the model's own loss.
        at_start: also record before the first step (step 0).
        sharpness: record with :class:`hesslens.SharpnessMonitor` and log with ``log_dict``
            instead of the curvature tracker.
        **options: :class:`hesslens.CurvatureTracker`'s options, or with ``sharpness=True``
            the monitor's (``k``, ``tol``, ``seed``, ``warm_start``, ``direction``, ...).

    Attributes:
        history: the records (``{"step", "epoch", ...}``; ``epoch`` counts the epochs
            completed).
    """

    def __init__(self, data: Any, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, out: str | Path | None = None, *,
                 loss_fn: Any = None, at_start: bool = False, sharpness: bool = False,
                 **options: Any) -> None:
        Callback.__init__(self)
        TrackerCallbackBase.__init__(self, data, every_n_steps, every_n_epochs, out, loss_fn,
                                     at_start, options, sharpness=sharpness)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if len(optimizers) > 1 and self.sharpness:
            raise HesslensInputError(
                f"the module has {len(optimizers)} optimizers; the sharpness monitor follows "
                "one: use a single optimizer, or sharpness=False")
        self.start(pl_module, write=bool(trainer.is_global_zero),
                   optimizer=optimizers[0] if optimizers else None)
        if self.at_start:
            self.record(int(trainer.global_step), {"epoch": int(trainer.current_epoch)})

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        self.expect_step(int(trainer.global_step) + 1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step > 0 and self.schedule.step_due(step):
            self._record(trainer, pl_module, step, int(trainer.current_epoch), on_step=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch) + 1
        if self.schedule.epoch_due(epoch):
            self._record(trainer, pl_module, int(trainer.global_step), epoch, on_step=False)

    def _record(self, trainer: Any, pl_module: Any, step: int, epoch: int,
                on_step: bool) -> None:
        rec = self.record(step, {"epoch": epoch})
        if rec is not None and self.sharpness:
            logs = self.log_values(rec)
            if logs:
                # every rank has the same record: a mean over the ranks changes nothing
                pl_module.log_dict(logs, on_step=on_step, on_epoch=not on_step,
                                   sync_dist=int(getattr(trainer, "world_size", 1)) > 1)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.stop()
