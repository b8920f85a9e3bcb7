"""What the framework callbacks share: when to record, the analysis data on the model's device,
the tracker or sharpness monitor, and the numbers sent to the framework's loggers. No framework
is imported here.

Example:
    >>> s = Schedule(every_n_steps=2, every_n_epochs=None)
    >>> [n for n in range(1, 7) if s.step_due(n)], s.epoch_due(1)
    ([2, 4, 6], False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslens.analysis.sharpness import SCALARS
from hesslens.analysis.thresholds import stability_rule, unwrap_optimizer
from hesslens.checks import check_optional_positive_int
from hesslens.errors import HesslensInputError
from hesslens.report.sharpness import SharpnessMonitor
from hesslens.report.tracking import CurvatureTracker

__all__ = ["MONITOR_OPTIONS", "Schedule", "TrackerCallbackBase", "to_device"]


class Schedule:
    """Record every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs
    (neither given: every epoch)."""

    def __init__(self, every_n_steps: int | None, every_n_epochs: int | None) -> None:
        self.every_n_steps = check_optional_positive_int(every_n_steps, "every_n_steps")
        self.every_n_epochs = check_optional_positive_int(every_n_epochs, "every_n_epochs")
        if self.every_n_steps is None and self.every_n_epochs is None:
            self.every_n_epochs = 1

    def step_due(self, global_step: int) -> bool:
        return self.every_n_steps is not None and global_step % self.every_n_steps == 0

    def epoch_due(self, epoch: int) -> bool:
        """``epoch``: 1-based number of the epoch just finished."""
        return self.every_n_epochs is not None and epoch % self.every_n_epochs == 0


def to_device(data: Any, device: torch.device) -> Any:
    """``data`` (a tensor, a mapping, a tuple or list of them, or a list of such batches) with
    every tensor moved to ``device``; other iterables (a DataLoader) are left as they are."""
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(to_device(v, device) for v in data)
    if isinstance(data, list):
        return [to_device(v, device) for v in data]
    return data


#: The options of the sharpness monitor a callback with ``sharpness=True`` passes on.
MONITOR_OPTIONS = ("k", "tol", "seed", "warm_start", "direction", "eval_mode",
                   "hessian_options")


class TrackerCallbackBase:
    """The state of a framework callback: its schedule, its options and, from the start of
    training, its :class:`CurvatureTracker` (or, with ``sharpness=True``, its
    :class:`~hesslens.report.sharpness.SharpnessMonitor`).

    Without ``sharpness``, a tracker record also gets the optimizer's ``lr`` and stability
    ``threshold`` (when the optimizer is found and its threshold bounds the plain sharpness,
    as for SGD), so that the tracker's report draws the top eigenvalue against it."""

    def __init__(self, data: Any, every_n_steps: int | None, every_n_epochs: int | None,
                 out: str | Path | None, loss_fn: Any, at_start: bool,
                 tracker_options: dict[str, Any], sharpness: bool = False) -> None:
        self.data = data
        self.schedule = Schedule(every_n_steps, every_n_epochs)
        self.out = out
        self.loss_fn = loss_fn
        self.at_start = bool(at_start)
        self.sharpness = bool(sharpness)
        bad = sorted(set(tracker_options) & {"model", "loss_fn", "data", "out", "every",
                                             "optimizer"})
        if bad:
            raise HesslensInputError(
                f"{bad} are set by the callback; pass data, loss_fn and out to it directly")
        if self.sharpness:
            other = sorted(set(tracker_options) - set(MONITOR_OPTIONS))
            if other:
                raise HesslensInputError(
                    f"{other} are options of the curvature tracker, not of the sharpness "
                    f"monitor (sharpness=True takes {', '.join(MONITOR_OPTIONS)}); leave them "
                    "out, or use two callbacks")
        self.tracker_options = tracker_options
        self.tracker: CurvatureTracker | SharpnessMonitor | None = None
        self.optimizer: Any = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The records so far (the tracker's or the monitor's ``history``)."""
        return [] if self.tracker is None else self.tracker.history

    def start(self, model: nn.Module, write: bool, optimizer: Any = None) -> None:
        """Make the tracker (or monitor) for ``model`` trained by ``optimizer`` (files only
        where ``write``: the main process)."""
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        self.stop()  # a tracker of an earlier run gives back the folder's lock first
        self.optimizer = None if optimizer is None else unwrap_optimizer(optimizer)
        data = to_device(self.data, device)
        out = self.out if write else None
        if self.sharpness:
            self.tracker = SharpnessMonitor(model, self.loss_fn, data, self.optimizer, every=1,
                                            out=out, **self.tracker_options)
        else:
            self.tracker = CurvatureTracker(model, self.loss_fn, data, out=out, every=1,
                                            **self.tracker_options)
        self._params = [p for p in model.parameters() if p.requires_grad]

    def stop(self) -> None:
        """At the end of training: the tracker gives back the lock of ``out``."""
        if self.tracker is not None:
            self.tracker.close()

    def record(self, step: int, info: Mapping[str, Any]) -> dict[str, Any] | None:
        """Record at ``step`` unless this step already has its record; return the record."""
        if self.tracker is None:
            raise HesslensInputError("the callback records only once training has started")
        if self.tracker.history and self.tracker.history[-1]["step"] == step:
            return None
        info = dict(info)
        if not self.sharpness and self.optimizer is not None:
            rule = stability_rule(self.optimizer, self._params, warn=False)
            if rule.compared == "sharpness" and rule.threshold is not None:
                info.update(lr=rule.lr, threshold=rule.threshold)
        return self.tracker.record(step, info=info)

    def expect_step(self, global_step: int) -> None:
        """Before optimizer step ``global_step``: the sharpness monitor keeps the parameters
        (for the update direction) only before a step a record follows by steps, or before
        every step where records also follow epochs."""
        if self.sharpness and isinstance(self.tracker, SharpnessMonitor):
            self.tracker.keep_next_step = (self.schedule.every_n_epochs is not None
                                           or self.schedule.step_due(global_step))

    @staticmethod
    def log_values(record: Mapping[str, Any]) -> dict[str, float]:
        """A sharpness record's numbers for a framework's loggers: ``{"hesslens/<key>":
        value}`` for the finite ones."""
        return {f"hesslens/{key}": float(record[key]) for key in SCALARS
                if isinstance(record.get(key), (int, float)) and not isinstance(
                    record.get(key), bool) and math.isfinite(record[key])}

    def write_report(self, folder: str | Path) -> Path:
        """The tracker's (or monitor's) ``write_report`` of the records so far."""
        if self.tracker is None:
            raise HesslensInputError("nothing recorded yet: train first")
        return self.tracker.write_report(folder)
