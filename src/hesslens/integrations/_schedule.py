"""What the framework callbacks share: when to record, and the analysis data on the model's
device. No framework is imported here.

Example:
    >>> s = Schedule(every_n_steps=2, every_n_epochs=None)
    >>> [n for n in range(1, 7) if s.step_due(n)], s.epoch_due(1)
    ([2, 4, 6], False)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.training.tracker import CurvatureTracker

__all__ = ["Schedule", "TrackerCallbackBase", "to_device"]


def _check(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HesslensInputError(f"{name} must be a positive integer or None, got {value!r}")
    return value


class Schedule:
    """Record every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs`` epochs
    (neither given: every epoch)."""

    def __init__(self, every_n_steps: int | None, every_n_epochs: int | None) -> None:
        self.every_n_steps = _check("every_n_steps", every_n_steps)
        self.every_n_epochs = _check("every_n_epochs", every_n_epochs)
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


class TrackerCallbackBase:
    """The state of a framework callback: its schedule, its options and, from the start of
    training, its :class:`CurvatureTracker`."""

    def __init__(self, data: Any, every_n_steps: int | None, every_n_epochs: int | None,
                 out: str | Path | None, loss_fn: Any, at_start: bool,
                 tracker_options: dict[str, Any]) -> None:
        self.data = data
        self.schedule = Schedule(every_n_steps, every_n_epochs)
        self.out = out
        self.loss_fn = loss_fn
        self.at_start = bool(at_start)
        bad = sorted(set(tracker_options) & {"model", "loss_fn", "data", "out", "every"})
        if bad:
            raise HesslensInputError(
                f"{bad} are set by the callback; pass data, loss_fn and out to it directly")
        self.tracker_options = tracker_options
        self.tracker: CurvatureTracker | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The records so far (:attr:`CurvatureTracker.history`)."""
        return [] if self.tracker is None else self.tracker.history

    def start(self, model: nn.Module, write: bool) -> None:
        """Make the tracker for ``model`` (files only where ``write``: the main process)."""
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        self.stop()  # a tracker of an earlier run gives back the folder's lock first
        self.tracker = CurvatureTracker(model, self.loss_fn, to_device(self.data, device),
                                        out=self.out if write else None, every=1,
                                        **self.tracker_options)

    def stop(self) -> None:
        """At the end of training: the tracker gives back the lock of ``out``."""
        if self.tracker is not None:
            self.tracker.close()

    def record(self, step: int, info: Mapping[str, Any]) -> None:
        """Record at ``step`` unless this step already has its record."""
        if self.tracker is None:
            raise HesslensInputError("the callback records only once training has started")
        if self.tracker.history and self.tracker.history[-1]["step"] == step:
            return
        self.tracker.record(step, info=info)

    def write_report(self, folder: str | Path) -> Path:
        """:meth:`CurvatureTracker.write_report` of the records so far."""
        if self.tracker is None:
            raise HesslensInputError("nothing recorded yet: train first")
        return self.tracker.write_report(folder)
