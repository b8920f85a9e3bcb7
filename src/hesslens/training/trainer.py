"""The training loop: SGD with momentum, plus optional L2, Hessian-trace penalty (HTR) and SAM.

``train(config, out_dir, model=model, dataset=data)`` trains the module ``model`` on ``data``
(any object with ``x_train, y_train, x_test, y_test, num_classes``, e.g. :class:`TensorData`)
and writes into ``out_dir``. It builds nothing by name: training a zoo model on a zoo data set
by their names is :func:`hesslens.experiments.train.train_zoo`'s job. The files:

* ``config.json``: the :class:`~hesslens.training.config.TrainConfig`;
* ``metrics.json`` / ``metrics.csv``: one record per epoch (rewritten atomically after every
  epoch): ``epoch`` (1-based), ``lr``, ``train_loss``, ``train_acc`` (running averages over the
  epoch, in train mode), ``val_loss``, ``val_acc``, ``test_loss``, ``test_acc`` (eval mode, after
  the epoch), ``htr_penalty`` (mean penalty value ``tr`` estimate over the steps it was applied,
  before multiplying by gamma) and ``htr_steps``, ``epoch_seconds`` (the training loop's wall
  time), ``eval_seconds`` and whatever the callbacks add: the curvature tracking's keys
  (:mod:`hesslens.analysis.epoch_tracking`, :mod:`hesslens.analysis.epoch_sharpness`). Where a
  callback asks for epoch 0 (per-layer tracking does), a first record ``epoch`` 0 holds its keys
  and the validation and test numbers at initialisation (no training keys). With tracking,
  ``metrics.json`` has ``tracking``: ``{"seconds", "training_seconds", "fraction"}``, what the
  tracking cost in all against the training loop's time;
* ``checkpoint.pt``: model, optimizer, scheduler, penalty-probe generator, global RNG states,
  epoch, step and the metrics so far, after every epoch, atomically, with a checksum of its
  content; read with ``torch.load(weights_only=True)``, and checked in full before a run
  resumes from it (:mod:`hesslens.training.checkpoint`).

While a run writes into its folder it holds the folder's lock (``.hesslens.lock``,
:mod:`hesslens.locks`), so two runs can never mix their files there.

The run in named parts: the set-up (:func:`hesslens.training.setup.set_up`: seeds, data split,
model, optimizer, schedule, penalty), the callbacks' start (:mod:`hesslens.training.callbacks`),
the resume (:func:`hesslens.training.resume.resume_run`), then per epoch its steps
(:func:`hesslens.training.epoch.train_epoch`), the evaluation
(:func:`hesslens.training.evaluation.evaluate_held_out`), the record
(:func:`hesslens.training.metrics.epoch_record`), the callbacks and the checkpoint
(:func:`hesslens.training.resume.save_epoch`).

Determinism and resume. The data order of epoch ``e`` is a permutation drawn from a
``torch.Generator`` seeded with a hash of ``(seed, e)``, so it does not depend on anything that
happened before; everything else that is random (probes, dropout) is restored from the
checkpoint. ``train(config, out_dir, model=..., dataset=..., resume=True)`` after a kill (with
a model of the same architecture: the checkpoint replaces its weights) therefore ends with the
same weights and the same metrics (except wall times) as the uninterrupted run, bit for bit on
the same device and software.

Data parallel (``torchrun``; :mod:`hesslens.parallel`). With ``torch.distributed``
initialised, every rank draws the same epoch permutation and takes its contiguous piece of each
global batch of ``batch_size`` examples; each rank's local mean loss (and penalty) is weighted by
its share ``n_local / n_global`` and the gradients are summed over the ranks: by
``DistributedDataParallel`` on plain steps, by one all-reduce on the unwrapped module on
penalised steps (the penalty differentiates with ``autograd.grad``, which DDP's hooks do not see:
pytorch/pytorch#47562) and on a last batch smaller than the world. So a run of ``W`` ranks is
the single-process run on the same batches (tests/training/test_ddp_training.py: every arm,
float64, parameters within 1e-12 after two epochs; finite-difference HTR 1e-9), up to rounding.
The penalty of the global batch is the weighted mean of the ranks' penalties with the same
probe: ``H = sum_r (n_r / N) H_r``, so ``v^T H v = sum_r (n_r / N) v^T H_r v`` (probes are
seeded alike on every rank); so is the Fisher penalty. ``curvature="gauss_newton"`` draws its
output-space probes for each rank's piece, so it equals one process in expectation, not per
draw. Models with BatchNorm normalise with each rank's piece (DDP's usual behaviour) and keep
rank 0's running statistics (broadcast after every epoch, so evaluation, tracking and the
checkpoint see one model): the equality holds for models without batch statistics.
Validation, test and tracking each rank does on its piece, with the sums all-reduced. Rank 0
alone writes ``config.json``, ``metrics.*`` and the checkpoint (with every rank's random-number
state; ``--out`` must be a folder all ranks see); on resume every rank loads it. ``metrics.json``
records ``parallel``: ``{"world_size", "backend"}``. Callbacks run on every rank.

BatchNorm. The model is put in train mode at the start of every epoch (all arms) and in eval mode
for evaluation and tracking. (The paper's code called ``model.train()`` once before the loop and
``model.eval()`` for testing, so from the second epoch on its BatchNorm layers trained in eval
mode; that is not copied.) With SAM the perturbed second forward pass leaves the running
statistics alone (:func:`hesslens.training.sam.bn_stats_frozen`).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from hesslens.training import TensorData, TrainConfig, train
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 5, generator=g); y = (x[:, 0] > 0).long()
    >>> data = TensorData(x[:48], y[:48], x[48:], y[48:], num_classes=2)
    >>> model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> cfg = TrainConfig(model="my-mlp", data="my-data", epochs=2, batch_size=16, lr=0.1,
    ...                   val_fraction=0.25, htr_gamma=1e-3)
    >>> result = train(cfg, tempfile.mkdtemp(), model=model, dataset=data, progress=False)
    >>> len(result["epochs"]), sorted(result["final"])[:3]
    (2, ['epoch', 'epoch_seconds', 'eval_seconds'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.files import remove_stale_temporaries, write_json
from hesslens.parallel import Ranks, current, env_world_size, folder_lock
from hesslens.training.callbacks import (
    Callback,
    TrainingRun,
    check_tracking,
    initial_callbacks,
    start_callbacks,
)
from hesslens.training.config import TrainConfig, arm_label
from hesslens.training.epoch import epoch_seed, progress_bar, train_epoch
from hesslens.training.evaluation import evaluate, evaluate_held_out
from hesslens.training.metrics import (
    METRICS_CSV,
    METRICS_JSON,
    TIMING_KEYS,
    epoch_record,
    initial_record,
    tracking_cost,
    write_metrics,
)
from hesslens.training.resume import CHECKPOINT, check_new_run, resume_run, save_epoch
from hesslens.training.setup import (
    RunSetup,
    TensorData,
    build_optimizer,
    build_scheduler,
    check_objects,
    set_up,
)

__all__ = ["CHECKPOINT", "CONFIG_JSON", "METRICS_CSV", "METRICS_JSON", "TIMING_KEYS",
           "TensorData", "build_optimizer", "build_scheduler", "epoch_seed", "evaluate",
           "tracking_cost", "train"]

CONFIG_JSON = "config.json"


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    model: nn.Module | None = None,
    dataset: Any = None,
    progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` as ``config`` says; return ``{"config", "arm", "epochs":
    [records], "final": record, "tracking": cost or None, "out_dir", "parallel"}``.

    The trainer takes the objects it trains: it builds no model and loads no data. To train a
    zoo model on a zoo data set by their names, use
    :func:`hesslens.experiments.train.train_zoo` (what ``hesslens train`` runs; it also wires
    the curvature tracking that ``config.track_*`` asks for).

    Args:
        config: how to train (validated here). ``config.model`` and ``config.data`` are the
            labels the run is recorded under (``config.json``; a resume must repeat them).
        out_dir: where the run's files go (created). A folder that already holds a run is
            refused unless ``resume=True``. The folder is locked for the run
            (:mod:`hesslens.locks`): a second run into it gets an
            :class:`~hesslens.errors.OutputLockedError` at once; a run that fails before
            writing anything removes the folder it created.
        model: the module to train (required), moved to ``config.device``. To resume, pass a
            module of the same architecture: its weights are replaced by the checkpoint's.
        dataset: the data (required): any object with ``x_train, y_train, x_test, y_test``
            (tensors, integer labels) and ``num_classes``, e.g. :class:`TensorData` or a
            ``hesslens.zoo.Dataset``. ``config.val_fraction`` of the training part is held out
            (:func:`hesslens.splits.split_train_val`); the callbacks' analysis data is
            :func:`hesslens.splits.analysis_subset` of it.
        progress: tqdm bars (only when stderr is a terminal).
        resume: continue from ``out_dir/checkpoint.pt`` (with an identical config, device and
            data folder aside); without a checkpoint the run starts from scratch. The
            checkpoint is checked in full first (checksum, structure, shapes against the model,
            epoch, random states: :func:`hesslens.training.checkpoint.load_checkpoint`); a bad
            one is a :class:`~hesslens.errors.CheckpointError` and the folder is left as it
            was.
        callbacks: each ``cb(epoch, record, model)``, called in order after each epoch's
            training and evaluation, before the files are written (they may add keys to
            ``record``); an exception from a callback stops the run, and the previous epoch's
            checkpoint stays valid. Optionally (:mod:`hesslens.training.callbacks`): a
            ``start(run)`` method, called before the first step with a
            :class:`~hesslens.training.callbacks.TrainingRun` (model, optimizer, config,
            device, ranks, loss, analysis data); a true ``initial``, to be called at epoch 0
            before training too; a true ``tracks_curvature``, for the callback that does the
            tracking ``config.track_every > 0`` asks for:
            ``callbacks=[hesslens.analysis.epoch_tracking.EpochTracking()]`` (per layer) or
            ``[hesslens.analysis.epoch_sharpness.EpochSharpness()]`` (the sharpness), which
            read ``track_every``, ``track_densities`` and the analysis data from the run.

    Raises:
        HesslensInputError: no model or no dataset given, a bad config, data or output folder;
            its subclasses :class:`~hesslens.errors.OutputLockedError` (another run writes into
            ``out_dir``), :class:`~hesslens.errors.CheckpointError` (a checkpoint to resume
            that is corrupted or does not fit) and
            :class:`~hesslens.errors.TrackingCallbackError` (``config.track_every > 0`` with no
            callback that tracks).
    """
    if not isinstance(config, TrainConfig):
        raise HesslensInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    check_objects(model, dataset)
    config = dataclasses.replace(config).validate()
    callbacks = list(callbacks)
    check_tracking(config, callbacks)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HesslensInputError(f"--out {str(out)!r} exists and is not a folder")
    check_new_run(out, resume)  # early, before any work; again in the lock
    ranks = current()
    if not ranks.distributed and env_world_size() > 1:
        raise HesslensInputError(
            f"started by torchrun with WORLD_SIZE={env_world_size()} but torch.distributed is "
            "not initialised, so every process would train the whole run into the same folder; "
            "call torch.distributed.init_process_group() first (or train inside "
            "hesslens.parallel.process_group_from_env()), or unset WORLD_SIZE for "
            "independent runs")
    what = f"a training run of {config.model} on {config.data}, seed {config.seed}"
    with folder_lock(out, what, ranks):  # rank 0 holds it; created here
        return _train_in_folder(config, out, ranks, model=model, dataset=dataset,
                                progress=progress, resume=resume, callbacks=callbacks)


