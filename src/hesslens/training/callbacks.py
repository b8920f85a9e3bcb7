"""The trainer's callbacks: what :func:`hesslens.training.train` calls, when, and with what.

A callback is any callable ``cb(epoch, record, model)``. The trainer calls it after each epoch
(``epoch`` 1-based) once the epoch is trained and evaluated, before the checkpoint; it may add
keys to ``record``, the epoch's metrics. Three optional members ask for more:

* ``start(run)``: called once before the first step, of a fresh run and of a resumed one, with
  the :class:`TrainingRun` (the model, the optimizer, the device, the ranks, the loss, the
  configuration and the analysis data);
* ``initial``: when true (read after ``start``), the callback is also called at epoch 0, before
  training, with a record of the validation and test numbers at initialisation;
* ``tracks_curvature``: when true, the callback does the curvature tracking that
  ``config.track_every > 0`` asks for. The trainer measures nothing itself: a configuration that
  asks for tracking with no such callback is refused (:func:`check_tracking`) rather than
  trained without it.

The curvature callbacks live in the analysis layer above the trainer
(:class:`hesslens.analysis.epoch_tracking.EpochTracking`,
:class:`hesslens.analysis.epoch_sharpness.EpochSharpness`); ``hesslens train`` wires them from
the configuration (:func:`hesslens.experiments.train.tracking_callbacks`).

Example:
    >>> from hesslens.training.config import TrainConfig
    >>> def note(epoch, record, model):
    ...     record["note"] = epoch
    >>> check_tracking(TrainConfig(track_every=0), [note])  # nothing asked for: fine
    >>> check_tracking(TrainConfig(track_every=1), [note])
    Traceback (most recent call last):
    ...
    hesslens.errors.TrackingCallbackError: config.track_every=1 asks for curvature tracking, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from hesslens.errors import HesslensInputError, TrackingCallbackError
from hesslens.parallel import Ranks, shard
from hesslens.splits import analysis_subset
from hesslens.training.config import TrainConfig

__all__ = ["Callback", "TrainingRun", "check_tracking", "initial_callbacks", "start_callbacks"]


class Callback(Protocol):
    """``cb(epoch, record, model)`` after each epoch; see the module docstring for the
    optional ``start(run)``, ``initial`` and ``tracks_curvature``."""

    def __call__(self, epoch: int, record: dict[str, Any], model: nn.Module) -> None: ...


@dataclass
class TrainingRun:
    """What a callback's ``start(run)`` is told about the run it follows.

    Attributes:
        model: the module being trained (on ``device``; not wrapped in DDP).
        optimizer: its optimizer (SAM where the arm has it).
        config: the run's :class:`~hesslens.training.config.TrainConfig`.
        train_inputs, train_targets: the data set's training part as given (validation split
            included), from which :attr:`analysis_data` is drawn.
        device: where the model and its data are.
        ranks: this process among the torch.distributed ones
            (:class:`~hesslens.parallel.Ranks`; one alone).
        loss_fn: the training loss, ``loss_fn(outputs, targets)`` -> mean.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    train_inputs: Tensor
    train_targets: Tensor
    device: torch.device
    ranks: Ranks
    loss_fn: Callable[..., Tensor]

    @cached_property
    def analysis_data(self) -> tuple[Tensor, Tensor]:
        """The fixed analysis data, drawn on first use: ``config.track_per_class`` training
        examples of every class (:func:`hesslens.splits.analysis_subset`, seed 0; the
        paper's 10 per class), this rank's shard of them under torch.distributed (the
        operators sum over the ranks), on ``device``."""
        xa, ya = analysis_subset(self.train_inputs, self.train_targets,
                                 per_class=self.config.track_per_class, seed=0)
        if len(ya) < self.ranks.world:
            raise HesslensInputError(
                f"the analysis subset has {len(ya)} examples, fewer than the "
                f"{self.ranks.world} processes; raise --track-per-class or use fewer processes")
        return shard(xa, self.ranks).to(self.device), shard(ya, self.ranks).to(self.device)


def check_tracking(config: TrainConfig, callbacks: Sequence[Callback]) -> None:
    """Refuse a configuration that asks for curvature tracking (``track_every > 0``) when no
    callback does it (none has a true ``tracks_curvature``), naming the callbacks to pass."""
    if config.track_every <= 0 or any(getattr(cb, "tracks_curvature", False)
                                      for cb in callbacks):
        return
    what, name = (("per-layer trace and top eigenvalue", "epoch_tracking.EpochTracking")
                  if config.track_layers else
                  ("sharpness against the optimizer's threshold",
                   "epoch_sharpness.EpochSharpness"))
    raise TrackingCallbackError(
        f"config.track_every={config.track_every} asks for curvature tracking, which the "
        f"trainer leaves to a callback: pass callbacks=[{name.split('.')[1]}()] (from "
        f"hesslens.analysis.{name.split('.')[0]}; the {what}, every track_every epochs), "
        "or train with hesslens.experiments.train.train_zoo, which wires it, or set "
        "track_every=0")


def start_callbacks(callbacks: Sequence[Callback], run: TrainingRun) -> None:
    """Call ``start(run)`` on every callback that has it."""
    for cb in callbacks:
        start = getattr(cb, "start", None)
        if callable(start):
            start(run)


def initial_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    """The callbacks that ask to be called at epoch 0, before training (a true ``initial``,
    read after ``start``)."""
    return [cb for cb in callbacks if getattr(cb, "initial", False)]
