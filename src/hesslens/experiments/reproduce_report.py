"""The outputs of ``hesslens reproduce``: ``results.json``, the comparison files, figures and
one self-contained ``report.html`` that says which of the paper's findings held here.

The page reads at a glance: its first screen holds every verdict, one row per finding with
the verdict, one sentence with the number that decided it and its 95 % interval, and a link to
its figure; the claim, every number and the rule fold away under the row, as do the arm and
tuning tables' extra columns. Each section is written by a function of its own. Every figure
(:mod:`hesslens.experiments.reproduce_figures`) has a caption (what is plotted, which runs,
units); legends use the arm names of the table; accuracy is in % everywhere; each layer
study's own report is linked.

Example:
    >>> from hesslens.experiments.reproduce_report import arm_table_rows
    >>> arm_table_rows({})
    []
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hesslens.experiments import reproduce_findings as findings
from hesslens.experiments.common import versions
from hesslens.experiments.compare import load_run, write_comparison
from hesslens.experiments.reproduce_eos import edge_section
from hesslens.experiments.reproduce_figures import (
    arm_figures,
    finding2_figures,
    layer_figures,
    transformer_figures,
)
from hesslens.experiments.reproduce_plan import Plan, slug
from hesslens.experiments.reproduce_study import EXTRA
from hesslens.files import write_json
from hesslens.report.html import (
    Badge,
    Code,
    Figure,
    FoldingTable,
    Link,
    Paragraph,
    Report,
    Strong,
    Table,
)

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


# ---------------------------------------------------------------------- findings
def _check_findings(layer_studies: dict[str, Any], extra: dict[str, Any],
                    sgd_runs: list[dict[str, Any]], arms: dict[str, Any]
                    ) -> tuple[list[findings.Finding], list[findings.Finding]]:
    """The paper's five findings and the transformer's (at initialisation, and trained where
    it was), each checked on what the study measured."""
    study = layer_studies.get("SGD")
    default = extra.get("default") or {}
    deep = extra.get("deep") or {}
    settings = {}
    if deep.get("spectra"):
        last = str(max(int(e) for e in deep["spectra"]))
        settings[f"{deep['model']} after {last} epochs"] = deep["spectra"][last]
    if default.get("trained"):
        settings[f"{default['model']} (the default model), final SGD"] = default["trained"]
    checks = [
        findings.layer_spectra_like_full(study, default.get("trained"), default.get("init"),
                                         default.get("num_classes") or 10,
                                         num_samples=default.get("num_samples")),
        findings.middle_layers_most_similar(
            settings, {int(e): v for e, v in (deep.get("spectra") or {}).items()}),
        findings.curvature_falls(sgd_runs),
        findings.gauss_newton_close(study) if study else findings.Finding(
            "G is close to the Hessian.", "not measured", "", "",
            title="The Gauss-Newton part is close to the Hessian",
            summary="The SGD arm's layer study was not run."),
        findings.htr_helps(arms),
    ]
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
    return checks, beyond


#: The figures each finding links to, those that were drawn: ``(link text, file under
#: --out)``; the paper's five in order, then the transformer's.
FINDING_FIGURES = (
    (("densities", "study/sgd/densities.png"), ("similarity", "study/sgd/similarity_depth.png")),
    (("middle gap", "figures/deep_middle_gap.png"),
     ("distances", "figures/deep_layer_distances.png")),
    (("per layer", "figures/layer_top_eigenvalue_over_epochs.png"),
     ("top eigenvalue", "figures/top_eigenvalue.png")),
    (("Gauss-Newton", "study/sgd/gauss_newton.png"),),
    (("accuracy", "figures/test_accuracy.png"), ("trace", "figures/trace.png")),
)
TRANSFORMER_FIGURES = (("blocks", "figures/transformer_block_distances.png"),
                       ("heterogeneity", "figures/heterogeneity.png"))
EDGE_FIGURES = (("sharpness", "figures/edge_of_stability.png"),)


def figure_id(out: Path, path: Path) -> str:
    """The page anchor of the figure drawn from ``path`` (a file under ``out``)."""
    rel = Path(path).relative_to(out).with_suffix("").as_posix()
    return "fig-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in rel)


def _figure(out: Path, path: Path, caption: str) -> Any:
    return Figure.from_file(path, caption=caption, id=figure_id(out, path))


def _figure_links(out: Path, choices: tuple[tuple[str, str], ...]) -> list[Any]:
    """Links to the figures of ``choices`` that were drawn (in-page anchors), or a dash."""
    links: list[Any] = []
    for text, rel in choices:
        if (out / rel).is_file():
            links += [", "] if links else []
            links.append(Link(text, "#" + figure_id(out, out / rel)))
    return links or ["–"]


def _finding_rows(checks: list[findings.Finding], figures: list[tuple[tuple[str, str], ...]],
                  out: Path) -> Any:
    """One row per finding: verdict, title, the one sentence that decided it, figure links;
    the claim, every number, the headline statistic and the rule fold away under it."""
    rows = []
    for c, choices in zip(checks, figures):
        stat = []
        if c.interval is not None and not any(math.isnan(x) for x in c.interval):
            stat.append(f"95 % interval [{c.interval[0]:.3g}, {c.interval[1]:.3g}]")
        if c.p_value is not None and not math.isnan(c.p_value):
            stat.append(f"p = {c.p_value:.3g}")
        folded = [Paragraph([Strong("Claim. "), c.claim])]
        if stat:
            folded.append(Paragraph([Strong("Headline. "),
                                     (c.setting + ": " if c.setting else "") + "; ".join(stat)]))
        folded += [Paragraph([Strong("Numbers. "), c.numbers or "–"]),
                   Paragraph([Strong("Rule. "), c.rule or "–"])]
        rows.append(([Badge(c.verdict), Strong(c.title or c.claim), c.sentence(),
                      _figure_links(out, choices)], folded))
    return FoldingTable(["verdict", "finding", "what decided it (brackets: 95 % intervals)",
                         "figure"], rows, widths=["7.8rem", "14rem", "1fr", "7.5rem"])


# ---------------------------------------------------------------------- sections
def _findings_section(report: Any, out: Path, checks: list[findings.Finding]) -> None:
    report.section(
        "Findings of the paper, checked here",
        Paragraph("Sankar et al. (AAAI 2021), finding by finding. Open a row for all its "
                  "numbers and the rule that turned them into its verdict."),
        _finding_rows(checks, list(FINDING_FIGURES), out))


def _beyond_section(report: Any, out: Path, beyond: list[findings.Finding],
                    edge: list[findings.Finding]) -> None:
    report.section(
        "Beyond the paper",
        _finding_rows(beyond + edge, [TRANSFORMER_FIGURES] * len(beyond)
                      + [EDGE_FIGURES] * len(edge), out),
        Paragraph("The same layer-vs-whole comparison on a small GPT's blocks (the "
                  "'transformer' grouping: q, k, v, o, mlp_in, mlp_out of each layer, the "
                  "embeddings and the norms), and how heterogeneous the blocks' spectra are "
                  "next to a CNN's layers (Zhang et al. 2024 report strong block heterogeneity "
                  "in transformers and little in CNNs), with one metric for both."
                  + (" Then the edge of stability (Cohen et al. 2021, 2022) in full-batch "
                     "training: its own section below has the setting and the figure."
                     if edge else "")))


def _edge_section(report: Any, out: Path, blocks: tuple[Any, Path, str]) -> None:
    """The edge-of-stability setting: what was run and its figure (verdicts: above)."""
    paragraph, png, caption = blocks
    report.section("The edge of stability: setting and figure", paragraph,
                   _figure(out, png, caption))


def _finding_figures_sections(report: Any, out: Path, f2_figs: list[tuple[Path, str]],
                              tf_figs: list[tuple[Path, str]]) -> None:
    if f2_figs:
        report.section(
            "Finding 2 along training",
            Paragraph("Finding 2 on the deeper network, whose 'middle' is three layers: each "
                      "layer's distance to the full spectrum, and the gap D the verdict is "
                      "drawn from."),
            *[_figure(out, p, c) for p, c in f2_figs])
    if tf_figs:
        report.section(
            "Transformer blocks in figures",
            *[_figure(out, p, c) for p, c in tf_figs])


def _cost_note(out: Path, plan: Plan) -> tuple[str, dict[str, Any] | None]:
    """How the cost per epoch was measured (a sentence), and ``cost.json`` if there is one."""
    cost = _read_json(out / "cost.json")
    if cost:
        loads = [cost.get("load_average_before"), cost.get("load_average_after")]
        loads = [v[0] if isinstance(v, (list, tuple)) and v else v for v in loads]
        return (" Cost per epoch vs SGD was measured on its own after training "
                "(cost.json): " + str(cost.get("method", "")).rstrip(".")
                + (f"; 1-minute load average {loads[0]:.2f} before, {loads[1]:.2f} after "
                   "(other work on the machine)"
                   if all(isinstance(v, (int, float)) for v in loads) else "") + "."), cost
    if getattr(plan, "workers", 1) > 1:
        return (f" Runs trained {plan.workers} at a time on shared cores, so s / epoch and its "
                "ratio to SGD include contention."), None
    return " Runs trained one at a time.", None


#: Columns of the arm table a reader opens when they want them.
ARM_DETAIL_COLUMNS = ("seeds", "final top eigenvalue", "s / epoch")


def _arms_section(report: Any, out: Path, plan: Plan, rows: list[dict[str, Any]],
                  arm_figs: list[tuple[Path, str]], cost_note: str) -> None:
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
        Table(list(rows[0]) if rows else ["arm"], rows,
              fold=[c for c in ARM_DETAIL_COLUMNS if rows and c in rows[0]]),
        *[_figure(out, p, c) for p, c in arm_figs])


def _curvature_section(report: Any, out: Path, layer_figs: list[tuple[Path, str]]) -> None:
    if layer_figs:
        report.section(
            "Curvature per layer over training",
            Paragraph("Full-network and per-layer trace and top eigenvalue of the SGD runs, "
                      "each relative to its value at initialisation (mean over seeds)."),
            *[_figure(out, p, c) for p, c in layer_figs])


def _layer_study_sections(report: Any, out: Path, plan: Plan,
                          layer_studies: dict[str, Any]) -> None:
    for name in layer_studies:
        study_dir = out / "study" / slug(name)
        rel = study_dir.relative_to(out).as_posix()
        report.section(
            f"Layer study: final {name} model",
            Paragraph(["Full results: ", Link(f"{rel}/report.html", f"{rel}/report.html"),
                       " and ", Link(f"{rel}/results.json", f"{rel}/results.json"),
                       f" (seed {plan.seeds[0]}'s final {name} model, analysis subset of 10 "
                       "training examples per class). Similarity is the Wasserstein-1 distance "
                       "between spectral measures, each scaled by its own top eigenvalue."]),
            *[_figure(out, p, f"{name}, final model: "
                      + STUDY_CAPTIONS.get(p.stem, p.stem.replace("_", " ")))
              for p in sorted(study_dir.glob("*.png"))])


def _run_section(report: Any, out: Path, plan: Plan, results: dict[str, Any],
                 extra: dict[str, Any], notes: list[str], cost: dict[str, Any] | None
                 ) -> None:
    timings = results["timings"]
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
        *[Paragraph("Note: " + n) for n in notes
          if not (cost and n.startswith("cost vs SGD"))],  # said with the table already
        Code(json.dumps(results["plan"], indent=1), summary="plan"),
        Code(json.dumps(extra.get("sizes"), indent=1), summary="sizes of the extra studies"))


def _tuning_section(chosen: dict[str, Any]) -> list[Any]:
    """The tuning grid: each value's validation accuracy (%), mean ± std, min-max and per
    tuning seed, and per arm the margin of the choice against its standard error."""
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
                   "per tuning seed", ""], rows, fmt=".4g",
                  fold=["± std", "min-max", "per tuning seed"])]


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


# ---------------------------------------------------------------------- files
def _results(out: Path, plan: Plan, chosen: dict[str, Any], arms: dict[str, Any],
             comparison: dict[str, Any], layer_studies: dict[str, Any], extra: dict[str, Any],
             checks: list[findings.Finding], beyond: list[findings.Finding],
             timings: dict[str, float], provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``results.json``."""
    deep = extra.get("deep") or {}
    tf = extra.get("transformer") or {}
    return {
        "schema": "hesslens.reproduce/1",
        "plan": plan.to_dict(),
        "tuning": chosen,
        "arms": {name: {k: arm[k] for k in ("label", "seeds", "final", "seconds_per_epoch",
                                             "cost_vs_sgd", "runs")}
                 for name, arm in arms.items()},
        "findings": [c.to_dict() for c in checks],
        "beyond_the_paper": [c.to_dict() for c in beyond],
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


def _summary_text(rows: list[dict[str, Any]], checks: list[findings.Finding],
                  beyond: list[findings.Finding]) -> str:
    """What the command prints at the end: the arm table and every verdict."""
    w = max([20, *(len(r["arm"]) for r in rows)])
    lines = [f"{'arm':<{w}} seeds  test acc %       final trace      s/epoch",
             *[f"{r['arm']:<{w}} {r['seeds']:>5}  {r['test accuracy %']:<16} "
               f"{r['final trace']:<16} {r['s / epoch'] or 0:.2f}" for r in rows], "",
             "paper's findings:"]
    lines += [f"  [{c.verdict}] {c.claim}" for c in checks]
    # the transformer claim is checked in two states: say which line is which
    lines += ["beyond the paper:"] + [
        f"  [{c.verdict}] {c.claim}" + (f" ({c.setting})" if getattr(c, "setting", "") else "")
        for c in beyond]
    return "\n".join(lines)


def write_reproduce_report(out: Path, plan: Plan, chosen: dict[str, Any],
                           runs: dict[str, list[Path]], comparison: dict[str, Any],
                           studies: dict[str, Any], timings: dict[str, float],
                           provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write everything; return the content of ``results.json`` plus ``summary_text``.
    ``provenance`` (``{"data": fingerprint, "versions": ...}``) goes into ``results.json``;
    without it the versions of this process are recorded. ``studies`` is
    :func:`~hesslens.experiments.reproduce_study.run_study`'s result."""
    extra = studies.get(EXTRA) or {}
    layer_studies = {k: v for k, v in studies.items() if k != EXTRA}
    arms = _arms_by_name(comparison, runs)
    write_comparison(comparison, out / "compare", figures=False)
    sgd_runs = [load_run(d) for d in runs.get("SGD", [])]
    checks, beyond = _check_findings(layer_studies, extra, sgd_runs, arms)
    edge = findings.edge_of_stability(extra.get("edge_of_stability"))

    figures_dir = out / "figures"
    arm_figs = arm_figures(arms, figures_dir)
    layer_figs = layer_figures(sgd_runs, figures_dir)
    f2_figs = finding2_figures(extra, figures_dir)
    tf_figs = transformer_figures(extra, figures_dir)
    # drawn before the findings' rows, which link the figures that exist
    edge_blocks = edge_section(extra["edge_of_stability"], figures_dir) if edge else None

    rows = arm_table_rows(arms, chosen)
    results = _results(out, plan, chosen, arms, comparison, layer_studies, extra, checks,
                       beyond + edge, timings, provenance)
    write_json(out / "results.json", results)

    report = Report(
        "hesslens reproduce: layerwise Hessian spectra and Hessian-trace regularisation",
        subtitle=(f"{plan.model} on {plan.data}, {len(plan.seeds)} seeds x {len(plan.arms)} "
                  f"arms, {plan.epochs} epochs each, batch {plan.batch_size}, lr {plan.lr} "
                  f"({plan.name} study)"))
    _findings_section(report, out, checks)
    _beyond_section(report, out, beyond, edge)
    _finding_figures_sections(report, out, f2_figs, tf_figs)
    if edge_blocks is not None:
        _edge_section(report, out, edge_blocks)
    cost_note, cost = _cost_note(out, plan)
    _arms_section(report, out, plan, rows, arm_figs, cost_note)
    tuning = _tuning_section(chosen)
    if tuning:
        report.section("Tuning on the validation split", *tuning)
    _curvature_section(report, out, layer_figs)
    _layer_study_sections(report, out, plan, layer_studies)
    _run_section(report, out, plan, results, extra, comparison.get("notes", []), cost)
    report.write(out / "report.html")
    results["summary_text"] = _summary_text(rows, checks, beyond + edge)
    return results
