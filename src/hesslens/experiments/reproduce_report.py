"""The outputs of ``hesslens reproduce``: ``results.json``, the comparison files, figures and
one self-contained ``report.html`` that says which of the paper's findings held here.

Every figure has a caption (what is plotted, which runs, units); legends use the arm names of
the table; accuracy is in % everywhere; verdicts are coloured badges; each layer study's own
report is linked.

Example:
    >>> from hesslens.experiments.reproduce_report import arm_table_rows
    >>> arm_table_rows({})
    []
"""

from __future__ import annotations

import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

from hesslens.analysis.intervals import t_interval
from hesslens.analysis.probe_spectra import ProbeSpectra
from hesslens.curvature.layers import middle_indices
from hesslens.experiments import reproduce_findings as findings
from hesslens.experiments.reproduce_plan import Plan, slug
from hesslens.experiments.reproduce_study import EXTRA

__all__ = ["arm_table_rows", "write_reproduce_report"]

#: Captions of the layer study's figures (``hesslens.report.layer_report.FIGURES``).
STUDY_CAPTIONS = {
    "densities": "Eigenvalue density (log scale) of each layer's Hessian block against the "
                 "full Hessian's, each scaled by its own top eigenvalue (x axis: "
                 "lambda / max|lambda|); panel titles give the layer's normalised depth and "
                 "its W1 distance to the full spectrum.",
    "similarity_depth": "W1 distance of each layer's spectrum to the full one against the "
                        "layer's normalised depth (0 = first layer, 1 = last; shaded: middle "
                        "layers); smaller is more similar; the star marks the most similar.",
    "layer_curvature": "Top eigenvalue (left) and trace (right, ± standard error) of each "
                       "layer's Hessian block; dashed: the full network's.",
    "gauss_newton": "Gauss-Newton split Hessian = G + residual: top eigenvalue of the Hessian, "
                    "of G and largest |eigenvalue| of the residual per entry (log scale), and "
                    "the full network's three densities.",
}


def _arms_by_name(comparison: dict[str, Any], runs: dict[str, list[Path]]) -> dict[str, Any]:
    by_path = {str(Path(p)): a for a in comparison["arms"] for p in a["runs"]}
    return {name: by_path[str(Path(dirs[0]))] for name, dirs in runs.items()
            if str(Path(dirs[0])) in by_path}


def arm_table_rows(arms: dict[str, Any], chosen: dict[str, Any] | None = None) -> list[dict]:
    """One row per arm: knob, test accuracy (%), final trace and top eigenvalue, cost."""
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


