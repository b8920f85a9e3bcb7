"""``hesslens compare RUN_DIR... [--out DIR]``: compare training arms over seeds.

Runs (folders written by ``hesslens train``) are grouped into *arms*: runs whose configurations
agree in everything but the seed (and the device, the data folder and the tracking settings) are
seeds of one arm. For each
arm the command prints and writes

* the final test accuracy, mean +- standard deviation over seeds (sample std, ``ddof=1``);
* the final trace and top eigenvalue of the Hessian, where the runs tracked curvature
  (``--track-every``), mean +- std;
* the wall time per training epoch and its ratio to the plain-SGD arm, if there is one;

to ``compare.json`` (with ``data``: the runs' data fingerprints, and ``versions``) and
``compare.csv``, and draws the test accuracy, trace and top eigenvalue
against the epoch, one line per arm with a band of +- one standard deviation over seeds
(``test_accuracy.png``, ``trace.png``, ``top_eigenvalue.png``). A folder that holds no
``metrics.json`` but whose sub-folders do stands for those sub-folders. Arms that differ in epochs,
batch size, model or data are flagged: such a comparison is not at equal budget.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError
from hesslens.experiments.common import out_dir_lock, prepare_out_dir, seed_int
from hesslens.experiments.preflight import check_ready
from hesslens.files import write_bytes, write_csv, write_json
from hesslens.provenance import versions
from hesslens.report.style import new_figure, png_bytes
from hesslens.training.config import RUN_ONLY_FIELDS, arm_key, arm_label

__all__ = ["add_compare_arguments", "compare_runs", "load_run", "preflight_compare",
           "run_compare"]

METRIC_TITLES = {
    "test_acc": "test accuracy",
    "trace": "Hessian trace (analysis subset)",
    "top_eigenvalue": "top Hessian eigenvalue (analysis subset)",
}
FIGURE_NAMES = {
    "test_acc": "test_accuracy.png",
    "trace": "trace.png",
    "top_eigenvalue": "top_eigenvalue.png",
}
# Fields whose differences between arms make the comparison unequal in budget or task.
BUDGET_FIELDS = ("epochs", "batch_size", "model", "data")
# Fields arm_label already shows.
LABEL_FIELDS = ("sam_rho", "weight_decay", "htr_gamma", "htr_layers", "htr_method",
                "htr_curvature", "htr_every", "htr_start")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hesslens compare`` options to ``parser``."""
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="folders written by 'hesslens train' (or folders holding them)")
    parser.add_argument("--out", default="compare", metavar="DIR",
                        help="where compare.json, compare.csv and the figures go "
                             "(default ./compare)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="accepted for uniformity with the other commands; unused")
    parser.add_argument("--device", default="cpu",
                        help="accepted for uniformity with the other commands; unused")


# ---------------------------------------------------------------------- loading
def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if not p.exists():
            raise HesslensInputError(f"run folder {s!r} does not exist")
        if not p.is_dir():
            raise HesslensInputError(f"{s!r} is not a folder; pass the --out folder of a run")
        if (p / "metrics.json").is_file():
            out.append(p)
            continue
        subs = sorted(q for q in p.iterdir() if q.is_dir() and (q / "metrics.json").is_file())
        if not subs:
            raise HesslensInputError(
                f"no metrics.json in {s!r} (nor in its sub-folders): is it the --out folder "
                "of a 'hesslens train' run?"
            )
        out.extend(subs)
    seen: set[Path] = set()
    unique = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def load_run(path: str | Path) -> dict[str, Any]:
    """``{"path", "config", "arm", "epochs"}`` of one run folder (raises on bad input)."""
    p = Path(path)
    f = p / "metrics.json"
    if not f.is_file():
        raise HesslensInputError(f"no metrics.json in {str(p)!r}: not a 'hesslens train' run")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        detail = " ".join(str(e).split())
        raise HesslensInputError(f"{str(f)!r} is not readable JSON ({detail})") from None
    if not isinstance(data, dict) or "config" not in data or "epochs" not in data:
        raise HesslensInputError(f"{str(f)!r} lacks 'config' or 'epochs': not a training run")
    _check_run(data, str(f))
    if not data["epochs"]:
        raise HesslensInputError(f"{str(f)!r} has no completed epoch yet")
    return {"path": str(p), "config": data["config"], "epochs": data["epochs"],
            "data": data.get("data") if isinstance(data.get("data"), dict) else None}


# config fields compare formats or counts with, and the type each must have
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "sam_rho": (int, float), "weight_decay": (int, float), "htr_gamma": (int, float),
    "htr_every": (int,), "htr_start": (int,), "epochs": (int,), "batch_size": (int,),
    "seed": (int,), "model": (str,), "data": (str,), "htr_method": (str,),
    "htr_curvature": (str,), "htr_layers": (str, list),
}
_RECORD_NUMBERS = ("test_acc", "trace", "top_eigenvalue", "epoch_seconds")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_run(data: dict[str, Any], where: str) -> None:
    """Refuse a ``metrics.json`` whose fields have other types than ``hesslens train`` writes,
    naming the field (compare would otherwise fail deep inside with a TypeError)."""
    config, epochs = data["config"], data["epochs"]
    if not isinstance(config, dict):
        raise HesslensInputError(
            f"{where!r}: 'config' must be an object (the run's settings), found {_kind(config)}")
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            wanted = " or ".join("number" if t is float else t.__name__ for t in types
                                 if t is not int or float not in types)
            raise HesslensInputError(
                f"{where!r}: config {key!r} must be a {wanted}, found {_kind(value)} {value!r}")
    if not isinstance(epochs, list):
        raise HesslensInputError(
            f"{where!r}: 'epochs' must be a list of per-epoch records, found {_kind(epochs)}")
    for i, record in enumerate(epochs):
        if not isinstance(record, dict):
            raise HesslensInputError(
                f"{where!r}: epochs[{i}] must be an object, found {_kind(record)}")
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise HesslensInputError(
                f"{where!r}: epochs[{i}] lacks an integer 'epoch' (found {epoch!r})")
        for key in _RECORD_NUMBERS:
            value = record.get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise HesslensInputError(
                    f"{where!r}: epochs[{i}] {key!r} must be a number or null, found "
                    f"{_kind(value)} {value!r}")


