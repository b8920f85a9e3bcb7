"""Curvature during Lightning training: :class:`CurvatureCallback` for
``lightning.pytorch.Trainer``.

The callback records with :class:`hesslens.CurvatureTracker` on fixed analysis data, with the
LightningModule as the model (its ``forward``) and ``loss_fn(outputs, targets)`` (or the model's
own loss with ``loss_fn=None``), in eval mode (restored afterwards); only the global-zero
process writes files. Importing this module imports ``lightning``
(``pip install hesslens[lightning]``).

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

from hesslens.integrations._schedule import TrackerCallbackBase

__all__ = ["CurvatureCallback"]


class CurvatureCallback(TrackerCallbackBase, Callback):
    """A Lightning ``Callback`` that records curvature during training.

    Args:
        data: the fixed analysis data (``(inputs, targets)``, a list of batches, or anything
            :class:`hesslens.Hessian` accepts); moved to the module's device at the start.
        every_n_steps: record after every n-th optimizer step (``trainer.global_step``).
        every_n_epochs: record after every n-th epoch (neither given: every epoch).
        out: folder for ``curvature.json`` / ``curvature.csv`` (global-zero process only).
        loss_fn: ``loss_fn(outputs, targets)``; ``None`` for the model's own loss.
        at_start: also record before the first step (step 0).
        **tracker_options: :class:`hesslens.CurvatureTracker`'s options.

    Attributes:
        history: the records (``{"step", "epoch", "full", "layers", "seconds", ...}``;
            ``epoch`` counts the epochs completed).
    """

    def __init__(self, data: Any, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, out: str | Path | None = None, *,
                 loss_fn: Any = None, at_start: bool = False, **tracker_options: Any) -> None:
        Callback.__init__(self)
        TrackerCallbackBase.__init__(self, data, every_n_steps, every_n_epochs, out, loss_fn,
                                     at_start, tracker_options)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.start(pl_module, write=bool(trainer.is_global_zero))
        if self.at_start:
            self.record(int(trainer.global_step), {"epoch": int(trainer.current_epoch)})

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step > 0 and self.schedule.step_due(step):
            self.record(step, {"epoch": int(trainer.current_epoch)})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch) + 1
        if self.schedule.epoch_due(epoch):
            self.record(int(trainer.global_step), {"epoch": epoch})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.stop()
