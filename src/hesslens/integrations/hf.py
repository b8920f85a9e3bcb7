"""Curvature during ``transformers.Trainer`` training: :class:`CurvatureCallback`.

The callback records with :class:`hesslens.CurvatureTracker` on fixed analysis batches (a list
of mappings such as ``{"input_ids": ..., "labels": ...}``, called as ``model(**batch)``), with
the model's own loss (``loss_fn=None``: ``output.loss``) unless you pass one, in eval mode
(dropout off; the mode is restored afterwards). Only the main process
(``state.is_world_process_zero``) writes files. Importing this module imports
``transformers`` (``pip install hesslens[hf]``).

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

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hesslens.integrations._schedule import TrackerCallbackBase

__all__ = ["CurvatureCallback"]


class CurvatureCallback(TrackerCallbackBase, TrainerCallback):
    """A ``transformers.TrainerCallback`` that records curvature during training.

    Args:
        data: the fixed analysis batches (mappings for ``model(**batch)``, or anything
            :class:`hesslens.Hessian` accepts); moved to the model's device at the start.
        every_n_steps: record after every n-th optimizer step (``state.global_step``).
        every_n_epochs: record after every n-th epoch (neither given: every epoch).
        out: folder for ``curvature.json`` / ``curvature.csv`` (main process only).
        loss_fn: ``None`` (default) for the model's own loss, or ``loss_fn(outputs, batch)``.
        at_start: also record before the first step (step 0).
        **tracker_options: :class:`hesslens.CurvatureTracker`'s options (``layers``, ``k``,
            ``trace``, ``density``, ``similarity``, ``seed``, ...).

    Attributes:
        history: the records (``{"step", "epoch", "full", "layers", "seconds", ...}``).
    """

    def __init__(self, data: Any, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, out: str | Path | None = None, *,
                 loss_fn: Any = None, at_start: bool = False, **tracker_options: Any) -> None:
        TrackerCallbackBase.__init__(self, data, every_n_steps, every_n_epochs, out, loss_fn,
                                     at_start, tracker_options)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        self.start(model, write=bool(state.is_world_process_zero))
        if self.at_start:
            self.record(int(state.global_step), {"epoch": float(state.epoch or 0.0)})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.schedule.step_due(int(state.global_step)):
            self.record(int(state.global_step), {"epoch": float(state.epoch or 0.0)})

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = round(float(state.epoch or 0.0))
        if self.schedule.epoch_due(epoch):
            self.record(int(state.global_step), {"epoch": float(state.epoch or 0.0)})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()
