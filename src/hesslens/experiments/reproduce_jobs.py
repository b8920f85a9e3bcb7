"""The training jobs of ``hesslens reproduce``: one run each, skipped when finished, on a pool
of spawned worker processes (one torch thread each); under ``torchrun`` each rank trains its
share of the jobs (:func:`share`).

Jobs start longest first (their :func:`weight`: epochs x the arm's cost per step), so that the
last job to finish is a short one.

Example:
    >>> from pathlib import Path
    >>> finished(Path("/nonexistent"), epochs=3)
    False
    >>> jobs = [({"epochs": 2}, "a"), ({"epochs": 2, "sam_rho": 0.05}, "b"), ({"epochs": 2}, "c")]
    >>> [[d for _, d in share(jobs, r, 2)] for r in range(2)]
    [['b'], ['a', 'c']]
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from hesslens.errors import HesslensInputError
from hesslens.files import write_json

__all__ = ["DIVERGED", "diverged", "finished", "run_isolated", "run_jobs", "share", "weight"]

Job = tuple[dict[str, Any], Any]
T = TypeVar("T")

#: Written into a run's folder when the run diverged and divergence was allowed (tuning).
DIVERGED = "diverged.json"

# The environment torchrun sets: a spawned child must not see it (it is one process alone).
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def _init_worker() -> None:
    for key in _TORCHRUN_ENV:
        os.environ.pop(key, None)
    torch.set_num_threads(1)


def _train_job(config: dict[str, Any], run_dir: str,
               allow_diverge: bool = False) -> dict[str, Any]:
    """Train one run to the end (continuing it if it was interrupted). With ``allow_diverge``
    a run whose loss went non-finite is an outcome, not an error: it ends there and
    ``diverged.json`` in its folder says why."""
    from hesslens.experiments.train import train_zoo
    from hesslens.training import TrainConfig

    try:
        result = train_zoo(TrainConfig.from_dict(config), run_dir, progress=False, resume=True)
    except HesslensInputError as err:
        if not (allow_diverge and _is_divergence(err)):
            raise
        write_json(Path(run_dir) / DIVERGED, {"error": str(err)})
        return {"run_dir": run_dir, "diverged": str(err)}
    return {"run_dir": run_dir, "final": result["final"]}


def _is_divergence(err: Exception) -> bool:
    """The trainer's and the penalty's errors for a loss that went NaN or infinite."""
    text = str(err)
    return "training diverged" in text or "the loss is not finite" in text


def diverged(run_dir: Path) -> str | None:
    """Why the run in ``run_dir`` diverged, or ``None`` if it did not."""
    try:
        return json.loads((Path(run_dir) / DIVERGED).read_text())["error"]
    except (OSError, ValueError, KeyError):
        return None


def finished(run_dir: Path, epochs: int) -> bool:
    if diverged(run_dir) is not None:
        return True
    try:
        data = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    # count trained epochs: a tracked run also has an epoch-0 record (initialisation)
    return sum(1 for e in data.get("epochs", []) if e.get("epoch", 1) >= 1) >= epochs


def weight(config: dict[str, Any]) -> float:
    """A job's expected cost in plain SGD steps: epochs x 2 for SAM (two gradients a step) x
    about 5 per penalised step of HTR (a Hessian-vector product on top of the gradient)."""
    per_step = 2.0 if config.get("sam_rho", 0) > 0 else 1.0
    if config.get("htr_gamma", 0) > 0:
        per_step += 4.0 / max(1, int(config.get("htr_every", 1)))
    return float(config["epochs"]) * per_step


def share(jobs: Sequence[Job], rank: int, world: int) -> list[Job]:
    """Rank ``rank``'s jobs of ``world``: the longest job first to the least loaded rank
    (the same answer on every rank)."""
    if world <= 1:
        return list(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -weight(jobs[i][0]))
    load = [0.0] * world
    mine = []
    for i in order:
        r = min(range(world), key=lambda k: load[k])
        load[r] += weight(jobs[i][0])
        if r == rank:
            mine.append(i)
    return [jobs[i] for i in sorted(mine)]


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)


def run_isolated(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh spawned process with one torch thread and no process group
    (``fn`` and its arguments must pickle): what runs there shares no state with this one."""
    with _pool(1) as pool:
        return pool.submit(fn, *args).result()


def run_jobs(jobs: list[Job], workers: int, progress: bool, desc: str,
             isolated: bool = False, allow_diverge: bool = False) -> None:
    """Train every unfinished job, ``workers`` at a time, longest first. ``isolated``: in
    spawned processes even for one worker (needed under torch.distributed, where a run in this
    process would see the process group). ``allow_diverge``: a run that diverges ends with
    ``diverged.json`` (:func:`diverged`) instead of stopping every job."""
    todo = sorted((j for j in jobs if not finished(Path(j[1]), j[0]["epochs"])),
                  key=lambda j: -weight(j[0]))
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run",
               disable=not progress, file=sys.stderr)
    try:
        if not todo:
            return
        if not isolated and (workers <= 1 or len(todo) <= 1):
            _init_worker_threads()
            for config, run_dir in todo:
                _train_job(config, str(run_dir), allow_diverge)
                bar.update()
            return
        with _pool(max(1, min(workers, len(todo)))) as pool:
            futures = [pool.submit(_train_job, c, str(d), allow_diverge) for c, d in todo]
            for future in as_completed(futures):
                future.result()
                bar.update()
    finally:
        bar.close()


def _init_worker_threads() -> None:
    torch.set_num_threads(1)
