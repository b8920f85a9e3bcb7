"""The sharpness against the edge of stability after every N epochs of the trainer of
``hesslens train``: :class:`EpochSharpness`, the cheap default of its curvature tracking.

It is a trainer callback (:mod:`hesslens.training.callbacks`: ``cb(epoch, record, model)``,
with ``start(run)`` before the first step) around a
:class:`~hesslens.analysis.sharpness.SharpnessRecorder` on the fixed analysis subset:
warm-started, on one operator reloaded at each record, a few products an epoch. It adds to the
epoch's record ``sharpness``, ``threshold`` (the optimizer's, e.g. ``(2 + 2 momentum) / lr``),
``sharpness_ratio``, ``directional_sharpness`` (along the last step), ``gradient_share``,
``sharpness_n_hvp``, and its time to ``tracking_seconds``.

Settings left ``None`` come from the run at ``start(run)``: ``every`` from
``config.track_every``, ``last_epoch`` from ``config.epochs``, the loss from the trainer's, the
data from its analysis subset (this rank's shard under torchrun).

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> cb = EpochSharpness(x, y, every=1)
    >>> cb.start(SimpleNamespace(model=model, optimizer=opt, device=torch.device("cpu"),
    ...                          loss_fn=nn.functional.cross_entropy))  # as the trainer does
    >>> opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> record = {"epoch": 1}
    >>> cb(1, record, model)
    >>> round(record["threshold"], 6), record["sharpness"] > 0
    (38.0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
    """Record the sharpness after epochs ``every, 2 every, ...`` and ``last_epoch``, on the
    run's analysis data (or on ``(inputs, targets)``).

    Args:
        inputs, targets: the fixed data to measure on (each rank's shard under torchrun);
            ``None``: the run's analysis subset, given by ``start(run)``.
        every: record after every ``every``-th epoch (1-based); ``None``: the run's
            ``config.track_every`` (0 there: never).
        loss_fn: ``None``: the trainer's loss.
        last_epoch: also record after this epoch; ``None``: the run's last one.
        **options: :class:`~hesslens.analysis.sharpness.SharpnessRecorder`'s options
            (``tol``, ``seed``, ...).
    """

    #: It does the tracking that ``config.track_every > 0`` asks the trainer for.
    tracks_curvature = True

    def __init__(self, inputs: Tensor | None = None, targets: Tensor | None = None,
                 every: int | None = None,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 last_epoch: int | None = None, **options: Any) -> None:
        if (inputs is None) != (targets is None):
            raise HesslensInputError(
                "give both inputs and targets (the data to measure on), or neither (the "
                "run's analysis subset)")
        self.inputs, self.targets = inputs, targets
        self.every = None if every is None else check_positive_int(every, "every")
        self.loss_fn = loss_fn
        self.last_epoch = last_epoch
        self.options = options
        self.monitor: SharpnessRecorder | None = None
        self._every, self._last = self.every, last_epoch

    def start(self, run: Any) -> None:
        """Follow ``run.model`` trained by ``run.optimizer`` (``run``: a
        :class:`hesslens.training.callbacks.TrainingRun`, given by the trainer before the
        first step); settings left ``None`` come from it."""
        if self.monitor is not None:
            self.monitor.close()
        config = getattr(run, "config", None)
        self._every = self.every if self.every is not None or config is None else (
            config.track_every)
        self._last = self.last_epoch if self.last_epoch is not None or config is None else (
            config.epochs)
        if self.inputs is not None:
            data = (self.inputs.to(run.device), self.targets.to(run.device))
        else:
            data = run.analysis_data
        self.monitor = SharpnessRecorder(
            run.model, self.loss_fn or run.loss_fn, data, run.optimizer, every=1,
            **self.options)

    def due(self, epoch: int) -> bool:
        every = self._every if self._every is not None else 1
        return epoch > 0 and every > 0 and (epoch % every == 0 or epoch == self._last)

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None:
        """Trainer callback: if due, add the sharpness to ``record``."""
        if not self.due(epoch):
            return
        if self.monitor is None:
            raise HesslensInputError(
                "EpochSharpness records only after start(run), which the trainer calls "
                "before the first step")
        rec = self.monitor.record(epoch)
        for key, source in _KEYS.items():
            if rec.get(source) is not None:
                record[key] = rec[source]
        record["tracking_seconds"] = float(record.get("tracking_seconds") or 0.0) + rec[
            "seconds"]