def _train_in_folder(
    config: TrainConfig, out: Path, ranks: Ranks, *, model: nn.Module, dataset: Any,
    progress: bool, resume: bool, callbacks: Sequence[Callback],
) -> dict[str, Any]:
    """:func:`train` in its output folder, locked by rank 0 (checked again inside the lock:
    another run may have started there meanwhile)."""
    check_new_run(out, resume)
    setup = set_up(config, ranks, model, dataset)
    start_callbacks(callbacks, _training_run(setup))
    start_epoch, global_step, records = resume_run(setup, out, resume)
    if ranks.is_main:
        remove_stale_temporaries(out)  # left by a kill during an atomic write
        write_json(out / CONFIG_JSON, config.to_dict())
    first = initial_callbacks(callbacks)
    if first and start_epoch == 0 and not records:
        # Epoch 0: kept with the first checkpoint; a run killed before that starts again here.
        records.append(_epoch_zero(setup, first))

    progress = progress and ranks.is_main
    bar = progress_bar(progress, total=config.epochs, initial=start_epoch,
                       desc=arm_label(config), unit="epoch")
    try:
        for epoch in range(start_epoch, config.epochs):
            totals, global_step = train_epoch(setup, epoch, global_step, progress)
            held_out, eval_seconds = evaluate_held_out(setup)
            record = epoch_record(epoch, totals, len(setup.splits.y_train), held_out,
                                  eval_seconds)
            for cb in callbacks:
                cb(epoch + 1, record, setup.model)
            setup.model.train()
            records.append(record)
            save_epoch(setup, out, epoch + 1, global_step, records)
            bar.set_postfix(train_acc=f"{record['train_acc']:.3f}",
                            test_acc=f"{record['test_acc']:.3f}")
            bar.update(1)
    finally:
        bar.close()
    if not records and ranks.is_main:
        write_metrics(out, config, records, setup.provenance)
    return {
        "config": config.to_dict(),
        "arm": arm_label(config),
        "epochs": records,
        "final": records[-1] if records else {},
        "tracking": tracking_cost(records),
        "out_dir": str(out),
        "parallel": ranks.record(),
    }


def _training_run(setup: RunSetup) -> TrainingRun:
    """What the callbacks' ``start(run)`` is told of the run."""
    return TrainingRun(model=setup.model, optimizer=setup.optimizer, config=setup.config,
                       train_inputs=setup.dataset.x_train, train_targets=setup.dataset.y_train,
                       device=setup.device, ranks=setup.ranks, loss_fn=setup.loss_fn)


def _epoch_zero(setup: RunSetup, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """The record at initialisation: the held-out numbers, then the callbacks that ask for
    epoch 0 (the curvature at initialisation)."""
    held_out, eval_seconds = evaluate_held_out(setup)
    record = initial_record(float(setup.scheduler.get_last_lr()[0]), held_out, eval_seconds)
    for cb in callbacks:
        cb(0, record, setup.model)
    setup.model.train()
    return record
