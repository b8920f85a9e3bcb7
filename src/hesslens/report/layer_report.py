"""Files of the layer study: ``results.json``, ``layers.csv``, the figures and ``report.html``.

Everything here works from the results dictionary (the layout of
:meth:`hesslens.analysis.LayerStudy.to_dict` plus the run's metadata), so a saved
``results.json`` can be rendered again without recomputing anything.

Example:
    >>> import json, os, tempfile, torch
    >>> from hesslens.analysis import layer_study
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> study = layer_study(model, torch.nn.functional.cross_entropy, data, k=2,
    ...                     density_probes=2, density_steps=20, progress=False)
    >>> paths = write_layer_study(study.to_dict(), tempfile.mkdtemp())
    >>> sorted(paths)[:3]
    ['csv', 'figure:curvature', 'figure:densities']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hesslens.files import write_csv, write_json
from hesslens.report.figures import (
    plot_gauss_newton_split,
    plot_layer_curvature,
    plot_layer_densities,
    plot_similarity_vs_depth,
)
from hesslens.report.html import Code, Figure, Paragraph, Report, Table

__all__ = [
    "CSV_COLUMNS",
    "FIGURES",
    "build_layer_report",
    "layer_rows",
    "make_layer_figures",
    "write_layer_study",
]

#: Columns of ``layers.csv`` (one row for the full network, then one per layer).
CSV_COLUMNS = [
    "name", "index", "depth", "n_params",
    "top_eigenvalue", "top_ratio", "trace", "trace_stderr", "trace_ratio",
    "wasserstein", "js_divergence", "wasserstein_raw", "authors_distance", "similarity_rank",
    "interlacing_holds",
    "gn_top_eigenvalue", "gn_top_ratio", "gn_trace", "residual_max_abs_eigenvalue",
    "residual_ratio", "residual_trace", "residual_trace_stderr", "gn_wasserstein_to_hessian",
]

#: The figure files, by key.
FIGURES = {
    "densities": "densities.png",
    "similarity": "similarity_depth.png",
    "curvature": "layer_curvature.png",
    "gauss_newton": "gauss_newton.png",
}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _row(name: str, entry: Mapping[str, Any], rank: int | None) -> dict[str, Any]:
    gn = entry.get("gauss_newton") or {}
    res_top = _get(gn, "residual", "top_eigenvalues")
    sim = entry.get("similarity") if name != "full" else None
    tops = entry.get("top_eigenvalues") or [None]
    return {
        "name": name,
        "index": entry.get("index"),
        "depth": entry.get("depth"),
        "n_params": entry.get("n_params"),
        "top_eigenvalue": tops[0],
        "top_ratio": _get(entry, "ratios", "top_eigenvalue") if name != "full" else 1.0,
        "trace": _get(entry, "trace", "value"),
        "trace_stderr": _get(entry, "trace", "stderr"),
        "trace_ratio": _get(entry, "ratios", "trace") if name != "full" else 1.0,
        "wasserstein": _get(sim, "wasserstein"),
        "js_divergence": _get(sim, "js_divergence"),
        "wasserstein_raw": _get(sim, "wasserstein_raw"),
        "authors_distance": _get(sim, "authors_distance"),
        "similarity_rank": rank,
        "interlacing_holds": _get(entry, "interlacing", "holds"),
        "gn_top_eigenvalue": (_get(gn, "gn", "top_eigenvalues") or [None])[0],
        "gn_top_ratio": gn.get("gn_top_ratio"),
        "gn_trace": _get(gn, "gn", "trace", "value"),
        "residual_max_abs_eigenvalue": max((abs(v) for v in res_top), default=None)
        if res_top else None,
        "residual_ratio": gn.get("residual_ratio"),
        "residual_trace": _get(gn, "residual", "trace", "value"),
        "residual_trace_stderr": _get(gn, "residual", "trace", "stderr"),
        "gn_wasserstein_to_hessian": _get(gn, "similarity_to_hessian", "wasserstein"),
    }


def layer_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-entry numbers as flat rows (``CSV_COLUMNS``): the full network first."""
    ranks = {r["name"]: r["rank"] for r in _get(results, "similarity", "ranking") or []}
    rows = [_row("full", results["full"], None)]
    for name, entry in results["layers"].items():
        rows.append(_row(name, entry, ranks.get(name)))
    return rows


