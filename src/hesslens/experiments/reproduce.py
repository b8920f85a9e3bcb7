"""``hesslens reproduce``: the paper's whole study on the embedded default (MNIST-1D).

Stages, each resumable (a killed run picks up where it stopped: finished training runs are
skipped, a half-trained one continues from its last epoch checkpoint):

1. *tune*: each arm's own knob (weight decay, SAM's rho, HTR's gamma) on a validation split of
   the training set, with a seed the final runs do not use; the test set is never looked at;
2. *train*: every arm x every seed at equal epochs, batch size, learning rate and schedule,
   with curvature (full and per-layer top eigenvalue and trace) tracked along the way;
3. *study*: the layer study (:mod:`hesslens.analysis`) of the final SGD and HTR models;
4. *report*: ``results.json``, ``compare.json``/``.csv``, figures and one ``report.html`` that
   states which of the paper's findings held here, and by how much.

Runs go to a pool of worker processes (one torch thread each), since these models are too small
for two threads to help one run.

Example:
    >>> from hesslens.experiments.reproduce_plan import quick_plan
    >>> quick_plan().name
    'quick'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError
from hesslens.experiments.common import (
    add_common_arguments,
    apply_threads,
    positive_int,
    prepare_out_dir,
    resolve_device,
    resolve_dtype,
    show_progress,
)
from hesslens.experiments.reproduce_jobs import run_jobs
from hesslens.experiments.reproduce_plan import Arm, Plan, full_plan, quick_plan, slug
from hesslens.experiments.reproduce_study import run_study

__all__ = ["add_reproduce_arguments", "reproduce", "run_reproduce"]

# ---------------------------------------------------------------------------------- CLI
def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hesslens reproduce``."""
    parser.add_argument("--quick", action="store_true",
                        help="a smoke-sized study (2 seeds, 5 epochs, no tuning; < 2 minutes)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="training runs at a time (default: the CPU count, at most 2)")
    add_common_arguments(parser, default_out="hesslens-reproduce")


def run_reproduce(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments; prints the summary, returns the exit code."""
    device = str(resolve_device(args.device))  # before any work: workers would each fail
    dtype = resolve_dtype(args.dtype)
    plan = quick_plan() if args.quick else full_plan()
    workers = args.workers or max(1, min(2, os.cpu_count() or 1))
    plan = dataclasses.replace(
        plan, workers=workers, seeds=tuple(s + args.seed for s in plan.seeds),
        tune_seed=plan.tune_seed + args.seed)
    # The study's models are small: one thread per process beats two fighting for 2 cores.
    apply_threads(args.threads, n_params=0)
    result = reproduce(plan, args.out, device=device, progress=show_progress(args),
                       dtype=dtype)
    print(result["summary_text"])
    print(f"\nwrote {Path(args.out) / 'report.html'}")
    return 0


# ---------------------------------------------------------------------------------- stages
def _config(plan: Plan, arm: Arm, value: float | None, seed: int, device: str,
            track: bool) -> dict[str, Any]:
    return {**plan.base_config(), **arm.config_fields(value), "seed": seed, "device": device,
            "track_every": plan.track_every if track else 0}


def _val_score(run_dir: Path) -> float:
    """Validation accuracy at the end of a run: the mean of its last two epochs (less noisy
    than the last alone)."""
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    tail = [e["val_acc"] for e in epochs[-2:]]
    return sum(tail) / len(tail)


def _tune(plan: Plan, out: Path, device: str, progress: bool) -> dict[str, Any]:
    jobs, where = [], {}
    for arm in plan.arms:
        if arm.knob is None or not plan.tune:
            continue
        for value in arm.grid:
            run_dir = out / "tune" / slug(arm.name) / f"{arm.knob}={value:g}"
            jobs.append((_config(plan, arm, value, plan.tune_seed, device, track=False),
                         run_dir))
            where[(arm.name, value)] = run_dir
    if jobs:
        run_jobs(jobs, plan.workers, progress, "tune on validation")
    chosen: dict[str, Any] = {}
    for arm in plan.arms:
        if arm.knob is None:
            chosen[arm.name] = {"knob": None, "value": None, "grid": []}
            continue
        if not plan.tune:
            chosen[arm.name] = {"knob": arm.knob, "value": arm.default, "grid": [],
                                "note": "default value (--quick does not tune)"}
            continue
        scores = {v: _val_score(where[(arm.name, v)]) for v in arm.grid}
        best = max(arm.grid, key=lambda v: (scores[v], -v))
        chosen[arm.name] = {"knob": arm.knob, "value": best,
                            "grid": [{"value": v, "val_acc": scores[v]} for v in arm.grid]}
    return chosen


def _train_final(plan: Plan, out: Path, device: str, chosen: dict[str, Any],
                 progress: bool) -> dict[str, list[Path]]:
    jobs, runs = [], {}
    for arm in plan.arms:
        value = chosen[arm.name]["value"]
        for seed in plan.seeds:
            run_dir = out / "runs" / slug(arm.name) / f"seed{seed}"
            jobs.append((_config(plan, arm, value, seed, device, track=True), run_dir))
            runs.setdefault(arm.name, []).append(run_dir)
    run_jobs(jobs, plan.workers, progress, "train arms x seeds")
    return runs


def _check_plan(out: Path, plan: Plan) -> None:
    from hesslens.files import write_json

    plan_file = out / "plan.json"
    wanted = json.loads(json.dumps(plan.to_dict()))
    wanted.pop("workers", None)
    if plan_file.is_file():
        held = json.loads(plan_file.read_text())
        held.pop("workers", None)
        if held != wanted:
            raise HesslensInputError(
                f"{out} holds a different study (its plan.json differs, e.g. --quick or --seed "
                "changed): choose another --out, or delete the folder to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_json(plan_file, plan.to_dict())


def _add_seconds(out: Path, key: str, seconds: float) -> dict[str, float]:
    """Add one leg's time for a stage to ``timings.json``: a study killed and resumed, or run
    again, reports the time all its legs spent, not the last leg's."""
    from hesslens.files import write_json

    path = out / "timings.json"
    held = json.loads(path.read_text()) if path.is_file() else {}
    held[key] = float(held.get(key, 0.0)) + seconds
    write_json(path, held)
    return held


def reproduce(plan: Plan, out_dir: str | os.PathLike[str], *, device: str = "cpu",
              progress: bool = True, dtype: Any = None) -> dict[str, Any]:
    """Run (or finish) the whole study into ``out_dir``; returns the content of
    ``results.json`` plus ``summary_text``. ``dtype`` is the layer study's precision (training
    is float32)."""
    from hesslens.experiments.compare import compare_runs
    from hesslens.experiments.reproduce_report import write_reproduce_report

    out = prepare_out_dir(out_dir)  # refuses '' and files; removes stale temporary files
    _check_plan(out, plan)
    t0 = time.perf_counter()
    chosen = _tune(plan, out, device, progress)
    _add_seconds(out, "tune_seconds", time.perf_counter() - t0)
    t1 = time.perf_counter()
    runs = _train_final(plan, out, device, chosen, progress)
    _add_seconds(out, "train_seconds", time.perf_counter() - t1)
    t2 = time.perf_counter()
    studies = run_study(plan, out, runs, device, progress, dtype)
    timings = _add_seconds(out, "study_seconds", time.perf_counter() - t2)
    comparison = compare_runs([str(d) for dirs in runs.values() for d in dirs])
    return write_reproduce_report(out, plan, chosen, runs, comparison, studies, timings,
                                  provenance=_provenance(plan, device))


def _provenance(plan: Plan, device: str) -> dict[str, Any]:
    """The study's data fingerprint (the data set every run and study used) and versions."""
    from hesslens.provenance import dataset_fingerprint, versions
    from hesslens.zoo import load_dataset

    return {"data": dataset_fingerprint(load_dataset(plan.data), plan.data),
            "versions": versions(device)}