# ---------------------------------------------------------------------- statistics
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var)


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(records):
        if r.get(key) is not None:
            return float(r[key])
    return None


def _curve(runs: list[dict[str, Any]], key: str) -> dict[str, list[Any]] | None:
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for r in run["epochs"]:
            if r.get(key) is not None:
                by_epoch.setdefault(int(r["epoch"]), []).append(float(r[key]))
    if not by_epoch:
        return None
    epochs = sorted(by_epoch)
    stats = [_mean_std(by_epoch[e]) for e in epochs]
    return {"epochs": epochs, "mean": [s[0] for s in stats], "std": [s[1] for s in stats],
            "n": [len(by_epoch[e]) for e in epochs]}


def compare_runs(paths: list[str]) -> dict[str, Any]:
    """Group the runs into arms and summarise them (the content of ``compare.json``)."""
    runs = [load_run(p) for p in _expand(paths)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(arm_key(run["config"]), []).append(run)

    configs = {k: {f: v for f, v in g[0]["config"].items() if f not in RUN_ONLY_FIELDS}
               for k, g in groups.items()}
    fields = sorted({f for c in configs.values() for f in c})
    varying = [f for f in fields
               if len({json.dumps(c.get(f), sort_keys=True, default=str)
                       for c in configs.values()}) > 1]
    extra = [f for f in varying if f not in LABEL_FIELDS]

    arms = []
    for key, group in groups.items():
        cfg = group[0]["config"]
        label = arm_label(cfg)
        if extra:
            label += " [" + ", ".join(f"{f}={_short(cfg.get(f))}" for f in extra) + "]"
        seeds = [r["config"].get("seed") for r in group]
        finals = {
            "test_acc": [_last(r["epochs"], "test_acc") for r in group],
            "trace": [_last(r["epochs"], "trace") for r in group],
            "top_eigenvalue": [_last(r["epochs"], "top_eigenvalue") for r in group],
        }
        secs = [float(e["epoch_seconds"]) for r in group for e in r["epochs"]
                if e.get("epoch_seconds") is not None]
        final_epochs = [int(r["epochs"][-1]["epoch"]) for r in group]
        summary: dict[str, Any] = {}
        for k, vals in finals.items():
            m, s = _mean_std([v for v in vals if v is not None])
            summary[k] = {"mean": m, "std": s, "values": vals}
        arms.append({
            "label": label,
            "config": configs[key],
            "runs": [r["path"] for r in group],
            "seeds": seeds,
            "n_seeds": len(group),
            "final_epochs": final_epochs,
            "complete": all(fe == int(cfg.get("epochs", fe)) for fe in final_epochs),
            "final": summary,
            "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
            "curves": {k: _curve(group, k) for k in METRIC_TITLES},
        })
    arms.sort(key=lambda a: (a["label"] != "SGD" and not a["label"].startswith("SGD ["),
                             a["label"]))
    sgd = [a for a in arms if a["label"] == "SGD" or a["label"].startswith("SGD [")]
    base = sgd[0]["seconds_per_epoch"] if len(sgd) == 1 else None
    for a in arms:
        a["cost_vs_sgd"] = (a["seconds_per_epoch"] / base
                            if base and a["seconds_per_epoch"] else None)

    notes = []
    unequal = [f for f in BUDGET_FIELDS if f in varying]
    if unequal:
        notes.append(f"arms differ in {unequal}: not a comparison at equal budget and task")
    if any(len(set(a["seeds"])) != a["n_seeds"] for a in arms):
        notes.append("some arm has repeated seeds: its std understates the seed-to-seed spread")
    if any(not a["complete"] for a in arms):
        notes.append("some runs stopped before their last epoch (killed? resume them)")
    if any(a["n_seeds"] < 2 for a in arms):
        notes.append("arms with one seed have no standard deviation")
    data = _data_fingerprints(runs)
    if len({d["sha256"] for d in data if d.get("sha256")}) > 1:
        notes.append("the runs were trained on different data (their data fingerprints "
                     "differ): see 'data'")
    if any(d.get("sha256") is None for d in data):
        notes.append("some runs record no data fingerprint (written by an older hesslens)")

    return {"arms": arms, "notes": notes, "n_runs": len(runs), "data": data,
            "versions": versions()}


def _data_fingerprints(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct data fingerprints of the runs, each with the runs that used it."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        fp = run.get("data") or {}
        key = json.dumps(fp, sort_keys=True, default=str)
        entry = out.setdefault(key, {**fp, "sha256": fp.get("sha256"), "runs": []})
        entry["runs"].append(run["path"])
    return list(out.values())


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _pm(m: float | None, s: float | None, fmt: str, scale: float = 1.0) -> str:
    if m is None:
        return "-"
    if s is None:
        return format(m * scale, fmt)
    return f"{format(m * scale, fmt)} ± {format(s * scale, fmt)}"


# ---------------------------------------------------------------------- output
def _table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for a in result["arms"]:
        f = a["final"]
        rows.append({
            "arm": a["label"],
            "n_seeds": a["n_seeds"],
            "seeds": " ".join(str(s) for s in a["seeds"]),
            "epochs": max(a["final_epochs"]),
            "test_acc_mean": f["test_acc"]["mean"],
            "test_acc_std": f["test_acc"]["std"],
            "trace_mean": f["trace"]["mean"],
            "trace_std": f["trace"]["std"],
            "top_eigenvalue_mean": f["top_eigenvalue"]["mean"],
            "top_eigenvalue_std": f["top_eigenvalue"]["std"],
            "seconds_per_epoch": a["seconds_per_epoch"],
            "cost_vs_sgd": a["cost_vs_sgd"],
            "runs": " ".join(a["runs"]),
        })
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one line per arm."""
    head = ["arm", "seeds", "epochs", "test acc %", "trace", "top eigenvalue", "s/epoch",
            "x SGD"]
    lines = []
    for a in result["arms"]:
        f = a["final"]
        lines.append([
            a["label"], str(a["n_seeds"]), str(max(a["final_epochs"])),
            _pm(f["test_acc"]["mean"], f["test_acc"]["std"], ".2f", 100.0),
            _pm(f["trace"]["mean"], f["trace"]["std"], ".4g"),
            _pm(f["top_eigenvalue"]["mean"], f["top_eigenvalue"]["std"], ".4g"),
            "-" if a["seconds_per_epoch"] is None else f"{a['seconds_per_epoch']:.3f}",
            "-" if a["cost_vs_sgd"] is None else f"{a['cost_vs_sgd']:.2f}",
        ])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*r) for r in lines]
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)


def metric_figure(result: dict[str, Any], key: str) -> bytes | None:
    """PNG of one metric over epochs, one line per arm (mean ± std band), or None."""
    curves = [(a["label"], a["curves"][key]) for a in result["arms"] if a["curves"][key]]
    if not curves:
        return None
    fig = new_figure(6.4, 4.2)
    ax = fig.subplots()
    for label, c in curves:
        ep, mean = c["epochs"], c["mean"]
        (line,) = ax.plot(ep, mean, marker="o" if len(ep) < 15 else None, ms=3, label=label)
        std = [s if s is not None else 0.0 for s in c["std"]]
        if any(s > 0 for s in std):
            ax.fill_between(ep, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax.locator_params(axis="x", integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel(METRIC_TITLES[key])
    if key in ("trace", "top_eigenvalue") and all(
        m is not None and m > 0 for _, c in curves for m in c["mean"]
    ):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{METRIC_TITLES[key]} (mean ± std over seeds)", fontsize=9)
    return png_bytes(fig)


def write_comparison(result: dict[str, Any], out: Path, figures: bool = True) -> list[str]:
    """Write ``compare.json``, ``compare.csv`` and (optionally) the figures into ``out``;
    returns the figure file names."""
    prepare_out_dir(out)
    rows = _table_rows(result)
    write_json(out / "compare.json", result)
    write_csv(out / "compare.csv", rows, list(rows[0]) if rows else ["arm"])
    written = []
    if figures:
        for key, name in FIGURE_NAMES.items():
            png = metric_figure(result, key)
            if png is not None:
                write_bytes(out / name, png)
                written.append(name)
    return written


def preflight_compare(args: argparse.Namespace) -> Path:
    """Everything ``hesslens compare`` can know before reading the runs: matplotlib (unless
    ``--no-figures``), the output folder (writable, not a file) and that every run folder
    exists. Returns the output folder."""
    figures = not getattr(args, "no_figures", False)
    ready = check_ready(out=args.out, device=None,
                        needs={"matplotlib": "the figures (or pass --no-figures)"} if figures
                        else {})
    _expand(list(args.runs))
    return ready.out


def run_compare(args: argparse.Namespace) -> int:
    """Run ``hesslens compare``; print the table; write files; return 0."""
    out = preflight_compare(args)
    result = compare_runs(list(args.runs))
    with out_dir_lock(out, "compare"):
        figures = write_comparison(result, out, figures=not getattr(args, "no_figures", False))
    print(format_table(result))
    print(f"wrote compare.json, compare.csv{''.join(', ' + f for f in figures)} to {out}")
    return 0