def make_layer_figures(
    results: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Draw the study's figures into ``out_dir``; returns ``{key: path}`` (keys of
    ``FIGURES``; the Gauss-Newton figure only when the split was measured)."""
    out = Path(out_dir)
    layers = results["layers"]
    names = list(layers)
    rows = layer_rows(results)
    lrows = rows[1:]
    normalize = _get(results, "settings", "similarity_normalize") or "top"
    paths: dict[str, Path] = {}
    model = _get(results, "run", "model") or "model"
    data = _get(results, "run", "data")
    what = f"{model} on {data}" if data else model
    paths["densities"] = plot_layer_densities(
        results["full"]["density"], {n: layers[n]["density"] for n in names},
        out / FIGURES["densities"], normalize=normalize,
        distances={r["name"]: r["wasserstein"] for r in lrows if r["wasserstein"] is not None},
        depths={r["name"]: r["depth"] for r in lrows},
        title=f"{what}: eigenvalue density of each layer's Hessian block (colour) vs the full "
              f"Hessian (grey)")
    most = _get(results, "similarity", "most_similar") or []
    paths["similarity"] = plot_similarity_vs_depth(
        names, [r["depth"] for r in lrows],
        {f"Wasserstein-1 ({normalize}-normalised)": [r["wasserstein"] for r in lrows],
         "Jensen-Shannon divergence": [r["js_divergence"] for r in lrows]},
        out / FIGURES["similarity"], highlight=most,
        title=f"{what}: distance of each layer's spectrum to the full one (smaller = more "
              f"similar; shaded: middle layers)")
    paths["curvature"] = plot_layer_curvature(
        names, [r["top_eigenvalue"] for r in lrows], [r["trace"] for r in lrows],
        out / FIGURES["curvature"], trace_err=[r["trace_stderr"] or 0.0 for r in lrows],
        full_top=rows[0]["top_eigenvalue"], full_trace=rows[0]["trace"],
        title=f"{what}: curvature of each layer's Hessian block")
    if all(r["gn_top_eigenvalue"] is not None for r in rows):
        gn_full = results["full"]["gauss_newton"]
        paths["gauss_newton"] = plot_gauss_newton_split(
            [r["name"] for r in rows], [r["top_eigenvalue"] for r in rows],
            [r["gn_top_eigenvalue"] for r in rows],
            [r["residual_max_abs_eigenvalue"] for r in rows], out / FIGURES["gauss_newton"],
            spectra={"Hessian": results["full"]["density"], "G (Gauss-Newton)":
                     gn_full["gn"]["density"], "residual Hess - G": gn_full["residual"]["density"]},
            title=f"{what}: Gauss-Newton split Hess = G + (Hess - G)")
    return paths


def _residual_note(rows: list[dict[str, Any]]) -> str:
    ratios = [abs(r["residual_ratio"]) for r in rows[1:] if r["residual_ratio"] is not None]
    full = rows[0]["residual_ratio"]
    head = ("" if full is None else
            f"Full network: the residual's largest |eigenvalue| is {abs(full):.3g} times G's "
            "top eigenvalue. ")
    if not ratios:
        return head
    worst = max(ratios)
    if worst < 1e-5:
        return head + (
            f"Within every layer the residual is negligible (at most {worst:.2g} of G): each "
            "layer's Hessian block is its Gauss-Newton part, as for networks that are piecewise "
            "linear in each layer's weights (ReLU, max-pooling); the residual of the full "
            "Hessian lives in the blocks between layers.")
    return head + f"Within the layers the residual reaches {worst:.3g} times G's top eigenvalue."


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _budget_note(full: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Say so when the trace estimate stopped on its product budget, short of the asked-for
    relative standard error."""
    rtol, value, se = settings.get("trace_rtol"), full.get("trace"), full.get("trace_stderr")
    if not rtol or not value or se is None or se <= rtol * abs(value):
        return ""
    return (f" (relative standard error {se / abs(value):.1%}: the product budget ended "
            f"before the {rtol:.0%} asked for)")


def _pm(value: Any, stderr: Any) -> str:
    """``value ± stderr``: a difference of two estimates is shown with its noise, so that a
    residual trace of -0.05 ± 0.06 does not read as a measured negative curvature."""
    if value is None:
        return "–"
    return f"{value:.3g}" if not stderr else f"{value:.3g} ± {stderr:.2g}"


