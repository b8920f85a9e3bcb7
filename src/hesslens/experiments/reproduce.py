"""``hesslens reproduce``: the paper's whole study on the embedded default (MNIST-1D), or on any
zoo model and data set (``--model``, ``--data``).

Stages, each resumable (a killed run picks up where it stopped: finished training runs are
skipped, a half-trained one continues from its last epoch checkpoint):

1. *tune*: each arm's own knob (weight decay, SAM's rho, HTR's gamma) on a validation split of
   the training set, every grid value on each of the plan's tuning seeds (which the final runs
   do not use), chosen by the mean validation accuracy over those seeds; the test set is never
   looked at;
2. *train*: every arm x every seed at equal epochs, batch size, learning rate and schedule,
   with curvature (full and per-layer top eigenvalue and trace) tracked along the way;
3. *cost*: each arm's epoch time against SGD, measured in one process after all training, on
   its own (:mod:`hesslens.experiments.reproduce_cost`): the study's runs share cores;
4. *study*: the layer study (:mod:`hesslens.analysis`) of the final SGD and HTR models;
5. *report*: ``results.json``, ``compare.json``/``.csv``, figures and one ``report.html`` that
   states which of the paper's findings held here, and by how much.

Runs go to a pool of worker processes (one torch thread each), since these models are too small
for two threads to help one run. Under ``torchrun`` (``python -m torch.distributed.run
--nproc-per-node W -m hesslens reproduce ...``) each rank trains its share of the runs
(:func:`hesslens.experiments.reproduce_jobs.share`), the ranks wait for each other between
stages, rank 0 measures the costs, does the layer study and writes the report, and every rank
ends with the same exit code; ``plan.json``/``results.json`` record the world size. The output
folder must be one that every rank sees.

Example:
    >>> from hesslens.experiments.reproduce_plan import quick_plan
    >>> quick_plan().name
    'quick'
    >>> check_pair("mlp", "digits")
    >>> sorted(study_needs(quick_plan()))
    ['matplotlib', 'transformers']
    >>> try:
    ...     check_pair("gpt-nano", "modadd")
    ... except HesslensInputError as err:
    ...     print(str(err)[:60])
    reproduce trains classifiers on (inputs, labels) pairs; gpt-
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hesslens.errors import HesslensInputError
from hesslens.experiments.common import (
    add_common_arguments,
    apply_threads,
    out_dir_lock,
    positive_int,
    prepare_out_dir,
    resolve_dtype,
    show_progress,
)
from hesslens.experiments.compare import compare_runs
from hesslens.experiments.preflight import check_ready, refuse_hf_model, require
from hesslens.experiments.reproduce_cost import apply_costs, measure_costs
from hesslens.experiments.reproduce_jobs import (
    diverged,
    finished,
    run_isolated,
    run_jobs,
    share,
)
from hesslens.experiments.reproduce_plan import RUN_ONLY, Arm, Plan, full_plan, quick_plan, slug
from hesslens.experiments.reproduce_report import write_reproduce_report
from hesslens.experiments.reproduce_study import run_study, study_sizes
from hesslens.files import write_json
from hesslens.parallel import all_gather_objects, current, local_device, process_group_from_env
from hesslens.provenance import dataset_fingerprint, versions
from hesslens.zoo import DATASETS, MODELS, TASKS, build_model, dataset_info, load_dataset
from hesslens.zoo.inputs import model_input

__all__ = ["add_reproduce_arguments", "check_pair", "plan_from_args", "preflight_reproduce",
           "reproduce", "run_reproduce", "study_needs"]

T = TypeVar("T")


# ---------------------------------------------------------------------------------- CLI
def add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hesslens reproduce``."""
    parser.add_argument("--quick", action="store_true",
                        help="a smoke-sized study (2 seeds, 5 epochs, no tuning; < 2 minutes)")
    parser.add_argument("--model", default=None, metavar="M",
                        help="zoo model to study (default: cnn1d3, the MNIST-1D paper's CNN)")
    parser.add_argument("--data", default=None, metavar="D",
                        help="zoo data set to study (default: mnist1d)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder with the files of a file-based data set (mnist, cifar10..)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="training runs at a time (default: the CPU count, at most 2; "
                             "under torchrun 1 per rank)")
    add_common_arguments(parser, default_out="hesslens-reproduce")


def check_pair(model: str, data: str, data_root: str | None = None) -> None:
    """Refuse, before any work, a zoo ``model``/``data`` pair that reproduce cannot train:
    unknown names (the message lists the known ones), Hugging Face models and token tasks
    (their own batches and loss), a model that does not take the data's shape, and a
    file-based data set whose files are not under ``data_root``."""
    if model not in MODELS:
        raise HesslensInputError(
            f"unknown model {model!r}; choose one of: {', '.join(sorted(MODELS))}")
    if data not in DATASETS:
        raise HesslensInputError(
            f"unknown data set {data!r}; choose one of: {', '.join(DATASETS)}")
    refuse_hf_model(model, "reproduce")
    if data in TASKS:
        raise HesslensInputError(
            f"reproduce trains classifiers on (inputs, labels) pairs; {data} is a token task "
            "for gpt-nano: study it with hesslens analyze")
    info = dataset_info(data)
    build_model(model, info.input_shape, info.num_classes, seed=0)  # names a shape mismatch
    if not info.builtin:
        load_dataset(data, root=data_root)  # names the missing files


def study_needs(plan: Plan) -> dict[str, str]:
    """The modules a study of ``plan`` imports only after its training (``{module: what needs
    it}``): checked first, so that a missing one fails in seconds, not after minutes."""
    needs = {"matplotlib": "the report's figures"}
    transformer = study_sizes(plan.name).transformer
    if model_input(transformer) is not None:
        needs["transformers"] = f"the transformer block study ({transformer})"
    return needs


def plan_from_args(args: argparse.Namespace, check: bool = True) -> Plan:
    """The plan the command line asks for (checked with :func:`check_pair` unless ``check`` is
    false)."""
    plan = quick_plan() if args.quick else full_plan()
    plan = plan.with_pair(getattr(args, "model", None), getattr(args, "data", None))
    plan = dataclasses.replace(plan, data_root=getattr(args, "data_root", None))
    if check:
        check_pair(plan.model, plan.data, plan.data_root)
    return dataclasses.replace(
        plan, seeds=tuple(s + args.seed for s in plan.seeds),
        tune_seed=plan.tune_seed + args.seed)


def preflight_reproduce(args: argparse.Namespace) -> tuple[str, Any, Plan]:
    """Everything ``hesslens reproduce`` can know before any work, cheapest first: the modules
    the study imports after training (:func:`study_needs`), the device, the output folder
    (writable, not a file, not a folder holding another study), ``--dtype`` and the model/data
    pair (:func:`check_pair`). Returns ``(device, dtype, plan)``."""
    plan = plan_from_args(args, check=False)
    ready = check_ready(out=args.out, device=args.device, needs=study_needs(plan))
    dtype = resolve_dtype(args.dtype)
    _refuse_other_study(ready.out, plan)
    check_pair(plan.model, plan.data, plan.data_root)
    return str(ready.device), dtype, plan


def run_reproduce(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments; prints the summary, returns the exit code."""
    device, dtype, plan = preflight_reproduce(args)
    with process_group_from_env(device) as ranks:
        default_workers = 1 if ranks.distributed else max(1, min(2, os.cpu_count() or 1))
        plan = dataclasses.replace(plan, workers=args.workers or default_workers,
                                   world_size=ranks.world)
        # The study's models are small: one thread per process beats two fighting for 2 cores.
        apply_threads(args.threads, n_params=0)
        result = reproduce(plan, args.out, device=local_device(device, ranks),
                           progress=show_progress(args) and ranks.is_main, dtype=dtype)
    if ranks.is_main:
        print(result["summary_text"])
        print(f"\nwrote {Path(args.out) / 'report.html'}")
    return 0


# ---------------------------------------------------------------------------------- ranks
def _on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0; every rank returns its result, or raises its error (the same type
    and message, so that every rank exits alike). Alone: just ``fn()``."""
    ranks = current()
    if not ranks.distributed:
        return fn()
    value, error = None, None
    if ranks.is_main:
        try:
            value = fn()
        except Exception as err:
            error = err
    payload = all_gather_objects((value, _portable(error)) if ranks.is_main else None, ranks)[0]
    if error is not None:
        raise error
    if payload[1] is not None:
        raise payload[1]
    return payload[0]


def _on_all(fn: Callable[[], None]) -> None:
    """``fn()`` on every rank, then wait for all; an error on any rank is raised on every
    rank (the first failing rank's)."""
    ranks = current()
    if not ranks.distributed:
        fn()
        return
    error = None
    try:
        fn()
    except Exception as err:
        error = err
    errors = all_gather_objects(_portable(error), ranks)
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _portable(error: BaseException | None) -> BaseException | None:
    """``error`` as something that pickles to another rank with its type and message."""
    if error is None:
        return None

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------- stages
def _config(plan: Plan, arm: Arm, value: float | None, seed: int, device: str,
            final: bool) -> dict[str, Any]:
    cfg = {**plan.base_config(), **arm.config_fields(value), "seed": seed, "device": device,
           "track_every": plan.track_every if final else 0}
    if final:
        cfg["val_fraction"] = plan.final_val_fraction
    return cfg


def _val_score(run_dir: Path) -> float:
    """Validation accuracy at the end of a run: the mean of its last two epochs (less noisy
    than the last alone); 0 for a run that diverged."""
    if diverged(run_dir) is not None:
        return 0.0
    epochs = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    tail = [e["val_acc"] for e in epochs[-2:]]
    return sum(tail) / len(tail)


def _train_jobs(jobs: list[tuple[dict[str, Any], Path]], plan: Plan, progress: bool,
                desc: str, allow_diverge: bool = False) -> None:
    """Train ``jobs``: this rank's share under torch.distributed (in spawned processes), all of
    them otherwise; every rank returns once every run has finished."""
    ranks = current()
    mine = share(jobs, ranks.rank, ranks.world)
    _on_all(lambda: run_jobs(mine, plan.workers, progress, desc, isolated=ranks.distributed,
                             allow_diverge=allow_diverge))
    missing = [str(d) for c, d in jobs if not finished(Path(d), c["epochs"])]
    if missing:
        raise HesslensInputError(
            f"{len(missing)} training runs are not in the output folder after training (e.g. "
            f"{missing[0]}): under torchrun --out must be a folder every rank sees")


def _tune_dir(out: Path, arm: Arm, value: float | None, seed: int) -> Path:
    base = out / "tune" / slug(arm.name)
    if arm.knob is not None:
        base = base / f"{arm.knob}={value:g}"
    return base / f"seed{seed}"


def _summary(dirs: list[Path], seeds: list[int]) -> dict[str, Any]:
    """Validation accuracy over the tuning seeds' runs: mean, spread, each seed's, and the
    seeds on which the run diverged (scored 0)."""
    scores = [_val_score(d) for d in dirs]
    return {"val_acc": statistics.fmean(scores),
            "val_acc_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "val_acc_min": min(scores), "val_acc_max": max(scores), "val_acc_seeds": scores,
            "diverged_seeds": [s for s, d in zip(seeds, dirs) if diverged(d) is not None]}


def _tune(plan: Plan, out: Path, device: str, progress: bool) -> dict[str, Any]:
    seeds = list(plan.tuning_seeds())
    jobs = []
    if plan.tune:
        for arm in plan.arms:  # knob-less arms too: the validation level the knobs must beat
            for value in (arm.grid if arm.knob is not None else (None,)):
                for seed in seeds:
                    jobs.append((_config(plan, arm, value, seed, device, final=False),
                                 _tune_dir(out, arm, value, seed)))
        # a grid value that diverges on a tuning seed scores 0 there (and is named)
        _train_jobs(jobs, plan, progress, "tune on validation", allow_diverge=True)
    chosen: dict[str, Any] = {}
    for arm in plan.arms:
        if not plan.tune:
            chosen[arm.name] = {"knob": arm.knob, "value": arm.default, "grid": []}
            if arm.knob is not None:
                chosen[arm.name]["note"] = "default value (--quick does not tune)"
            continue
        if arm.knob is None:
            chosen[arm.name] = {"knob": None, "value": None, "grid": [], "tune_seeds": seeds,
                                **_summary([_tune_dir(out, arm, None, s) for s in seeds], seeds)}
            continue
        grid = [{"value": v, **_summary([_tune_dir(out, arm, v, s) for s in seeds], seeds)}
                for v in arm.grid]
        ranked = sorted(grid, key=lambda g: (-g["val_acc"], g["value"]))
        best = ranked[0]
        # the standard error of one grid value's mean, pooled over the grid
        pooled = statistics.fmean(g["val_acc_std"] ** 2 for g in grid) ** 0.5
        chosen[arm.name] = {
            "knob": arm.knob, "value": best["value"], "grid": grid, "tune_seeds": seeds,
            "rule": (f"highest mean validation accuracy over {len(seeds)} tuning seed(s) "
                     "(ties: the smaller value)"),
            "margin": best["val_acc"] - ranked[1]["val_acc"] if len(ranked) > 1 else None,
            "stderr": pooled / len(seeds) ** 0.5 if len(seeds) > 1 else None,
        }
    return chosen


def _train_final(plan: Plan, out: Path, device: str, chosen: dict[str, Any],
                 progress: bool) -> dict[str, list[Path]]:
    jobs, runs = [], {}
    for arm in plan.arms:
        value = chosen[arm.name]["value"]
        for seed in plan.seeds:
            run_dir = out / "runs" / slug(arm.name) / f"seed{seed}"
            jobs.append((_config(plan, arm, value, seed, device, final=True), run_dir))
            runs.setdefault(arm.name, []).append(run_dir)
    _train_jobs(jobs, plan, progress, "train arms x seeds")
    return runs


def _comparable(plan_dict: dict[str, Any]) -> dict[str, Any]:
    held = json.loads(json.dumps(plan_dict))
    for key in RUN_ONLY:
        held.pop(key, None)
    return held


def _refuse_other_study(out: Path, plan: Plan) -> None:
    """Refuse a folder whose ``plan.json`` describes another study (reads only)."""
    plan_file = out / "plan.json"
    try:
        held = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    except (OSError, ValueError):
        raise HesslensInputError(
            f"{plan_file} is not readable JSON: choose another --out, or delete the folder to "
            "start over") from None
    if held is not None and (not isinstance(held, dict)
                             or _comparable(held) != _comparable(plan.to_dict())):
        raise HesslensInputError(
            f"{out} holds a different study (its plan.json differs, e.g. --quick, --seed, "
            "--model or --data changed): choose another --out, or delete the folder to "
            "start over")


def _check_plan(out: Path, plan: Plan) -> None:
    _refuse_other_study(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", plan.to_dict())


def _add_seconds(out: Path, key: str, seconds: float) -> dict[str, float]:
    """Add one leg's time for a stage to ``timings.json``: a study killed and resumed, or run
    again, reports the time all its legs spent, not the last leg's."""
    path = out / "timings.json"
    held = json.loads(path.read_text()) if path.is_file() else {}
    held[key] = float(held.get(key, 0.0)) + seconds
    write_json(path, held)
    return held


def _timed(out: Path, key: str, fn: Callable[[], T]) -> T:
    """``fn()``, its wall time added to ``timings.json`` (by rank 0)."""
    t0 = time.perf_counter()
    value = fn()
    if current().is_main:
        _add_seconds(out, key, time.perf_counter() - t0)
    return value


def reproduce(plan: Plan, out_dir: str | os.PathLike[str], *, device: str = "cpu",
              progress: bool = True, dtype: Any = None) -> dict[str, Any]:
    """Run (or finish) the whole study into ``out_dir``; returns the content of
    ``results.json`` plus ``summary_text``. ``dtype`` is the layer study's precision (training
    is float32). Under torch.distributed every rank calls it and gets the same result."""
    require(study_needs(plan))  # before any work: it would fail after training
    check_pair(plan.model, plan.data, plan.data_root)
    ranks = current()
    if ranks.world != plan.world_size:
        plan = dataclasses.replace(plan, world_size=ranks.world)
    with out_dir_lock(out_dir, "reproduce", ranks):  # one study at a time in a folder
        out = _on_main(lambda: prepare_out_dir(out_dir))  # stale temporaries
        _on_main(lambda: _check_plan(out, plan))
        progress = progress and ranks.is_main
        chosen = _timed(out, "tune_seconds", lambda: _tune(plan, out, device, progress))
        runs = _timed(out, "train_seconds", lambda: _train_final(plan, out, device, chosen,
                                                                 progress))
        return _on_main(lambda: _finish(plan, out, device, chosen, runs, progress, dtype))


def _finish(plan: Plan, out: Path, device: str, chosen: dict[str, Any],
            runs: dict[str, list[Path]], progress: bool, dtype: Any) -> dict[str, Any]:
    """Rank 0's part: costs, layer study, comparison and report."""
    cost = None
    if any(arm.name == "SGD" for arm in plan.arms):
        configs = {arm.name: _config(plan, arm, chosen[arm.name]["value"], plan.seeds[0],
                                     device, final=True) for arm in plan.arms}
        cost = _timed(out, "cost_seconds", lambda: run_isolated(measure_costs, configs, out))
    if current().distributed:  # a study in this process would see the process group
        studies = _timed(out, "study_seconds", lambda: run_isolated(
            run_study, plan, out, runs, device, progress, dtype))
    else:
        studies = _timed(out, "study_seconds", lambda: run_study(
            plan, out, runs, device, progress, dtype))
    comparison = compare_runs([str(d) for dirs in runs.values() for d in dirs])
    if cost is not None:
        apply_costs(comparison, runs, cost)
    timings = json.loads((out / "timings.json").read_text())
    return write_reproduce_report(out, plan, chosen, runs, comparison, studies, timings,
                                  provenance=_provenance(plan, device))


def _provenance(plan: Plan, device: str) -> dict[str, Any]:
    """The study's data fingerprint (the data set every run and study used) and versions."""
    return {"data": dataset_fingerprint(load_dataset(plan.data, root=plan.data_root),
                                        plan.data),
            "versions": versions(device)}
