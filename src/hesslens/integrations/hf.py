"""Curvature during ``transformers.Trainer`` training: :class:`CurvatureCallback`.

The callback records with :class:`hesslens.CurvatureTracker` on fixed analysis batches (a list
of mappings such as ``{"input_ids": ..., "labels": ...}``, called as ``model(**batch)``), with
the model's own loss (``loss_fn=None``: ``output.loss``) unless you pass one, in eval mode
(dropout off; the mode is restored afterwards). Only the main process
(``state.is_world_process_zero``) writes files. Importing this module imports
``transformers`` (``pip install hesslens[hf]``).

With ``sharpness=True`` it records with :class:`hesslens.SharpnessMonitor` instead: the
sharpness against the edge of stability of the Trainer's own optimizer (found in the callback
arguments, accelerate's wrapper taken off; AdamW by default: the preconditioned sharpness
against ``38 / lr``, the learning rate read after the scheduler's step), a few products a
record. Each record's numbers (``hesslens/sharpness``, ``hesslens/threshold``,
``hesslens/ratio``, ...) go to the Trainer's loggers (TensorBoard, W&B, MLflow: whatever
``report_to`` names) and to ``state.log_history``, as ``Trainer.log`` would send them:
a callback has no ``Trainer.log`` of its own, so it sends an ``on_log`` event through the
Trainer's callback handler (the object that calls it), keeping the Trainer's own
``should_log`` decision.

Example:
    >>> import tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    >>> from hesslens.integrations.hf import CurvatureCallback
    >>> _ = torch.manual_seed(0)
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
    ...                                    n_positions=8))
    >>> ids = torch.randint(0, 20, (8, 6))
    >>> train_set = [{"input_ids": i, "labels": i} for i in ids]
    >>> probe = [{"input_ids": ids[:4], "labels": ids[:4]}]
    >>> callback = CurvatureCallback(probe, every_n_steps=2, layers=False, trace=False)
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4,
    ...                          report_to=[], use_cpu=True, save_strategy="no",
    ...                          disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=train_set,
    ...                   callbacks=[callback])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...}
    >>> [r["step"] for r in callback.history]
    [2, 4]
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from hesslens.integrations._schedule import TrackerCallbackBase

__all__ = ["CurvatureCallback"]


def _calling_handler(callback: Any, depth: int = 4) -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` that is calling ``callback`` now (found among the
    callers' frames), or ``None``."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(
                    cb is callback for cb in owner.callbacks):
                return owner
        return None
    finally:
        del frame


class CurvatureCallback(TrackerCallbackBase, TrainerCallback):
    """A ``transformers.TrainerCallback`` that records curvature during training.

    Args:
        data: the fixed analysis batches (mappings for ``model(**batch)``, or anything
            :class:`hesslens.Hessian` accepts); moved to the model's device at the start.
        every_n_steps: record after every n-th optimizer step (``state.global_step``).
        every_n_epochs: record after every n-th epoch (neither given: every epoch).
        out: folder for the history files (main process only).
        loss_fn: ``None`` (default) for the model's own loss, or ``loss_fn(outputs, batch)``.
        at_start: also record before the first step (step 0).
        sharpness: record with :class:`hesslens.SharpnessMonitor` and log to the Trainer's
            loggers (see the module docstring) instead of the curvature tracker.
        **options: :class:`hesslens.CurvatureTracker`'s options (``layers``, ``k``,
            ``trace``, ``density``, ``similarity``, ``seed``, ...), or with ``sharpness=True``
            the monitor's (``k``, ``tol``, ``seed``, ``warm_start``, ``direction``, ...).

    Attributes:
        history: the records (``{"step", "epoch", ...}`` and the tracker's or the monitor's
            keys).
    """

    def __init__(self, data: Any, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, out: str | Path | None = None, *,
                 loss_fn: Any = None, at_start: bool = False, sharpness: bool = False,
                 **options: Any) -> None:
        TrackerCallbackBase.__init__(self, data, every_n_steps, every_n_epochs, out, loss_fn,
                                     at_start, options, sharpness=sharpness)
        self._handler: Any = None
        self._warned = False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        handler = _calling_handler(self)
        self._handler = None if handler is None else weakref.ref(handler)
        self.start(model, write=bool(state.is_world_process_zero), optimizer=optimizer)
        if self.at_start:
            self._record(args, state, control)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.expect_step(int(state.global_step) + 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule.step_due(int(state.global_step)):
            self._record(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = round(float(state.epoch or 0.0))
        if self.schedule.epoch_due(epoch):
            self._record(args, state, control)

    def _record(self, args: Any, state: Any, control: Any) -> None:
        rec = self.record(int(state.global_step), {"epoch": float(state.epoch or 0.0)})
        if rec is not None and self.sharpness:
            self._log(args, state, control, self.log_values(rec))

    def _log(self, args: Any, state: Any, control: Any, logs: dict[str, float]) -> None:
        """What ``Trainer.log`` does with ``logs``: into ``state.log_history`` and to every
        callback's ``on_log`` (the reporting integrations among them)."""
        if not logs:
            return
        state.log_history.append({**logs, "step": state.global_step})
        handler = self._handler() if self._handler is not None else None
        if handler is None:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    "CurvatureCallback(sharpness=True) could not reach the Trainer's callback "
                    "handler, so the loggers do not get the sharpness; it is in "
                    "callback.history and trainer.state.log_history", stacklevel=2)
            return
        should_log = control.should_log  # the Trainer's own decision for this step
        handler.on_log(args, state, control, logs)
        control.should_log = should_log

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        return None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()
