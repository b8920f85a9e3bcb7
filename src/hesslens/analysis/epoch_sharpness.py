"""The sharpness against the edge of stability after every N epochs of the trainer of
``hesslens train``: :class:`EpochSharpness`, the cheap default of its curvature tracking.

It is a trainer callback (``cb(epoch, record, model)``, with ``bind(model, optimizer)`` before
the first step) around a :class:`~hesslens.analysis.sharpness.SharpnessRecorder` on the fixed
analysis subset: warm-started, on one operator reloaded at each record, a few products an
epoch. It adds to the epoch's record ``sharpness``, ``threshold`` (the optimizer's, e.g.
``(2 + 2 momentum) / lr``), ``sharpness_ratio``, ``directional_sharpness`` (along the last
step), ``gradient_share``, ``sharpness_n_hvp``, and its time to ``tracking_seconds``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> cb = EpochSharpness(x, y, every=1)
    >>> cb.bind(model, opt)
    >>> opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> record = {"epoch": 1}
    >>> cb(1, record, model)
    >>> round(record["threshold"], 6), record["sharpness"] > 0
    (38.0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.analysis.sharpness import SharpnessRecorder
from hesslens.checks import check_positive_int
from hesslens.errors import HesslensInputError

__all__ = ["EpochSharpness"]

# record key <- monitor key
_KEYS = {"sharpness": "sharpness", "threshold": "threshold", "sharpness_ratio": "ratio",
         "preconditioned_sharpness": "preconditioned_sharpness",
         "directional_sharpness": "directional_sharpness", "gradient_share": "gradient_share",
         "sharpness_n_hvp": "n_hvp"}


class EpochSharpness:
    """Record the sharpness on ``(inputs, targets)`` after epochs ``every, 2 every, ...`` and
    ``last_epoch``.

    Args:
        inputs, targets: the fixed analysis subset (each rank's shard under torchrun).
        every: record after every ``every``-th epoch (1-based).
        loss_fn: defaults to mean cross-entropy.
        last_epoch: also record after this epoch.
        **options: :class:`~hesslens.analysis.sharpness.SharpnessRecorder`'s options
            (``tol``, ``seed``, ...).
    """

    def __init__(self, inputs: Tensor, targets: Tensor, every: int = 1,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 last_epoch: int | None = None, **options: Any) -> None:
        self.inputs, self.targets = inputs, targets
        self.every = check_positive_int(every, "every")
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.last_epoch = last_epoch
        self.options = options
        self.monitor: SharpnessRecorder | None = None

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Follow ``model`` trained by ``optimizer`` (called by the trainer before the first
        step)."""
        if self.monitor is not None:
            self.monitor.close()
        device = next(model.parameters()).device
        self.monitor = SharpnessRecorder(
            model, self.loss_fn, (self.inputs.to(device), self.targets.to(device)), optimizer,
            every=1, **self.options)

    def due(self, epoch: int) -> bool:
        return epoch > 0 and (epoch % self.every == 0 or epoch == self.last_epoch)

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None:
        """Trainer callback: if due, add the sharpness to ``record``."""
        if not self.due(epoch):
            return
        if self.monitor is None:
            raise HesslensInputError("EpochSharpness records only after bind(model, optimizer)")
        rec = self.monitor.record(epoch)
        for key, source in _KEYS.items():
            if rec.get(source) is not None:
                record[key] = rec[source]
        record["tracking_seconds"] = float(record.get("tracking_seconds") or 0.0) + rec[
            "seconds"]
