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
  time), ``eval_seconds`` and, when tracking, the curvature keys of
  :mod:`hesslens.training.tracking`. With tracking on, a first record ``epoch`` 0 holds the
  curvature and the validation and test numbers at initialisation (no training keys), and
  ``metrics.json`` has ``tracking``: ``{"seconds", "training_seconds", "fraction"}``, what the
  tracking cost in all against the training loop's time;
* ``checkpoint.pt``: model, optimizer, scheduler, penalty-probe generator, global RNG states,
  epoch, step and the metrics so far, after every epoch, atomically, with a checksum of its
  content; read with ``torch.load(weights_only=True)``, and checked in full before a run
  resumes from it (:mod:`hesslens.training.checkpoint`).

While a run writes into its folder it holds the folder's lock (``.hesslens.lock``,
:mod:`hesslens.locks`), so two runs can never mix their files there.

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

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hesslens.errors import CheckpointError, HesslensInputError
from hesslens.files import remove_stale_temporaries, to_jsonable, write_csv, write_json
from hesslens.parallel import (
    Ranks,
    all_gather_objects,
    barrier,
    broadcast_buffers,
    current,
    env_world_size,
    folder_lock,
    local_device,
    shard,
    shard_range,
    sum_across,
    sync_gradients,
)
from hesslens.provenance import dataset_fingerprint, versions
from hesslens.splits import analysis_subset, split_train_val
from hesslens.training.checkpoint import (
    CHECKPOINT_FORMAT,
    ResumeDiffersWarning,
    capture_rng_state,
    check_bit_exactness,
    check_fit,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from hesslens.training.config import TrainConfig, arm_label
from hesslens.training.penalty import HessianTracePenalty
from hesslens.training.sam import SAM, bn_stats_frozen
from hesslens.training.tracking import EpochTracking

__all__ = ["TensorData", "build_optimizer", "build_scheduler", "epoch_seed", "evaluate",
           "tracking_cost", "train"]

CHECKPOINT = "checkpoint.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"
TIMING_KEYS = ("epoch_seconds", "eval_seconds", "tracking_seconds")

Callback = Callable[[int, dict[str, Any], nn.Module], None]


@dataclass
class TensorData:
    """A data set in memory: the fields :func:`train` reads (``hesslens.zoo.Dataset`` has them
    too).

    >>> data = TensorData(torch.zeros(6, 3), torch.tensor([0, 1] * 3), torch.zeros(2, 3),
    ...                   torch.tensor([0, 1]), num_classes=2)
    >>> data.input_shape
    (3,)
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str = "tensors"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ---------------------------------------------------------------------- building blocks
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order: a hash of ``(seed, epoch)`` (63 bits)."""
    h = hashlib.blake2b(f"hesslens-data-order:{seed}:{epoch}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (and coupled weight decay); wrapped in SAM when ``sam_rho > 0``."""
    kwargs = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if config.sam_rho > 0:
        return SAM(params, torch.optim.SGD, rho=config.sam_rho, **kwargs)
    return torch.optim.SGD(params, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule (stepped once after every epoch)."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if config.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            base, milestones=config.milestones_or_default(), gamma=config.lr_gamma
        )
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(base, lr_lambda=_constant)


def _constant(epoch: int) -> float:
    return 1.0


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024
) -> tuple[float | None, float | None]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (``(None, None)`` if empty)."""
    if len(y) == 0:
        return None, None
    was = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for s in range(0, len(y), batch_size):
            out = model(x[s : s + batch_size])
            yb = y[s : s + batch_size]
            total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was)
    return total_loss / len(y), correct / len(y)


def _evaluate_shared(model: nn.Module, x: Tensor, y: Tensor,
                     ranks: Ranks) -> tuple[float | None, float | None]:
    """:func:`evaluate` alone; under torch.distributed each rank evaluates its piece and the
    sums are all-reduced (the same numbers on every rank)."""
    if not ranks.distributed:
        return evaluate(model, x, y)
    xs, ys = shard(x, ranks), shard(y, ranks)
    loss, acc = evaluate(model, xs, ys)
    n = len(ys)
    total_loss, correct, count = sum_across(
        [0.0 if loss is None else loss * n, 0.0 if acc is None else round(acc * n), n], ranks,
        device=y.device)
    if count == 0:
        return None, None
    return total_loss / count, correct / count


def _resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HesslensInputError(
            f"device {name!r} asked for, but CUDA is not available here; use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HesslensInputError(
            f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
            "CUDA device(s)"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise HesslensInputError(
            f"device {name!r} asked for, but MPS is not available here; use --device cpu"
        )
    return dev


def _check_data(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                num_classes: int, val_fraction: float) -> None:
    """Refuse data that would fail later with an obscure error or train on the wrong thing."""
    for split, x, y in (("training", x_train, y_train), ("test", x_test, y_test)):
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise HesslensInputError(
                f"the {split} inputs and labels must be tensors, got {type(x).__name__} and "
                f"{type(y).__name__}"
            )
        if len(x) != len(y):
            raise HesslensInputError(
                f"the {split} set has {len(x)} inputs but {len(y)} labels"
            )
        if len(y) == 0:
            raise HesslensInputError(f"the {split} set is empty")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise HesslensInputError(
                f"the {split} labels must be integer class indices, got dtype {y.dtype}"
            )
        if y.dim() != 1:
            raise HesslensInputError(
                f"the {split} labels must be one class index per example (shape (n,)), got "
                f"shape {tuple(y.shape)}"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise HesslensInputError(
                f"the {split} labels range over [{lo}, {hi}], outside the {num_classes} "
                f"classes [0, {num_classes - 1}]"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise HesslensInputError(f"the {split} inputs contain NaN or infinite values")
    if val_fraction > 0 and math.ceil(val_fraction * len(y_train)) >= len(y_train):
        raise HesslensInputError(
            f"val_fraction {val_fraction} of {len(y_train)} training examples leaves none to "
            "train on; lower it"
        )


DATA_FIELDS = ("x_train", "y_train", "x_test", "y_test", "num_classes")


def _check_objects(model: Any, dataset: Any) -> None:
    """Refuse a call without the model or the data, naming the two ways to give them."""
    missing = [name for name, obj in (("model", model), ("dataset", dataset)) if obj is None]
    if missing:
        raise HesslensInputError(
            f"train() needs {' and '.join(f'{m}=' for m in missing)}: pass the module to train "
            "as model= and the data as dataset= (e.g. hesslens.training.TensorData(x_train, "
            "y_train, x_test, y_test, num_classes)), or train a zoo model on a zoo data set by "
            "name with hesslens.experiments.train.train_zoo(config, out_dir)")
    if not isinstance(model, nn.Module):
        raise HesslensInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    absent = [f for f in DATA_FIELDS if not hasattr(dataset, f)]
    if absent:
        raise HesslensInputError(
            f"dataset has no {', '.join(absent)}: give an object with "
            f"{', '.join(DATA_FIELDS)}, e.g. hesslens.training.TensorData")


def _split(x: Tensor, y: Tensor, fraction: float, seed: int) -> tuple[Tensor, ...]:
    """The stratified validation split of :func:`hesslens.splits.split_train_val` (none at 0)."""
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    return split_train_val(x, y, val_fraction=fraction, seed=seed)


def _tqdm(progress: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    disable = not progress or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(disable=disable, **kwargs)


def _csv_columns(records: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in records:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            if k in ("density", "layer_density"):
                continue  # long lists: in metrics.json only
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    for k3, v3 in vv.items():
                        flat[f"{k}.{kk}.{k3}"] = v3
                else:
                    flat[f"{k}.{kk}"] = vv
        elif isinstance(v, (list, tuple)):
            continue
        else:
            flat[k] = v
    return flat


def tracking_cost(records: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """What curvature tracking cost over ``records``: ``{"seconds", "training_seconds",
    "fraction"}`` (tracking time over the training loops' time), or ``None`` without
    tracking."""
    tracked = [float(r["tracking_seconds"]) for r in records
               if r.get("tracking_seconds") is not None]
    if not tracked:
        return None
    training = sum(float(r["epoch_seconds"]) for r in records
                   if r.get("epoch_seconds") is not None)
    return {"seconds": sum(tracked), "training_seconds": training,
            "fraction": sum(tracked) / training if training > 0 else float("inf")}


def write_metrics(out_dir: Path, config: TrainConfig, records: Sequence[dict[str, Any]],
                  provenance: dict[str, Any] | None = None) -> None:
    """``metrics.json`` (config, arm label, records, tracking cost) and ``metrics.csv`` (flat),
    atomically."""
    doc: dict[str, Any] = {"config": config.to_dict(), "arm": arm_label(config),
                           "epochs": list(records)}
    cost = tracking_cost(records)
    if cost is not None and math.isfinite(cost["fraction"]):
        doc["tracking"] = cost
    doc.update(provenance or {})  # data fingerprint and versions
    write_json(out_dir / METRICS_JSON, doc)
    flat = [_flatten(r) for r in records]
    write_csv(out_dir / METRICS_CSV, flat, _csv_columns(flat))


def _data_parallel(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module | None:
    """``DistributedDataParallel(model)`` under torch.distributed (it broadcasts rank 0's
    parameters and buffers), else ``None``."""
    if not ranks.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        process_group=ranks.group)


def _train_step(
    model: nn.Module, ddp: nn.Module | None, optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Tensor], xb: Tensor, yb: Tensor, n_global: int, ranks: Ranks,
    penalty: HessianTracePenalty | None, gamma: float,
) -> tuple[Tensor | None, Tensor | None]:
    """One optimizer step (SAM: its two passes) on this rank's piece ``(xb, yb)`` of a global
    batch of ``n_global`` examples; returns the detached outputs and penalty (``None`` on a
    rank whose piece is empty).

    Alone this is ``(loss + gamma * pen).backward(); step()``. Data-parallel, every rank's
    gradient is scaled by its share ``n_local / n_global`` of the global mean and summed over
    the ranks: by DDP's reducer (which averages, hence the factor ``world``) on plain steps, by
    :func:`~hesslens.parallel.sync_gradients` on the unwrapped module where DDP
    would go wrong: the penalty's double backward (pytorch/pytorch#47562) and a global batch
    smaller than the world (some rank has nothing of it).
    """
    n_local = len(yb)
    by_hand = ranks.distributed and (penalty is not None or n_global < ranks.world)
    net = ddp if ddp is not None and not by_hand else model
    scale = 1.0
    if ranks.distributed:
        scale = n_local / n_global * (ranks.world if net is ddp else 1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def objective() -> tuple[Tensor | None, Tensor | None]:
        if n_local == 0:
            if penalty is not None and penalty.curvature == "hessian":
                penalty.sample_probes()  # the same parameter-space probes on every rank
            return None, None
        out_b = net(xb)
        loss = loss_fn(out_b, yb)
        total, pen = loss, None
        if penalty is not None:
            pen = penalty(loss, inputs=xb, targets=yb)
            total = loss + gamma * pen
        (total * scale if scale != 1.0 else total).backward()
        return out_b.detach(), None if pen is None else pen.detach()

    def gradient() -> tuple[Tensor | None, Tensor | None]:
        if not by_hand:
            return objective()
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
            got = objective()
        sync_gradients(trainable, ranks)
        return got

    optimizer.zero_grad(set_to_none=True)
    out_b, pen = gradient()
    if isinstance(optimizer, SAM):
        optimizer.first_step(zero_grad=True)
        with bn_stats_frozen(model):
            gradient()
        optimizer.second_step(zero_grad=True)
    else:
        optimizer.step()
    return out_b, pen


def _rank_rng_state(ckpt: dict[str, Any], ranks: Ranks, path: Path) -> dict[str, Any]:
    """This rank's saved random-number state; rank 0's (with a warning) when the checkpoint was
    written by another number of processes."""
    states = ckpt.get("rng_ranks")
    saved_world = int(ckpt.get("world_size", 1))
    if isinstance(states, list) and len(states) == ranks.world:
        return states[ranks.rank]
    if saved_world != ranks.world:
        warnings.warn(
            f"resuming {str(path)!r}, written by {saved_world} process(es), with "
            f"{ranks.world}: the data order and probes are the same, but the sums over ranks "
            "are taken in another order, so results may differ from an uninterrupted run in "
            "the last bits", ResumeDiffersWarning, stacklevel=3)
    return ckpt["rng"]


# ---------------------------------------------------------------------- the loop
def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    model: nn.Module | None = None,
    dataset: Any = None,
    progress: bool = True,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    similarity: Callable[[Any, Any], Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` as ``config`` says; return ``{"config", "arm", "epochs":
    [records], "final": record, "tracking": cost or None, "out_dir", "parallel"}``.

    The trainer takes the objects it trains: it builds no model and loads no data. To train a
    zoo model on a zoo data set by their names, use
    :func:`hesslens.experiments.train.train_zoo` (what ``hesslens train`` runs).

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
            (:func:`hesslens.splits.split_train_val`); tracking measures on
            :func:`hesslens.splits.analysis_subset` of it.
        progress: tqdm bars (only when stderr is a terminal).
        resume: continue from ``out_dir/checkpoint.pt`` (with an identical config, device and
            data folder aside); without a checkpoint the run starts from scratch. The
            checkpoint is checked in full first (checksum, structure, shapes against the model,
            epoch, random states: :func:`hesslens.training.checkpoint.load_checkpoint`); a bad
            one is a :class:`~hesslens.errors.CheckpointError` and the folder is left as it
            was.
        callbacks: ``cb(epoch, record, model)`` after each epoch's evaluation and tracking and
            before the files are written (they may add keys to ``record``). An exception from a
            callback stops the run; the previous epoch's checkpoint stays valid. A callback
            with a ``bind(model, optimizer)`` method gets the optimizer before the first step.
        similarity: spectrum similarity for tracking with densities.

    Raises:
        HesslensInputError: no model or no dataset given, a bad config, data or output folder;
            its subclasses :class:`~hesslens.errors.OutputLockedError` (another run writes into
            ``out_dir``) and :class:`~hesslens.errors.CheckpointError` (a checkpoint to resume
            that is corrupted or does not fit).
    """
    if not isinstance(config, TrainConfig):
        raise HesslensInputError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_objects(model, dataset)
    config = dataclasses.replace(config).validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HesslensInputError(f"--out {str(out)!r} exists and is not a folder")
    _check_new_run(out, resume)  # early, before any work; again in the lock
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
                                progress=progress, resume=resume, callbacks=callbacks,
                                similarity=similarity)


def _train_in_folder(
    config: TrainConfig, out: Path, ranks: Ranks, *, model: nn.Module, dataset: Any,
    progress: bool, resume: bool, callbacks: Sequence[Callback],
    similarity: Callable[[Any, Any], Any] | None,
) -> dict[str, Any]:
    """:func:`train` in its output folder, locked by rank 0 (checked again inside the lock:
    another run may have started there meanwhile)."""
    ckpt_path = out / CHECKPOINT
    _check_new_run(out, resume)
    device = _resolve_device(local_device(config.device, ranks))

    # Seed everything for a fresh run (a resumed run restores the states below).
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    import random

    random.seed(config.seed)

    data = dataset
    x_all, y_all = data.x_train, data.y_train
    _check_data(x_all, y_all, data.x_test, data.y_test, int(data.num_classes),
                config.val_fraction)
    x_tr, y_tr, x_val, y_val = _split(x_all, y_all, config.val_fraction, config.seed)
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_val, y_val = x_val.to(device), y_val.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module  # wrapped here again, with the trainer's own gradient sums
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise HesslensInputError(
            "the model has no trainable parameters (all have requires_grad=False); there is "
            "nothing to train"
        )
    loss_fn = nn.functional.cross_entropy
    provenance = {"data": dataset_fingerprint(data, getattr(data, "name", config.data)),
                  "versions": versions(device), "parallel": ranks.record()}
    ddp = _data_parallel(model, device, ranks)

    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    penalty = None
    if config.htr_gamma > 0:
        penalty = HessianTracePenalty(
            model, layers=config.htr_layers, n_probes=config.htr_probes,
            distribution=config.htr_distribution, method=config.htr_method,
            fd_eps=config.htr_fd_eps, seed=config.seed, loss_fn=loss_fn,
            curvature=config.htr_curvature,
        )
    all_callbacks: list[Callback] = []
    tracking: EpochTracking | None = None
    if config.track_every > 0 and config.track_layers:
        xa, ya = analysis_subset(x_all, y_all, per_class=config.track_per_class, seed=0)
        if len(ya) < ranks.world:
            raise HesslensInputError(
                f"the analysis subset has {len(ya)} examples, fewer than the {ranks.world} "
                "processes; raise --track-per-class or use fewer processes")
        # Each rank its piece of the same subset: the tracker's operators sum over the ranks.
        tracking = EpochTracking(
            shard(xa, ranks).to(device), shard(ya, ranks).to(device),
            every=config.track_every, loss_fn=loss_fn,
            last_epoch=config.epochs, densities=config.track_densities,
            similarity=similarity, seed=0,
        )
        all_callbacks.append(tracking)
    all_callbacks.extend(callbacks)
    for cb in callbacks:  # a callback that follows the optimizer (its stability threshold)
        bind = getattr(cb, "bind", None)
        if callable(bind):
            bind(model, optimizer)

    records: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    resuming = resume and ckpt_path.exists()
    barrier(ranks)  # every rank has looked at out_dir before rank 0 writes into it
    if resuming:  # checked in full before anything is loaded or written
        ckpt = load_checkpoint(ckpt_path, epochs=config.epochs, training=True)
        _check_resume(ckpt, config, ckpt_path, n_batches=math.ceil(len(y_tr) / config.batch_size),
                      penalty=penalty)
        check_fit(ckpt, ckpt_path, model, optimizer, scheduler)  # before load_state_dict
        check_bit_exactness(ckpt, ckpt_path, device)  # threads, flags, torch, device
        _load_states(ckpt, ckpt_path, model, optimizer, scheduler, penalty)
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        records = list(ckpt["metrics"])
        restore_rng_state(_rank_rng_state(ckpt, ranks, ckpt_path))
    if ranks.is_main:
        remove_stale_temporaries(out)  # left by a kill during an atomic write
        write_json(out / CONFIG_JSON, config.to_dict())
    if tracking is not None and start_epoch == 0 and not records:
        # Epoch 0: the curvature (and the held-out numbers) at initialisation. It is kept with
        # the first checkpoint; a run killed before that starts again from here.
        t1 = time.perf_counter()
        val_loss, val_acc = _evaluate_shared(model, x_val, y_val, ranks)
        test_loss, test_acc = _evaluate_shared(model, x_te, y_te, ranks)
        initial: dict[str, Any] = {
            "epoch": 0, "lr": float(scheduler.get_last_lr()[0]), "val_loss": val_loss,
            "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
            "eval_seconds": time.perf_counter() - t1,
        }
        tracking(0, initial, model)
        model.train()
        records.append(initial)

    n = len(y_tr)
    n_batches = math.ceil(n / config.batch_size)
    progress = progress and ranks.is_main
    bar = _tqdm(progress, total=config.epochs, initial=start_epoch, desc=arm_label(config),
                unit="epoch")
    try:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            lr = float(scheduler.get_last_lr()[0])
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
            ).to(device)
            t0 = time.perf_counter()
            sum_loss = torch.zeros((), device=device)
            sum_correct = torch.zeros((), device=device, dtype=torch.long)
            pen_sum, pen_steps = 0.0, 0
            htr_on = penalty is not None and epoch >= config.htr_start
            inner = _tqdm(progress, total=n_batches, leave=False, desc=f"epoch {epoch + 1}",
                          unit="batch")
            for b in range(n_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                n_global = len(idx)
                if ranks.distributed:  # this rank's piece of the global batch
                    idx = idx[slice(*shard_range(n_global, ranks.rank, ranks.world))]
                xb, yb = x_tr[idx], y_tr[idx]
                use_pen = htr_on and global_step % config.htr_every == 0
                out_b, pen = _train_step(
                    model, ddp, optimizer, loss_fn, xb, yb, n_global, ranks,
                    penalty if use_pen else None, config.htr_gamma)
                global_step += 1
                if out_b is not None:
                    with torch.no_grad():
                        sum_loss += loss_fn(out_b, yb, reduction="sum")
                        sum_correct += (out_b.argmax(1) == yb).sum()
                if use_pen:
                    pen_sum += 0.0 if pen is None else float(pen) * len(yb) / n_global
                    pen_steps += 1
                inner.update(1)
            inner.close()
            scheduler.step()
            broadcast_buffers(model, ranks)  # rank 0's running statistics on every rank
            epoch_seconds = time.perf_counter() - t0
            train_loss_sum, train_correct = float(sum_loss), int(sum_correct)
            if ranks.distributed:  # every rank's sums (pen_sum: each rank's weighted share)
                train_loss_sum, correct_f, pen_sum = sum_across(
                    [train_loss_sum, train_correct, pen_sum], ranks, device=device)
                train_correct = round(correct_f)

            t1 = time.perf_counter()
            val_loss, val_acc = _evaluate_shared(model, x_val, y_val, ranks)
            test_loss, test_acc = _evaluate_shared(model, x_te, y_te, ranks)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss_sum / n,
                "train_acc": train_correct / n,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "htr_penalty": pen_sum / pen_steps if pen_steps else None,
                "htr_steps": pen_steps,
                "epoch_seconds": epoch_seconds,
                "eval_seconds": time.perf_counter() - t1,
            }
            if not math.isfinite(record["train_loss"]):
                raise HesslensInputError(
                    f"training diverged at epoch {epoch + 1} (train loss "
                    f"{record['train_loss']}); lower the learning rate or the HTR gamma"
                )
            for cb in all_callbacks:
                cb(epoch + 1, record, model)
            model.train()
            records.append(record)
            # Checkpoint first: a kill between the two writes leaves metrics one epoch behind
            # a checkpoint (resume rewrites them), never a finished-looking run whose
            # checkpoint lags.
            rng_states = all_gather_objects(capture_rng_state(), ranks)
            if ranks.is_main:
                save_checkpoint(ckpt_path, {
                    "format": CHECKPOINT_FORMAT,
                    "config": to_jsonable(config.to_dict()),
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "penalty": penalty.state_dict() if penalty is not None else None,
                    "rng": rng_states[0],
                    "rng_ranks": rng_states,
                    "world_size": ranks.world,
                    # Plain data only, so the checkpoint loads with weights_only=True even when a
                    # callback put numpy scalars or other objects in a record.
                    "metrics": to_jsonable(records),
                })
                write_metrics(out, config, records, provenance)
            bar.set_postfix(train_acc=f"{record['train_acc']:.3f}",
                            test_acc=f"{record['test_acc']:.3f}")
            bar.update(1)
    finally:
        bar.close()
    if not records and ranks.is_main:
        write_metrics(out, config, records, provenance)
    return {
        "config": config.to_dict(),
        "arm": arm_label(config),
        "epochs": records,
        "final": records[-1] if records else {},
        "tracking": tracking_cost(records),
        "out_dir": str(out),
        "parallel": ranks.record(),
    }