# ---------------------------------------------------------------------- figures
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
    ax.set_ylabel("relative to the first tracked record (epoch 0)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


METRICS = {  # comparison curve key: (file, y label, title, scale)
    "test_acc": ("test_accuracy.png", "test accuracy (%)", "Test accuracy", 100.0),
    "trace": ("trace.png", "Hessian trace (analysis subset)", "Hessian trace", 1.0),
    "top_eigenvalue": ("top_eigenvalue.png", "top Hessian eigenvalue (analysis subset)",
                       "Top Hessian eigenvalue", 1.0),
}


def _arm_figures(arms: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
    from hesslens.report.figures import plot_arm_curves

    out = []
    n_seeds = sorted({a["n_seeds"] for a in arms.values()})
    for key, (name, ylabel, title, scale) in METRICS.items():
        curves = {arm: a["curves"][key] for arm, a in arms.items() if a["curves"].get(key)}
        if not curves:
            continue
        path = plot_arm_curves(curves, figures_dir / name, ylabel=ylabel, scale=scale,
                               title=f"{title} per arm (mean ± std over seeds)")
        out.append((path, f"{ylabel[0].upper() + ylabel[1:]} over epochs, one line per arm "
                          f"(the table's names), mean over {'/'.join(map(str, n_seeds))} "
                          "seeds with a band of ± one standard deviation"
                          + ("; curvature on the fixed analysis subset (10 training examples "
                             "per class), epoch 0 = initialisation." if key != "test_acc"
                             else ".")))
    return out


def _units(states: dict[str, Any], fn: Any) -> list[list[float]]:
    return [fn(ProbeSpectra.from_dict(states[s])) for s in sorted(states)]


def _layer_intervals(states: dict[str, Any]) -> dict[str, list[Any]]:
    """Per layer: mean W1 to the full spectrum and its 95 % interval over seeds x probes."""
    pss = [ProbeSpectra.from_dict(states[s]) for s in sorted(states)]
    names = pss[0].names
    out: dict[str, list[Any]] = {"x": names, "mean": [], "low": [], "high": []}
    for j in range(len(names)):
        units = [[float(v) for v in ps.distances()[:, j]] for ps in pss]
        m, lo, hi = findings.seed_probe_interval(units)
        out["mean"].append(m)
        out["low"].append(lo)
        out["high"].append(hi)
    return out


def _accuracy_text(deep: dict[str, Any]) -> str:
    """`` Test accuracy after E epochs: m ± s %`` of the deeper net's runs, or ``""``."""
    acc = deep.get("test_acc") or {}
    parts = []
    for e in sorted(acc, key=int):
        vals = [100 * float(v) for v in acc[e].values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        parts.append(f"{e} epochs {statistics.fmean(vals):.2f} ± {sd:.2f} %")
    return (" Test accuracy (mean ± std over seeds): " + ", ".join(parts) + ".") if parts else ""


def _finding2_figures(extra: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
    from hesslens.report.figures import plot_intervals

    out = []
    deep = extra.get("deep") or {}
    spectra = deep.get("spectra") or {}
    if spectra:
        last = str(max(int(e) for e in spectra))
        names = ProbeSpectra.from_dict(next(iter(spectra[last].values()))).names
        middle = [names[i] for i in middle_indices(len(names))]
        groups = {f"{deep['model']}, epoch {e}": _layer_intervals(spectra[e])
                  for e in sorted(spectra, key=int)}
        out.append((plot_intervals(groups, figures_dir / "deep_layer_distances.png",
                                   xlabel="layer (forward order; shaded: middle)",
                                   ylabel="W1 to the full spectrum (units of top eigenvalue)",
                                   title=f"{deep['model']}: each layer's distance to the full "
                                         "spectrum", shade=middle, zero=False),
                    f"{deep['model']} trained with SGD on {deep['data']}: W1 distance of each "
                    "layer's spectrum to the full Hessian's (each scaled by its own top "
                    f"eigenvalue), mean and 95 % interval over {len(deep['seeds'])} seeds x "
                    f"{extra['sizes']['probes']} probes (two-level bootstrap), at each "
                    "measured epoch count (epoch 0 = initialisation). Shaded: the middle "
                    "layers." + _accuracy_text(deep)))
        d = {"x": [], "mean": [], "low": [], "high": []}
        for e in sorted(spectra, key=int):
            m, lo, hi = findings.seed_probe_interval(
                _units(spectra[e], findings.middle_minus_outer))
            d["x"].append(int(e))
            for k, v in zip(("mean", "low", "high"), (m, lo, hi)):
                d[k].append(v)
        out.append((plot_intervals({deep["model"]: d}, figures_dir / "deep_middle_gap.png",
                                   xlabel="epoch", ylabel="D = outer minus middle mean W1",
                                   title="Are the middle layers closer to the full spectrum?"),
                    f"D = mean W1 of the outer layers minus that of the middle layers of "
                    f"{deep['model']} (positive: the middle layers are more like the whole), "
                    "mean and 95 % interval over seeds x probes, along training from "
                    "initialisation (epoch 0)."))
    return out


def _transformer_figures(extra: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
    from hesslens.report.figures import plot_intervals

    tf = extra.get("transformer") or {}
    if not tf.get("probes"):
        return []
    ps = ProbeSpectra.from_dict(tf["probes"])
    short = [n.replace("transformer.", "") for n in ps.names]
    states = {"initialisation": tf["probes"]}
    trained = tf.get("trained") or {}
    if trained.get("probes"):
        states[f"after {trained['steps']} steps"] = trained["probes"]
    groups = {}
    for label, probes in states.items():
        g = _layer_intervals({"0": probes})
        g["x"] = short
        groups[label] = g
    middle = [short[i] for i in middle_indices(len(short))]
    out = [(plot_intervals(groups, figures_dir / "transformer_block_distances.png",
                           xlabel="block (forward order; shaded: middle)",
                           ylabel="W1 to the full spectrum (units of top eigenvalue)",
                           title=f"{tf['model']}: each block vs the whole",
                           shade=middle, zero=False, rotate=True),
            f"{tf['model']} on {tf['data']} ({tf['num_sequences']} sequences), at "
            "initialisation" + (f" and after {trained['steps']} full-batch AdamW steps"
                                if trained.get("probes") else "")
            + ": W1 distance of each block's spectrum (q, k, v, o, mlp_in, mlp_out per layer, "
            "embeddings, norms) to the full Hessian's, mean and 95 % t-interval over "
            f"{ps.n_probes} probes. Shaded: the middle blocks.")]
    het: dict[str, list[Any]] = {"x": [], "mean": [], "low": [], "high": []}

    def add(label: str, values: list[float]) -> None:
        m, lo, hi = t_interval(values)
        for k, v in zip(("x", "mean", "low", "high"), (label, m, lo, hi)):
            het[k].append(v)

    add(f"{tf['model']} blocks (init)", ps.heterogeneity())
    if trained.get("probes"):
        add(f"{tf['model']} blocks (trained)",
            ProbeSpectra.from_dict(trained["probes"]).heterogeneity())
    default = extra.get("default") or {}
    for state, label in (("init", "init"), ("trained", "trained")):
        if default.get(state):
            add(f"{default['model']} layers ({label})",
                [h for s in default[state].values() for h in
                 ProbeSpectra.from_dict(s).heterogeneity()])
    deep = extra.get("deep") or {}
    for e in ("0", str(max((int(k) for k in deep.get("spectra", {})), default=0))):
        if e in deep.get("spectra", {}):
            add(f"{deep['model']} layers (epoch {e})",
                [h for s in deep["spectra"][e].values() for h in
                 ProbeSpectra.from_dict(s).heterogeneity()])
    out.append((plot_intervals({"H": het}, figures_dir / "heterogeneity.png", xlabel="",
                               ylabel="H = mean pairwise W1 between blocks",
                               title="How unlike one another the blocks' spectra are",
                               zero=False, rotate=True),
                "Heterogeneity H: the mean W1 distance between the spectra of every pair of "
                "blocks (layers), each scaled by its own top eigenvalue; the same metric for "
                "the transformer's blocks and the other networks' layers; mean and 95 % "
                "t-interval over probes (and seeds)."))
    return out


# ---------------------------------------------------------------------- sections
def _verdict_table(checks: list[findings.Finding]) -> Any:
    from hesslens.report.html import Badge, Table

    def stat(c: findings.Finding) -> str:
        parts = []
        if c.interval is not None and not any(math.isnan(x) for x in c.interval):
            parts.append(f"95 % interval [{c.interval[0]:.3g}, {c.interval[1]:.3g}]")
        if c.p_value is not None and not math.isnan(c.p_value):
            parts.append(f"p = {c.p_value:.3g}")
        return (c.setting + ": " if c.setting and parts else "") + "; ".join(parts) or "–"

    return Table(["finding", "verdict", "interval / p-value", "numbers", "rule"],
                 [[c.claim, Badge(c.verdict), stat(c), c.numbers, c.rule] for c in checks])


def _tuning_section(chosen: dict[str, Any]) -> list[Any]:
    """The tuning grid: each value's validation accuracy (%), mean ± std, min-max and per
    tuning seed, and per arm the margin of the choice against its standard error."""
    from hesslens.report.html import Paragraph, Table

    def pct(v: Any) -> Any:
        return None if v is None else 100 * float(v)

    def spread(g: dict[str, Any]) -> str:
        if g.get("val_acc_min") is None or g.get("val_acc_max") is None:
            return "–"
        return f"{pct(g['val_acc_min']):.2f}-{pct(g['val_acc_max']):.2f}"

    def seeds(g: dict[str, Any]) -> str:
        return ", ".join(f"{pct(v):.2f}" for v in g.get("val_acc_seeds") or []) or "–"

    def mark(g: dict[str, Any], text: str) -> str:
        bad = g.get("diverged_seeds") or []
        gone = ("diverged on seed" + ("s " if len(bad) > 1 else " ")
                + ", ".join(map(str, bad)) + " (scored 0)") if bad else ""
        return "; ".join(t for t in (text, gone) if t)

    rows, notes = [], []
    for name, c in chosen.items():
        if not c.get("grid") and c.get("val_acc") is not None:  # the knob-less reference
            rows.append([name, "–", "–", pct(c["val_acc"]), pct(c.get("val_acc_std")),
                         spread(c), seeds(c), mark(c, "reference")])
        for g in c.get("grid", []):
            rows.append([name, c["knob"], g["value"], pct(g["val_acc"]),
                         pct(g.get("val_acc_std")), spread(g), seeds(g),
                         mark(g, "chosen" if g["value"] == c["value"] else "")])
        if c.get("grid") and c.get("margin") is not None and c.get("stderr"):
            within = c["margin"] < 2 * c["stderr"]
            notes.append(f"{name}: margin of the chosen value over the next {pct(c['margin']):.2f}"
                         f" points, standard error {pct(c['stderr']):.2f}"
                         + (" (within noise: under 2 standard errors)" if within else ""))
    if not rows:
        return []
    tune_seeds = next((c.get("tune_seeds") for c in chosen.values() if c.get("tune_seeds")),
                      None)
    rule = next((c.get("rule") for c in chosen.values() if c.get("rule")), None)
    return [Paragraph("Each arm's knob on the validation split of the training set (never the "
                      "test set), with seeds the final runs do not use"
                      + (f" ({', '.join(map(str, tune_seeds))})" if tune_seeds else "")
                      + "; validation accuracy in %, mean ± std over the tuning seeds, their "
                        "range and each seed's value." + (f" Choice: {rule}." if rule else "")
                      + (" " + "; ".join(notes) + "." if notes else "")),
            Table(["arm", "knob", "value", "validation accuracy %", "± std", "min-max",
                   "per tuning seed", ""], rows, fmt=".4g")]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _seconds_text(extra: dict[str, Any]) -> str:
    parts = []
    for key, label in (("default", "default model per probe"), ("deep", "deeper net"),
                       ("transformer", "transformer")):
        s = (extra.get(key) or {}).get("seconds")
        if s:
            parts.append(f"{label} {s['wall']:.0f} s wall / {s['cpu']:.0f} s CPU")
    s = extra.get("layer_study_seconds")
    if s:
        parts.insert(0, f"layer studies {s['wall']:.0f} s wall / {s['cpu']:.0f} s CPU")
    return "; ".join(parts)


def write_reproduce_report(out: Path, plan: Plan, chosen: dict[str, Any],
                           runs: dict[str, list[Path]], comparison: dict[str, Any],
                           studies: dict[str, Any], timings: dict[str, float],
                           provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write everything; return the content of ``results.json`` plus ``summary_text``.
    ``provenance`` (``{"data": fingerprint, "versions": ...}``) goes into ``results.json``;
    without it the versions of this process are recorded. ``studies`` is
    :func:`~hesslens.experiments.reproduce_study.run_study`'s result."""
    from hesslens.experiments.common import versions
    from hesslens.experiments.compare import load_run, write_comparison
    from hesslens.files import write_bytes, write_json
    from hesslens.report.html import Badge, Code, Figure, Link, Paragraph, Report, Table

    extra = studies.get(EXTRA) or {}
    layer_studies = {k: v for k, v in studies.items() if k != EXTRA}
    arms = _arms_by_name(comparison, runs)
    write_comparison(comparison, out / "compare", figures=False)
    sgd_runs = [load_run(d) for d in runs.get("SGD", [])]
    study = layer_studies.get("SGD")
    default = extra.get("default") or {}
    deep = extra.get("deep") or {}
    num_classes = default.get("num_classes") or 10
    settings = {}
    if deep.get("spectra"):
        last = str(max(int(e) for e in deep["spectra"]))
        settings[f"{deep['model']} after {last} epochs"] = deep["spectra"][last]
    if default.get("trained"):
        settings[f"{default['model']} (the default model), final SGD"] = default["trained"]
    checks = [
        findings.layer_spectra_like_full(study, default.get("trained"), default.get("init"),
                                         num_classes, num_samples=default.get("num_samples")),
        findings.middle_layers_most_similar(
            settings, {int(e): v for e, v in (deep.get("spectra") or {}).items()}),
        findings.curvature_falls(sgd_runs),
    ]
    if study:
        checks.append(findings.gauss_newton_close(study))
    else:
        checks.append(findings.Finding("G is close to the Hessian.", "not measured", "", ""))
    checks.append(findings.htr_helps(arms))
    tf = extra.get("transformer") or {}
    tf_model = tf.get("model", "gpt-nano")
    beyond = [findings.transformer_blocks(
        tf.get("probes"), {f"{default['model']} layers at initialisation": default["init"]}
        if default.get("init") else None, tf_model, "at initialisation")]
    if (tf.get("trained") or {}).get("probes"):
        t = tf["trained"]
        beyond.append(findings.transformer_blocks(
            t["probes"], {f"{default['model']} layers, trained": default["trained"]}
            if default.get("trained") else None, tf_model,
            f"after {t['steps']} full-batch AdamW steps (train accuracy "
            f"{100 * t['train_acc']:.1f} %, test {100 * t['test_acc']:.1f} %)"))

    edge = findings.edge_of_stability(extra.get("edge_of_stability"))

    figures_dir = out / "figures"
    arm_figs = _arm_figures(arms, figures_dir)
    layer_figs = []
    for key, title, what in (
            ("layer_trace", "Hessian trace per layer over training (SGD)", "trace"),
            ("layer_top_eigenvalue", "Top eigenvalue per layer over training (SGD)",
             "top eigenvalue")):
        png = _layer_curvature_figure(sgd_runs, key, title)
        if png:
            layer_figs.append((write_bytes(figures_dir / f"{key}_over_epochs.png", png),
                               f"Hessian {what} of each layer's block and of the full network "
                               f"(black) over epochs for the SGD arm, each divided by its "
                               f"value at epoch 0 (initialisation), mean over "
                               f"{len(sgd_runs)} seeds; log scale; analysis subset of 10 "
                               "training examples per class."))
    f2_figs = _finding2_figures(extra, figures_dir)
    tf_figs = _transformer_figures(extra, figures_dir)

    rows = arm_table_rows(arms, chosen)
    results = {
        "schema": "hesslens.reproduce/1",
        "plan": plan.to_dict(),
        "tuning": chosen,
        "arms": {name: {k: arm[k] for k in ("label", "seeds", "final", "seconds_per_epoch",
                                             "cost_vs_sgd", "runs")}
                 for name, arm in arms.items()},
        "findings": [c.to_dict() for c in checks],
        "beyond_the_paper": [c.to_dict() for c in beyond + edge],
        "studies": {name: str(out / "study" / slug(name) / "results.json")
                    for name in layer_studies},
        "extra_studies": {
            "sizes": extra.get("sizes"),
            "files": {k: str(p) for k, p in (
                ("default", out / "study" / "probes" / "default.json"),
                ("deep", out / "study" / str(deep.get("model", "mlp5")) / "probes.json"),
                ("transformer", out / "study" / str(tf.get("model", "gpt-nano"))
                 / "probes.json")) if p.is_file()},
            "seconds": {k: (extra.get(k) or {}).get("seconds")
                        for k in ("default", "deep", "transformer")},
            "deep_test_acc": deep.get("test_acc")},
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
    counts = {v: sum(c.verdict == v for c in checks) for v in findings.VERDICTS}
    report.section(
        "Findings of the paper, checked here",
        Paragraph(["Each finding of Sankar et al. (AAAI 2021) with the verdict on this run ("]
                  + [x for v, n in counts.items() if n for x in (Badge(v), f" {n}  ")]
                  + ["), the numbers behind it and the rule that turned the numbers into the "
                     "verdict, with its threshold and its 95 % interval or p-value. A rule that "
                     "also passes on a control that should fail it is marked not specific."]),
        _verdict_table(checks),
        *[Figure.from_file(p, caption=c) for p, c in f2_figs])
    report.section(
        "Beyond the paper: a transformer's blocks",
        Paragraph("The same layer-vs-whole comparison on a small GPT's blocks (the "
                  "'transformer' grouping: q, k, v, o, mlp_in, mlp_out of each layer, the "
                  "embeddings and the norms), and how heterogeneous the blocks' spectra are "
                  "next to a CNN's layers (Zhang et al. 2024 report strong block heterogeneity "
                  "in transformers and little in CNNs), with one metric for both."),
        _verdict_table(beyond),
        *[Figure.from_file(p, caption=c) for p, c in tf_figs])
    if edge:
        from hesslens.experiments.reproduce_eos import edge_section

        report.section("Beyond the paper: the edge of stability", *edge_section(
            extra["edge_of_stability"], figures_dir, _verdict_table(edge)))
    cost = _read_json(out / "cost.json")
    if cost:
        loads = [cost.get("load_average_before"), cost.get("load_average_after")]
        loads = [v[0] if isinstance(v, (list, tuple)) and v else v for v in loads]
        cost_note = (" Cost per epoch vs SGD was measured on its own after training "
                     "(cost.json): " + str(cost.get("method", "")).rstrip(".")
                     + (f"; 1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after "
                        "(other work on the machine)"
                        if all(isinstance(v, (int, float)) for v in loads) else "") + ".")
    elif getattr(plan, "workers", 1) > 1:
        cost_note = (f" Runs trained {plan.workers} at a time on shared cores, so s / epoch "
                     "and its ratio to SGD include contention.")
    else:
        cost_note = " Runs trained one at a time."
    recipe = plan.recipe() if hasattr(plan, "recipe") else None
    report.section(
        "Arms at equal budget",
        Paragraph([(f"Every arm shares one recipe: {recipe}. " if recipe else "")
                   + "Every arm trains the same model with the same epochs, batch size, "
                   "learning rate and schedule; each arm's own knob was tuned on a validation "
                   "split of the training set with separate seeds (never on the test set). "
                   "Accuracy "
                   "is the final epoch's test accuracy in %, mean ± std over seeds; trace and "
                   "top eigenvalue are measured on a fixed analysis subset (10 per class) after "
                   "the last epoch; s / epoch is the wall time of a training epoch and cost vs "
                   "SGD its ratio to the SGD arm's." + cost_note + " Per-run numbers: ",
                   Link("compare/compare.csv", "compare/compare.csv"), "."]),
        Table(list(rows[0]) if rows else ["arm"], rows),
        *[Figure.from_file(p, caption=c) for p, c in arm_figs])
    tuning = _tuning_section(chosen)
    if tuning:
        report.section("Tuning on the validation split", *tuning)
    if layer_figs:
        report.section(
            "Curvature over training, per layer",
            Paragraph("Full-network and per-layer trace and top eigenvalue of the SGD runs, "
                      "each relative to its value at initialisation (mean over seeds)."),
            *[Figure.from_file(p, caption=c) for p, c in layer_figs])
    for name in layer_studies:
        study_dir = out / "study" / slug(name)
        rel = study_dir.relative_to(out).as_posix()
        pngs = sorted(study_dir.glob("*.png"))
        report.section(
            f"Layer study of the final {name} model",
            Paragraph(["Full results: ", Link(f"{rel}/report.html", f"{rel}/report.html"),
                       " and ", Link(f"{rel}/results.json", f"{rel}/results.json"),
                       f" (seed {plan.seeds[0]}'s final {name} model, analysis subset of 10 "
                       "training examples per class). Similarity is the Wasserstein-1 distance "
                       "between spectral measures, each scaled by its own top eigenvalue."]),
            *[Figure.from_file(p, caption=f"{name}, final model: "
                               + STUDY_CAPTIONS.get(p.stem, p.stem.replace("_", " ")))
              for p in pngs])
    files = results["extra_studies"]["files"]
    report.section(
        "Run",
        Paragraph("Wall time per stage (seconds, summed over every leg of a resumed or "
                  "repeated study): " + ", ".join(
                      f"{k.replace('_seconds', '')} {v:.0f}" for k, v in timings.items())
                  + ". Parts of the study stage, when they were measured (wall and CPU time "
                    "of this process and its worker processes): "
                  + (_seconds_text(extra) or "-") + "."
                  + (f" Trained on {plan.world_size} torchrun ranks."
                     if getattr(plan, "world_size", 1) > 1 else "")),
        Paragraph(["Per-probe spectra behind findings 1 and 2 and the transformer section: "]
                  + [x for i, (k, p) in enumerate(files.items()) for x in
                     ([", "] if i else []) + [Link(k, Path(p).relative_to(out).as_posix())]]
                  + ["."]),
        *[Paragraph("Note: " + n) for n in comparison.get("notes", [])
          if not (cost and n.startswith("cost vs SGD"))],  # said with the table already
        Code(json.dumps(results["plan"], indent=1), summary="plan"),
        Code(json.dumps(extra.get("sizes"), indent=1), summary="sizes of the extra studies"))
    report.write(out / "report.html")

    w = max([20, *(len(r["arm"]) for r in rows)])
    lines = [f"{'arm':<{w}} seeds  test acc %       final trace      s/epoch",
             *[f"{r['arm']:<{w}} {r['seeds']:>5}  {r['test accuracy %']:<16} "
               f"{r['final trace']:<16} {r['s / epoch'] or 0:.2f}" for r in rows], "",
             "paper's findings:"]
    lines += [f"  [{c.verdict}] {c.claim}" for c in checks]
    # the transformer claim is checked in two states: say which line is which
    lines += ["beyond the paper:"] + [
        f"  [{c.verdict}] {c.claim}" + (f" ({c.setting})" if getattr(c, "setting", "") else "")
        for c in beyond + edge]
    results["summary_text"] = "\n".join(lines)
    return results
