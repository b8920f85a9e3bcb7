"""The figures of ``hesslens reproduce``'s report, drawn from what the study measured: each
arm's curves over epochs, the SGD arm's per-layer curvature over epochs, finding 2 on the deeper
network and the transformer's blocks against the whole. Each function writes its PNGs under the
folder it is given and returns ``(path, caption)`` pairs; a figure whose data is missing is
left out.

Example:
    >>> _accuracy_text({})
    ''
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from hesslens.analysis.intervals import t_interval
from hesslens.analysis.probe_spectra import ProbeSpectra
from hesslens.curvature.layers import middle_indices
from hesslens.experiments import reproduce_findings as findings
from hesslens.files import write_bytes
from hesslens.report.figures import plot_arm_curves, plot_intervals
from hesslens.report.style import new_figure, png_bytes

__all__ = ["arm_figures", "finding2_figures", "layer_figures", "transformer_figures"]


def _layer_curvature_figure(runs: list[dict[str, Any]], key: str, title: str) -> bytes | None:
    """Per-layer curvature over epochs (mean over seeds), each layer relative to its first
    tracked value, with the full network for reference."""
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
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
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
    return png_bytes(fig)


METRICS = {  # comparison curve key: (file, y label, title, scale)
    "test_acc": ("test_accuracy.png", "test accuracy (%)", "Test accuracy", 100.0),
    "trace": ("trace.png", "Hessian trace (analysis subset)", "Hessian trace", 1.0),
    "top_eigenvalue": ("top_eigenvalue.png", "top Hessian eigenvalue (analysis subset)",
                       "Top Hessian eigenvalue", 1.0),
}


def arm_figures(arms: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
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


def finding2_figures(extra: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
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


def transformer_figures(extra: dict[str, Any], figures_dir: Path) -> list[tuple[Path, str]]:
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


def layer_figures(sgd_runs: list[dict[str, Any]], figures_dir: Path
                   ) -> list[tuple[Path, str]]:
    """The SGD arm's per-layer trace and top eigenvalue over epochs, written as PNGs."""
    out = []
    for key, title, what in (
            ("layer_trace", "Hessian trace per layer over training (SGD)", "trace"),
            ("layer_top_eigenvalue", "Top eigenvalue per layer over training (SGD)",
             "top eigenvalue")):
        png = _layer_curvature_figure(sgd_runs, key, title)
        if png:
            out.append((write_bytes(figures_dir / f"{key}_over_epochs.png", png),
                        f"Hessian {what} of each layer's block and of the full network "
                        f"(black) over epochs for the SGD arm, each divided by its "
                        f"value at epoch 0 (initialisation), mean over "
                        f"{len(sgd_runs)} seeds; log scale; analysis subset of 10 "
                        "training examples per class."))
    return out
