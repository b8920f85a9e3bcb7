"""The outputs of ``hesslens reproduce``: ``results.json``, the comparison files, figures and
one self-contained ``report.html`` that says which of the paper's findings held here.

Example:
    >>> from hesslens.experiments.reproduce_report import arm_table_rows
    >>> arm_table_rows({})
    []
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from hesslens.experiments import reproduce_findings as findings
from hesslens.experiments.reproduce_plan import Plan, slug

__all__ = ["arm_table_rows", "write_reproduce_report"]


def _arms_by_name(comparison: dict[str, Any], runs: dict[str, list[Path]]) -> dict[str, Any]:
    by_path = {str(Path(p)): a for a in comparison["arms"] for p in a["runs"]}
    return {name: by_path[str(Path(dirs[0]))] for name, dirs in runs.items()
            if str(Path(dirs[0])) in by_path}


def arm_table_rows(arms: dict[str, Any], chosen: dict[str, Any] | None = None) -> list[dict]:
    """One row per arm: knob, test accuracy, final trace and top eigenvalue, cost."""
    rows = []
    for name, arm in arms.items():
        f = arm["final"]
        knob = (chosen or {}).get(name, {})

        def pm(key: str, scale: float = 1.0, fmt: str = ".3g", f=f) -> str:
            m, s = f[key]["mean"], f[key]["std"]
            if m is None:
                return "-"
            return f"{scale * m:{fmt}} ± {scale * (s or 0):{fmt}}"

        rows.append({
            "arm": name,
            "knob": "-" if not knob.get("knob") else f"{knob['knob']}={knob['value']:g}",
            "seeds": arm["n_seeds"],
            "test accuracy %": pm("test_acc", 100.0, ".2f"),
            "final trace": pm("trace"),
            "final top eigenvalue": pm("top_eigenvalue"),
            "s / epoch": arm["seconds_per_epoch"],
            "cost vs SGD": arm.get("cost_vs_sgd"),
        })
    return rows


def _layer_curvature_figure(runs: list[dict[str, Any]], key: str, title: str) -> bytes | None:
    """Per-layer curvature over epochs (mean over seeds), each layer relative to its first
    tracked value, with the full network for reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    full_key = {"layer_trace": "trace", "layer_top_eigenvalue": "top_eigenvalue"}[key]
    series: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        tracked = [e for e in run["epochs"] if e.get(key)]
        if len(tracked) < 2:
            continue
        first = tracked[0]
        for e in tracked:
            for name, v in e[key].items():
                base = first[key].get(name)
                if base:
                    series.setdefault(name, {}).setdefault(e["epoch"], []).append(v / base)
            series.setdefault("full network", {}).setdefault(e["epoch"], []).append(
                e[full_key] / first[full_key])
    if not series:
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in series.items():
        epochs = sorted(points)
        means = [sum(points[e]) / len(points[e]) for e in epochs]
        style = {"color": "black", "linewidth": 2.2} if name == "full network" else {}
        ax.plot(epochs, means, marker="o", ms=3, label=name, **style)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative to the first tracked epoch")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_reproduce_report(out: Path, plan: Plan, chosen: dict[str, Any],
                           runs: dict[str, list[Path]], comparison: dict[str, Any],
                           studies: dict[str, Any], timings: dict[str, float],
                           provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write everything; return the content of ``results.json`` plus ``summary_text``.
    ``provenance`` (``{"data": fingerprint, "versions": ...}``) goes into ``results.json``;
    without it the versions of this process are recorded."""
    from hesslens.experiments.common import versions
    from hesslens.experiments.compare import load_run, write_comparison
    from hesslens.files import write_bytes, write_json
    from hesslens.report.html import Code, Figure, Paragraph, Report, Table

    arms = _arms_by_name(comparison, runs)
    compare_figures = write_comparison(comparison, out / "compare")
    sgd_runs = [load_run(d) for d in runs.get("SGD", [])]
    checks = []
    study = studies.get("SGD")
    if study:
        checks += [findings.layer_spectra_like_full(study),
                   findings.middle_layers_most_similar(study)]
    checks.append(findings.curvature_falls(sgd_runs))
    if study:
        checks.append(findings.gauss_newton_close(study))
    checks.append(findings.htr_helps(arms))

    figures_dir = out / "figures"
    layer_figs = {}
    for key, title in (("layer_trace", "Hessian trace per layer over training (SGD)"),
                       ("layer_top_eigenvalue", "Top eigenvalue per layer over training (SGD)")):
        png = _layer_curvature_figure(sgd_runs, key, title)
        if png:
            layer_figs[key] = write_bytes(figures_dir / f"{key}_over_epochs.png", png)

    rows = arm_table_rows(arms, chosen)
    results = {
        "schema": "hesslens.reproduce/1",
        "plan": plan.to_dict(),
        "tuning": chosen,
        "arms": {name: {k: arm[k] for k in ("label", "seeds", "final", "seconds_per_epoch",
                                             "cost_vs_sgd", "runs")}
                 for name, arm in arms.items()},
        "findings": [c.to_dict() for c in checks],
        "studies": {name: str(out / "study" / slug(name) / "results.json") for name in studies},
        "notes": comparison.get("notes", []),
        "timings": timings,
        "data": (provenance or {}).get("data"),
        "training_data": comparison.get("data"),
        "versions": (provenance or {}).get("versions") or versions(),
    }
    write_json(out / "results.json", results)

    report = Report(
        "hesslens reproduce: layerwise Hessian spectra and Hessian-trace regularisation",
        subtitle=(f"{plan.model} on {plan.data}, {len(plan.seeds)} seeds x {len(plan.arms)} "
                  f"arms, {plan.epochs} epochs each, batch {plan.batch_size}, lr {plan.lr} "
                  f"({plan.name} study)"))
    report.section(
        "Findings of the paper, checked here",
        Paragraph("Each finding of Sankar et al. (AAAI 2021) with the verdict on this run, the "
                  "numbers behind it and the rule that turned the numbers into the verdict."),
        Table(["finding", "verdict", "numbers", "rule"],
              [[c.claim, c.verdict, c.numbers, c.rule] for c in checks]))
    report.section(
        "Arms at equal budget",
        Paragraph("Every arm trains the same model with the same epochs, batch size, learning "
                  "rate and schedule; each arm's own knob was tuned on a validation split of "
                  "the training set with a separate seed (never on the test set). Accuracy "
                  "is the final epoch's test accuracy, mean ± std over seeds; trace and top "
                  "eigenvalue are measured on a fixed analysis subset (10 per class) after "
                  "the last epoch; cost is wall time per epoch relative to SGD."),
        Table(list(rows[0]) if rows else ["arm"], rows),
        *[Figure.from_file(out / "compare" / name) for name in compare_figures])
    tuning_rows = [[name, c["knob"], g["value"], 100 * g["val_acc"],
                    "chosen" if g["value"] == c["value"] else ""]
                   for name, c in chosen.items() for g in c.get("grid", [])]
    if tuning_rows:
        report.section("Tuning on the validation split",
                       Table(["arm", "knob", "value", "validation accuracy %", ""],
                             tuning_rows, fmt=".4g"))
    if layer_figs:
        report.section(
            "Curvature over training, per layer",
            Paragraph("Full-network and per-layer trace and top eigenvalue of the SGD runs, each "
                      "relative to its first tracked value (mean over seeds)."),
            *[Figure.from_file(p) for p in layer_figs.values()])
    for name in studies:
        study_dir = out / "study" / slug(name)
        pngs = sorted(study_dir.glob("*.png"))
        report.section(
            f"Layer study of the final {name} model",
            Paragraph(f"Full results: {study_dir.relative_to(out)}/report.html and "
                      "results.json. Similarity is the Wasserstein-1 distance between spectral "
                      "measures, each scaled by its own top eigenvalue."),
            *[Figure.from_file(p) for p in pngs])
    report.section(
        "Run",
        Paragraph("Wall time per stage (seconds, summed over every leg of a resumed or "
                  "repeated study): " + ", ".join(
                      f"{k.replace('_seconds', '')} {v:.0f}" for k, v in timings.items())
                  + (f". Runs trained {plan.workers} at a time on shared cores, so the cost "
                     "per epoch against SGD above includes contention; "
                     "benchmarks/bench_training.py measures step costs in isolation."
                     if getattr(plan, "workers", 1) > 1 else ".")),
        *[Paragraph("Note: " + n) for n in comparison.get("notes", [])],
        Code(__import__("json").dumps(results["plan"], indent=1), summary="plan"))
    report.write(out / "report.html")

    lines = ["arm                  seeds  test acc %       final trace      s/epoch",
             *[f"{r['arm']:<20} {r['seeds']:>5}  {r['test accuracy %']:<16} "
               f"{r['final trace']:<16} {r['s / epoch'] or 0:.2f}" for r in rows], "",
             "paper's findings:"]
    lines += [f"  [{c.verdict}] {c.claim}" for c in checks]
    results["summary_text"] = "\n".join(lines)
    return results
