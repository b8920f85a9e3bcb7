"""The cost stage of ``hesslens reproduce``: each arm's training cost per epoch against SGD,
measured on its own (the study's runs share cores, so their times move with any load).

After every training run has finished, one fresh process (one torch thread, nothing else of
the study running) trains each arm for one epoch with the trainer itself, at the arm's chosen
knob and the final runs' data and batch size, from the same initial weights. The arms take
turns (round-robin), ``rounds`` times after one warm-up round that is not counted; an arm's
cost is the median over rounds of its epoch time divided by SGD's epoch time in the same round,
so a slow drift of the machine's load moves every arm alike. The result is ``cost.json``.

Example:
    >>> median_ratio([1.0, 1.2, 0.9], [2.0, 2.6, 1.7])
    2.0
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hesslens.errors import HesslensInputError
from hesslens.experiments.train import train_zoo
from hesslens.files import write_json
from hesslens.training import TrainConfig

__all__ = ["COST_FILE", "apply_costs", "measure_costs", "median_ratio"]

COST_FILE = "cost.json"
ROUNDS = 3


def median_ratio(base: list[float], arm: list[float]) -> float:
    """The median over rounds of ``arm[r] / base[r]``."""
    return float(statistics.median(a / b for a, b in zip(arm, base)))


def _epoch_seconds(config: dict[str, Any]) -> float:
    """Wall time of one training epoch of ``config`` (the trainer's own timing of its loop)."""
    with tempfile.TemporaryDirectory(prefix="hesslens-cost-") as tmp:
        result = train_zoo(TrainConfig.from_dict(config), tmp, progress=False)
    return float(result["epochs"][-1]["epoch_seconds"])


def _measure(configs: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    load_before = _load_average()
    t0 = time.perf_counter()
    for config in configs.values():  # warm-up round: imports, allocator, first-call costs
        _epoch_seconds(config)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, config in configs.items():
            seconds[name].append(_epoch_seconds(config))
    base = seconds["SGD"]
    return {
        "method": (f"after all training, in one process alone (torch threads: "
                   f"{torch.get_num_threads()}), each arm trained one epoch at its chosen knob, "
                   f"arms in turn, {rounds} rounds after a warm-up round; cost = median over "
                   "rounds of the arm's epoch time / SGD's epoch time in the same round"),
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "seconds": time.perf_counter() - t0,
        "arms": {name: {"seconds_per_epoch": float(statistics.median(s)),
                        "round_seconds": s,
                        "vs_sgd": median_ratio(base, s)} for name, s in seconds.items()},
    }


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def measure_costs(configs: dict[str, dict[str, Any]], out: Path,
                  rounds: int = ROUNDS) -> dict[str, Any]:
    """Measure (or reuse from ``out/cost.json``) the cost of each arm's ``config`` (a
    TrainConfig dict; ``configs`` must hold ``"SGD"``). Each config is trained for one epoch
    with a constant learning rate, without tracking. Call it in a process of its own
    (:func:`hesslens.experiments.reproduce_jobs.run_isolated`)."""
    if "SGD" not in configs:
        raise HesslensInputError("the cost stage measures against an arm named SGD; the plan "
                                 "has none")
    wanted = {name: {**c, "epochs": 1, "schedule": "none", "milestones": None,
                     "track_every": 0} for name, c in configs.items()}
    path = out / COST_FILE
    if path.is_file():
        held = json.loads(path.read_text())
        if held.get("configs") == json.loads(json.dumps(wanted)):
            return held
    result = {**_measure(wanted, rounds), "configs": wanted}
    write_json(path, result)
    return result


def apply_costs(comparison: dict[str, Any], runs: dict[str, list[Path]],
                cost: dict[str, Any]) -> None:
    """Put the measured costs into ``comparison``'s arms: ``cost_vs_sgd`` and
    ``seconds_per_epoch`` from ``cost``, the times of the (shared-core) study runs kept as
    ``seconds_per_epoch_in_study``; a note says how the cost was measured."""
    by_path = {str(Path(p)): a for a in comparison.get("arms", []) for p in a["runs"]}
    for name, dirs in runs.items():
        arm = by_path.get(str(Path(dirs[0])))
        measured = cost["arms"].get(name)
        if arm is None or measured is None:
            continue
        arm["seconds_per_epoch_in_study"] = arm.get("seconds_per_epoch")
        arm["seconds_per_epoch"] = measured["seconds_per_epoch"]
        arm["cost_vs_sgd"] = measured["vs_sgd"]
        arm["cost_method"] = "cost.json"
    comparison.setdefault("notes", []).append("cost vs SGD: " + cost["method"] + ".")
