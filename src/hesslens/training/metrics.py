"""What a run records: one record per epoch (and one at initialisation where a callback asks
for it), ``metrics.json`` and ``metrics.csv``, and what curvature tracking cost.

Example:
    >>> totals = EpochTotals(lr=0.1, loss_sum=8.0, correct=3, penalty_sum=0.0,
    ...                      penalty_steps=0, seconds=0.5)
    >>> held = {"val_loss": None, "val_acc": None, "test_loss": 1.0, "test_acc": 0.5}
    >>> rec = epoch_record(0, totals, n_train=4, held_out=held, eval_seconds=0.1)
    >>> rec["epoch"], rec["train_loss"], rec["train_acc"], rec["htr_penalty"]
    (1, 2.0, 0.75, None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError
from hesslens.files import write_csv, write_json
from hesslens.training.config import TrainConfig, arm_label
from hesslens.training.epoch import EpochTotals

__all__ = ["METRICS_CSV", "METRICS_JSON", "TIMING_KEYS", "epoch_record", "initial_record",
           "tracking_cost", "write_metrics"]

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
#: The wall times in a record: they differ between two runs that are otherwise bit-identical.
TIMING_KEYS = ("epoch_seconds", "eval_seconds", "tracking_seconds")


def initial_record(lr: float, held_out: Mapping[str, Any], eval_seconds: float) -> dict[str, Any]:
    """The record of epoch 0: the held-out numbers at initialisation (no training keys)."""
    return {"epoch": 0, "lr": lr, **held_out, "eval_seconds": eval_seconds}


def epoch_record(epoch: int, totals: EpochTotals, n_train: int, held_out: Mapping[str, Any],
                 eval_seconds: float) -> dict[str, Any]:
    """The record of the 0-based ``epoch`` (filed as ``epoch + 1``): its training means over
    the ``n_train`` examples, the held-out numbers after it, the penalty's mean and the times.
    A non-finite training loss is refused: the run diverged."""
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "lr": totals.lr,
        "train_loss": totals.loss_sum / n_train,
        "train_acc": totals.correct / n_train,
        **held_out,
        "htr_penalty": (totals.penalty_sum / totals.penalty_steps if totals.penalty_steps
                        else None),
        "htr_steps": totals.penalty_steps,
        "epoch_seconds": totals.seconds,
        "eval_seconds": eval_seconds,
    }
    if not math.isfinite(record["train_loss"]):
        raise HesslensInputError(
            f"training diverged at epoch {epoch + 1} (train loss "
            f"{record['train_loss']}); lower the learning rate or the HTR gamma"
        )
    return record


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