def build_layer_report(
    results: Mapping[str, Any], figures: Mapping[str, str | os.PathLike[str]]
) -> Report:
    """The HTML report of a layer study (sections: summary, table, spectra, similarity,
    curvature, Gauss-Newton split, settings)."""
    run = results.get("run") or {}
    settings = results.get("settings") or {}
    sim = results.get("similarity") or {}
    rows = layer_rows(results)
    normalize = settings.get("similarity_normalize", "top")
    most = sim.get("most_similar") or []
    model, data = run.get("model", "model"), run.get("data")
    subtitle = (f"{results.get('num_samples', '?')} samples"
                + (f" ({run['per_class']} per class)" if run.get("per_class") else "")
                + f", seed {results.get('seed')}, "
                + (f"checkpoint {run['checkpoint']}" if run.get("checkpoint")
                   else "weights at initialisation"))
    report = Report(f"Layer study: {model}" + (f" on {data}" if data else ""),
                    subtitle=subtitle)
    report.section("Summary", *_summary(results, rows, settings, sim, normalize, most))
    report.section("Layers", _layers_table(rows, most))
    report.section("Spectra", *_figure(
        figures, "densities",
        "Eigenvalue densities (stochastic Lanczos quadrature, deflated with the top "
        f"{settings.get('k', '?')} eigenpairs, Gaussian-smoothed, log scale with a floor). Each "
        "panel shows one layer's Hessian block against the full Hessian; eigenvalues are "
        + ("divided by each spectrum's own largest |λ|, as the similarity compares them."
           if normalize == "top" else "on the common scale the similarity uses.")))
    report.section("Similarity to the full spectrum",
                   *_similarity_blocks(figures, rows, sim, normalize))
    report.section("Curvature per layer", *_figure(
        figures, "curvature",
        "Top eigenvalue and trace of each layer's Hessian block; dashed: the full network. "
        "Layer traces come from the same probes as the full trace and add up to it."))
    if "gauss_newton" in figures:
        report.section("Gauss-Newton split", *_gauss_newton_blocks(figures, rows))
    meta = {k: results.get(k) for k in ("run", "settings", "versions", "checks", "timings",
                                         "n_hvp")}
    report.section(
        "Settings and reproducibility",
        Paragraph("Every number above is reproducible from the seed and these settings "
                  "(results.json holds all of it, including the spectral measures)."),
        Code(json.dumps(meta, indent=1, default=str), summary="settings, versions, timings"))
    return report


def _figure(figures: Mapping[str, str | os.PathLike[str]], key: str, caption: str) -> list:
    """The figure ``key`` with its caption, or nothing when it was not drawn."""
    return [Figure.from_file(figures[key], caption=caption)] if key in figures else []


def _summary(results: Mapping[str, Any], rows: list[dict[str, Any]],
             settings: Mapping[str, Any], sim: Mapping[str, Any], normalize: str,
             most: list[str]) -> list[Paragraph]:
    """The full network's numbers, the most similar layers and the checks, in three lines."""
    full = rows[0]
    checks = results.get("checks") or {}
    return [
        Paragraph(
            f"Loss {_fmt(_get(results, 'point', 'loss'))}, gradient norm "
            f"{_fmt(_get(results, 'point', 'grad_norm'))}. Full Hessian: top eigenvalue "
            f"{_fmt(full['top_eigenvalue'])}, trace {_fmt(full['trace'])} ± "
            f"{_fmt(full['trace_stderr'], '.2g')}{_budget_note(full, settings)}, "
            f"{full['n_params']} parameters in {len(rows) - 1} layers."),
        Paragraph(
            "Most similar to the full spectrum (Wasserstein-1 between the spectral measures, "
            f"{normalize}-normalised): " + (", ".join(
                f"{r['name']} (depth {r['depth']:.2f})" for r in rows[1:] if r["name"] in most)
                or "–") + ". "
            + ("Middle layers (depth 0.25–0.75) are on average more similar than the outer ones"
               if sim.get("middle_more_similar") else
               "Middle layers (depth 0.25–0.75) are not on average more similar than the outer "
               "ones" if sim.get("middle_more_similar") is not None else "")
            + (f" (Spearman correlation of distance with |depth − ½|: "
               f"{sim['depth_spearman']:.2f})." if sim.get("depth_spearman") is not None
               else ".")),
        Paragraph(
            "Checks: Cauchy interlacing λ_i(block) ≤ λ_i(full) "
            + ("holds for every layer" if checks.get("interlacing_holds") else "FAILS")
            + f" (largest λ_i(block) − λ_i(full): {_fmt(checks.get('max_interlacing_violation'))})"
            f"; the layer traces add up to {_fmt(checks.get('layer_trace_sum'), '.6g')} against "
            f"the full {_fmt(checks.get('full_trace'), '.6g')} (same probes); every density is "
            + ("a probability measure." if checks.get("densities_normalized") else
               "NOT normalised.")),
    ]