def _check_new_run(out: Path, resume: bool) -> None:
    """Refuse to start a new run in a folder that holds one (unless resuming it), and to
    resume one whose checkpoint is gone (the new run would overwrite its metrics)."""
    if not resume and ((out / CHECKPOINT).exists() or (out / METRICS_JSON).exists()):
        raise HesslensInputError(
            f"{str(out)!r} already holds a training run; continue it with --resume "
            "(resume=True in Python), or choose another output folder"
        )
    if resume and (out / METRICS_JSON).exists() and not (out / CHECKPOINT).exists():
        raise HesslensInputError(
            f"{str(out)!r} holds the metrics of a run but no {CHECKPOINT} to resume it from; "
            "a new run there would overwrite them: start it in another folder")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A saved or current configuration as a resume compares it: ``track_layers`` only counts
    where something is tracked (``track_every > 0``), and a run saved before the field existed
    tracked the layers."""
    config.setdefault("track_layers", True)
    if not config.get("track_every"):
        config.pop("track_layers")
    return config


def _check_resume(ckpt: dict[str, Any], config: TrainConfig, path: Path, n_batches: int,
                  penalty: HessianTracePenalty | None) -> None:
    """What a checkpoint must agree on with the run that continues from it (its structure
    is :func:`~hesslens.training.checkpoint.load_checkpoint`'s): the configuration, the
    optimizer steps its epoch implies on this data, a penalty state where the run has one."""
    saved = _comparable(dict(ckpt["config"]))
    now = _comparable(to_jsonable(config.to_dict()))
    diff = sorted(
        k for k in set(saved) | set(now)
        if k not in ("device", "data_root") and json.dumps(saved.get(k), default=str)
        != json.dumps(now.get(k), default=str)
    )
    if diff:
        raise HesslensInputError(
            f"cannot resume {str(path)!r}: the configuration differs in {diff} "
            f"(saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]}); "
            "resume with the same settings or start a new run in another folder"
        )
    epoch, step = ckpt["epoch"], ckpt["global_step"]
    if step != epoch * n_batches:
        raise CheckpointError(
            f"checkpoint {path}: its global_step {step} is not the {epoch * n_batches} steps of "
            f"its {epoch} epoch(s) of {n_batches} batches; use an intact copy, or start the run "
            "again in a new folder")
    if penalty is not None and ckpt["penalty"] is None:
        raise CheckpointError(
            f"checkpoint {path}: it holds no Hessian-trace penalty state, though its "
            "configuration has the penalty; use an intact copy, or start the run again in a new "
            "folder")


def _load_states(ckpt: dict[str, Any], path: Path, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any,
                 penalty: HessianTracePenalty | None) -> None:
    """Put the checked checkpoint's states into the run's objects; anything they still refuse
    is a :class:`~hesslens.errors.CheckpointError` naming the file."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if penalty is not None:
            penalty.load_state_dict(ckpt["penalty"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"checkpoint {path}: its states do not load into the run ({type(err).__name__}: "
            f"{detail}); use an intact copy, or start the run again in a new folder") from None
