"""A run's state on disk: the checkpoint written after every epoch (with the metrics so far),
and the resume that continues a run from it, bit for bit.

A new run refuses a folder that holds one (:func:`check_new_run`); a resume checks the
checkpoint in full (:func:`hesslens.training.checkpoint.load_checkpoint`), then that it belongs
to this run (:func:`check_resume`: the same configuration, the steps its epoch implies, a
penalty state where the run has a penalty), before any state is loaded or any file written.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> check_new_run(Path(tempfile.mkdtemp()), resume=False)  # an empty folder: fine
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hesslens.errors import CheckpointError, HesslensInputError
from hesslens.files import to_jsonable
from hesslens.parallel import Ranks, all_gather_objects, barrier
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
from hesslens.training.config import TrainConfig
from hesslens.training.metrics import METRICS_JSON, write_metrics
from hesslens.training.penalty import HessianTracePenalty
from hesslens.training.setup import RunSetup

__all__ = ["CHECKPOINT", "check_new_run", "check_resume", "resume_run", "save_epoch"]

CHECKPOINT = "checkpoint.pt"


def check_new_run(out: Path, resume: bool) -> None:
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


def resume_run(setup: RunSetup, out: Path, resume: bool) -> tuple[int, int, list[dict[str, Any]]]:
    """``(epochs done, optimizer steps done, records so far)``: ``(0, 0, [])`` for a fresh
    run; with ``resume`` and a checkpoint in ``out``, the checkpoint's, after its states (model,
    optimizer, schedule, penalty, this rank's random numbers) are checked and loaded."""
    ckpt_path = out / CHECKPOINT
    resuming = resume and ckpt_path.exists()
    barrier(setup.ranks)  # every rank has looked at out before rank 0 writes into it
    if not resuming:
        return 0, 0, []
    # checked in full before anything is loaded or written
    config = setup.config
    ckpt = load_checkpoint(ckpt_path, epochs=config.epochs, training=True)
    check_resume(ckpt, config, ckpt_path,
                 n_batches=math.ceil(len(setup.splits.y_train) / config.batch_size),
                 penalty=setup.penalty)
    check_fit(ckpt, ckpt_path, setup.model, setup.optimizer, setup.scheduler)  # before loading
    check_bit_exactness(ckpt, ckpt_path, setup.device)  # threads, flags, torch, device
    _load_states(ckpt, ckpt_path, setup.model, setup.optimizer, setup.scheduler, setup.penalty)
    restore_rng_state(_rank_rng_state(ckpt, setup.ranks, ckpt_path))
    return int(ckpt["epoch"]), int(ckpt["global_step"]), list(ckpt["metrics"])


def save_epoch(setup: RunSetup, out: Path, epoch: int, global_step: int,
               records: list[dict[str, Any]]) -> None:
    """After epoch ``epoch`` (1-based): the checkpoint (every rank's random-number state
    gathered), then ``metrics.*``, by rank 0. Checkpoint first: a kill between the two writes
    leaves metrics one epoch behind a checkpoint (resume rewrites them), never a
    finished-looking run whose checkpoint lags."""
    rng_states = all_gather_objects(capture_rng_state(), setup.ranks)
    if not setup.ranks.is_main:
        return
    penalty = setup.penalty
    save_checkpoint(out / CHECKPOINT, {
        "format": CHECKPOINT_FORMAT,
        "config": to_jsonable(setup.config.to_dict()),
        "epoch": epoch,
        "global_step": global_step,
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "penalty": penalty.state_dict() if penalty is not None else None,
        "rng": rng_states[0],
        "rng_ranks": rng_states,
        "world_size": setup.ranks.world,
        # Plain data only, so the checkpoint loads with weights_only=True even when a
        # callback put numpy scalars or other objects in a record.
        "metrics": to_jsonable(records),
    })
    write_metrics(out, setup.config, records, setup.provenance)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A saved or current configuration as a resume compares it: ``track_layers`` only counts
    where something is tracked (``track_every > 0``), and a run saved before the field existed
    tracked the layers."""
    config.setdefault("track_layers", True)
    if not config.get("track_every"):
        config.pop("track_layers")
    return config


def check_resume(ckpt: dict[str, Any], config: TrainConfig, path: Path, n_batches: int,
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
            "the last bits", ResumeDiffersWarning, stacklevel=4)
    return ckpt["rng"]