def _layers_table(rows: list[dict[str, Any]], most: list[str]) -> Table:
    """The per-layer numbers, the most similar layers highlighted."""
    cols = ["name", "depth", "n_params", "top_eigenvalue", "top_ratio", "trace",
            "trace_stderr", "trace_ratio", "wasserstein", "js_divergence", "similarity_rank"]
    headers = ["layer", "depth", "parameters", "λ1", "λ1 / λ1(full)", "trace", "± s.e.",
               "trace / trace(full)", "W1 to full", "JS to full", "rank"]
    return Table(headers, [[r[c] for c in cols] for r in rows],
                 caption="Per-layer numbers (first row: the full network). Also in layers.csv.",
                 highlight=[i for i, r in enumerate(rows) if r["name"] in most])


def _similarity_blocks(figures: Mapping[str, str | os.PathLike[str]],
                       rows: list[dict[str, Any]], sim: Mapping[str, Any],
                       normalize: str) -> list[Any]:
    """The similarity figure, what W1 and JS measure, why the authors' number is not a
    distance, and the ranking."""
    by_name = {r["name"]: r for r in rows}
    rank_rows = [[r["rank"], r["name"], r["depth"], r["distance"],
                  by_name[r["name"]]["js_divergence"], by_name[r["name"]]["authors_distance"]]
                 for r in sim.get("ranking", [])]
    return [
        *_figure(figures, "similarity",
                 "Distance of each layer's spectrum to the full one against normalised depth "
                 "(index / (n − 1)). Stars: the most similar layers."),
        Paragraph(
            "W1 is the Wasserstein-1 distance between the two spectral measures (nodes and "
            f"weights), each divided by its own largest |eigenvalue| ('{normalize}' "
            "normalisation): it compares shapes, not magnitudes (a block's eigenvalues are "
            "smaller than the full ones by interlacing; the ratios in the table report that), "
            "in units of the top eigenvalue. JS is the Jensen-Shannon divergence between the "
            "two smoothed densities on one shared grid with one kernel width."),
        Paragraph(
            "The authors' script instead passed the 1024 smoothed density values of each "
            "spectrum (each on its own grid, log- and min-max-transformed) to "
            "scipy.stats.wasserstein_distance as if they were samples, which ignores where the "
            "eigenvalues lie: a mirrored or shifted spectrum scores as identical. That number "
            "is listed for comparison only ('authors')."),
        Table(["rank", "layer", "depth", "W1", "JS", "authors"], rank_rows,
              caption="Layers ranked by W1 to the full spectrum (most similar first)."),
    ]


def _gauss_newton_blocks(figures: Mapping[str, str | os.PathLike[str]],
                         rows: list[dict[str, Any]]) -> list[Any]:
    """The Gauss-Newton figure, the residual's reading and the split per entry."""
    gn_rows = [[r["name"], r["top_eigenvalue"], r["gn_top_eigenvalue"], r["gn_top_ratio"],
                r["residual_max_abs_eigenvalue"], r["residual_ratio"], r["gn_trace"],
                _pm(r["residual_trace"], r.get("residual_trace_stderr")),
                r["gn_wasserstein_to_hessian"]] for r in rows]
    return [
        *_figure(figures, "gauss_newton",
                 "Hess = G + (Hess − G) with G = Jᵀ (∂²loss/∂f²) J. Left: top eigenvalues per "
                 "entry (log scale). Right: the full network's densities."),
        Paragraph(_residual_note(rows)),
        Table(["entry", "λ1(Hess)", "λ1(G)", "λ1(G)/λ1(Hess)", "max|λ(res)|",
               "max|λ(res)|/λ1(G)", "tr G", "tr res", "W1(G, Hess)"], gn_rows,
              caption="Gauss-Newton split per entry (residual eigenvalues: largest "
                      "magnitude)."),
    ]


def write_layer_study(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    figures: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``layers.csv``, the figures and ``report.html`` into
    ``out_dir`` (each atomically); returns ``{"json", "csv", "figure:<key>", "html"}``."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}

    def step(label: str) -> None:
        if on_step is not None:
            on_step(label)

    step("results.json")
    paths["json"] = write_json(out / "results.json", results)
    step("layers.csv")
    paths["csv"] = write_csv(out / "layers.csv", layer_rows(results), CSV_COLUMNS)
    figs: dict[str, Path] = {}
    if figures:
        step("figures")
        figs = make_layer_figures(results, out)
        paths.update({f"figure:{k}": p for k, p in figs.items()})
    step("report.html")
    paths["html"] = build_layer_report(results, figs).write(out / "report.html")
    return paths
