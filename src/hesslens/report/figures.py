"""The study's figures, in the one style of :mod:`hesslens.report.style` (matplotlib's Agg
backend: no display, no global pyplot state).

Every function takes plain data (names, numbers, :class:`~hesslens.linalg.Spectrum` objects or
``{"nodes", "weights"}`` dicts) and a path, writes one PNG and returns the path, so any study
(the layer study, the training study) can reuse them.

Densities are Gaussian-smoothed spectral measures drawn on a log scale, with a floor (a fixed
fraction of the highest peak) below which the curve is cut: on a linear scale the bulk at zero
hides everything else, and without a floor the log scale is dominated by the kernels' tails.

Example:
    >>> import os, tempfile
    >>> from hesslens.linalg import Spectrum
    >>> full = Spectrum([0.0, 0.1, 2.0], [0.9, 0.08, 0.02])
    >>> p = plot_layer_densities(full, {"fc": full.scaled(0.5)}, tempfile.mktemp(suffix=".png"))
    >>> os.path.getsize(p) > 1000
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hesslens.linalg import Spectrum
from hesslens.report.style import COLORS, DPI, FULL_COLOR, new_figure, save_png

__all__ = [
    "DPI",
    "density_curve",
    "plot_arm_curves",
    "plot_densities",
    "plot_gauss_newton_split",
    "plot_intervals",
    "plot_layer_curvature",
    "plot_layer_densities",
    "plot_similarity_vs_depth",
]

#: Densities are cut at this fraction of the highest peak on the log scale.
DENSITY_FLOOR = 1e-5


def _as_spectrum(s: Any) -> Spectrum:
    return s if isinstance(s, Spectrum) else Spectrum.from_dict(s)


def density_curve(
    spectrum: Any, grid: np.ndarray, sigma: float, scale: float = 1.0
) -> np.ndarray:
    """The smoothed density of ``spectrum`` with eigenvalues divided by ``scale``, on ``grid``
    (kernel width ``sigma`` in the same units)."""
    s = _as_spectrum(spectrum)
    if scale != 1.0:
        s = s.scaled(1.0 / scale)
    return s.pdf(grid, sigma)


def _shared_grid(spectra: Sequence[Spectrum], scales: Sequence[float], n: int = 1200):
    lo = min(s.support[0] / c for s, c in zip(spectra, scales))
    hi = max(s.support[1] / c for s, c in zip(spectra, scales))
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 1e-3
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, n)
    return grid, 0.01 * span


def _floor_curves(curves: Sequence[np.ndarray], floor: float) -> tuple[list[np.ndarray], float]:
    peak = max(float(c.max()) for c in curves) if curves else 1.0
    bottom = peak * floor if peak > 0 else floor
    return [np.maximum(c, bottom) for c in curves], bottom


def plot_layer_densities(
    full: Any,
    layers: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    normalize: str | None = "top",
    distances: Mapping[str, float] | None = None,
    depths: Mapping[str, float] | None = None,
    floor: float = DENSITY_FLOOR,
    title: str | None = None,
    ncols: int = 3,
) -> Path:
    """One panel per layer: the layer's eigenvalue density against the full network's.

    Args:
        full: the full network's spectrum.
        layers: ``{layer name: spectrum}`` in the order to draw.
        path: the PNG to write.
        normalize: ``"top"`` (default) draws each spectrum against ``lambda / max|lambda|`` of
            its own, as the similarity compares them; ``"range"``; ``None`` for raw eigenvalues.
        distances: ``{layer: distance to the full spectrum}``, shown in the panel titles.
        depths: ``{layer: normalised depth}``, shown in the panel titles.
        floor: densities below ``floor`` times the highest peak are cut (log scale).
        title: the figure's title.
    """
    full_s = _as_spectrum(full)
    names = list(layers)
    n = max(1, len(names))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = new_figure(3.6 * ncols + 0.4, 2.7 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=False)
    full_scale = full_s.scale(normalize)
    xlabel = {"top": r"$\lambda\,/\,\max|\lambda|$", "range": r"$\lambda\,/\,$(range)"}.get(
        normalize or "none", r"eigenvalue $\lambda$")
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        s = _as_spectrum(layers[name])
        scale = s.scale(normalize)
        grid, sigma = _shared_grid([full_s, s], [full_scale, scale])
        curves = [density_curve(full_s, grid, sigma, full_scale),
                  density_curve(s, grid, sigma, scale)]
        (cf, cl), bottom = _floor_curves(curves, floor)
        ax.fill_between(grid, bottom, cf, color=FULL_COLOR, alpha=0.18, lw=0)
        ax.plot(grid, cf, color=FULL_COLOR, lw=1.0, label="full network")
        ax.plot(grid, cl, color=COLORS[i % len(COLORS)], lw=1.3, label="layer block")
        ax.set_yscale("log")
        ax.set_ylim(bottom=bottom)
        label = name
        if depths is not None and name in depths:
            label += f"  (depth {depths[name]:.2f})"
        if distances is not None and name in distances:
            label += f"\nW1 = {distances[name]:.3g}"
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
        if i // ncols == nrows - 1 or i + ncols >= len(names):
            ax.set_xlabel(xlabel, fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("density (log)", fontsize=9)
        if i == 0:
            ax.legend(fontsize=8, loc="upper right", frameon=False)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.suptitle(title or "Eigenvalue density: each layer's Hessian block vs the full Hessian",
                 fontsize=11)
    return save_png(fig, path)


def plot_similarity_vs_depth(
    names: Sequence[str],
    depths: Sequence[float],
    metrics: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    highlight: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """Distance of each layer's spectrum to the full one against normalised depth, one panel
    per metric (smaller = more similar); layers in ``highlight`` (the most similar) are
    starred."""
    names = list(names)
    x = np.asarray(depths, dtype=float)
    fig = new_figure(4.4 * len(metrics) + 0.4, 3.5)
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for j, (ax, (label, values)) in enumerate(zip(axes, metrics.items())):
        y = np.asarray(values, dtype=float)
        ax.plot(x, y, "-", color="#999999", lw=1, zorder=1)
        ax.scatter(x, y, s=28, color=COLORS[0], zorder=2)
        best = [i for i, n in enumerate(names) if n in set(highlight)]
        if best:
            ax.scatter(x[best], y[best], s=160, marker="*", color="#d62728", zorder=3,
                       label="most similar")
            if j == 0:
                ax.legend(fontsize=8, frameon=True, framealpha=0.9, loc="best")
        for xi, yi, n in zip(x, y, names):
            right = xi > 0.8
            ax.annotate(n, (xi, yi), textcoords="offset points",
                        xytext=(-5, 5) if right else (5, 5), ha="right" if right else "left",
                        fontsize=7.5)
        ax.axvspan(0.25, 0.75, color="#2ca02c", alpha=0.06, lw=0)
        ax.set_xlabel("normalised depth (0 = first layer, 1 = last)", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.set_title(f"{label} to the full spectrum", fontsize=9.5)
        ax.set_xlim(-0.08, 1.12)
        finite = y[np.isfinite(y)]
        ax.set_ylim(bottom=0, top=float(finite.max()) * 1.18 if finite.size and
                    finite.max() > 0 else None)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    fig.suptitle(title or "Distance of each layer's spectrum to the full one (shaded: middle "
                          "layers)", fontsize=11)
    return save_png(fig, path)


def _maybe_log(ax: Any, values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    if v.size and (v > 0).all() and v.max() / v.min() > 50:
        ax.set_yscale("log")
        return True
    return False


def _headroom(ax: Any, values: np.ndarray, log: bool) -> None:
    """Leave space above the highest bar or line for the legend."""
    v = values[np.isfinite(values)]
    if not v.size:
        return
    top, low = float(v.max()), float(min(v.min(), 0.0))
    if log:
        ax.set_ylim(top=top * 6.0)
    elif top > 0:
        ax.set_ylim(top=top + 0.35 * (top - low))


def plot_layer_curvature(
    names: Sequence[str],
    top: Sequence[float],
    trace: Sequence[float],
    path: str | os.PathLike[str],
    *,
    trace_err: Sequence[float] | None = None,
    full_top: float | None = None,
    full_trace: float | None = None,
    title: str | None = None,
) -> Path:
    """Two bar charts over the layers: the top eigenvalue of each block and its trace (with
    standard errors), the full network's values as dashed lines."""
    names = list(names)
    pos = np.arange(len(names))
    fig = new_figure(max(7.5, 1.1 * len(names) + 3.5), 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    top_v = np.asarray(top, dtype=float)
    ax1.bar(pos, top_v, color=COLORS[0], width=0.65, label="layer block")
    if full_top is not None:
        ax1.axhline(full_top, color=FULL_COLOR, ls="--", lw=1.2,
                    label=f"full network ({full_top:.3g})")
    both = np.append(top_v, [] if full_top is None else [full_top])
    _headroom(ax1, both, _maybe_log(ax1, both))
    ax1.set_ylabel(r"top eigenvalue $\lambda_1$", fontsize=9)
    ax1.set_title("Top eigenvalue per layer", fontsize=10)
    tr = np.asarray(trace, dtype=float)
    err = None if trace_err is None else np.asarray(trace_err, dtype=float)
    ax2.bar(pos, tr, yerr=err, color=COLORS[1], width=0.65, capsize=3, label="layer block")
    if full_trace is not None:
        ax2.axhline(full_trace, color=FULL_COLOR, ls="--", lw=1.2,
                    label=f"full network ({full_trace:.3g})")
    ax2.axhline(0.0, color="black", lw=0.6)
    hi = tr + (0.0 if err is None else np.nan_to_num(err))
    _headroom(ax2, np.append(hi, [] if full_trace is None else [full_trace]), False)
    ax2.set_ylabel("trace (± standard error)", fontsize=9)
    ax2.set_title("Trace per layer (they add up to the full trace)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=30 if len(names) > 6 else 0, ha="right"
                           if len(names) > 6 else "center", fontsize=8)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=8, frameon=False, loc="upper left", ncol=2)
    fig.suptitle(title or "Curvature per layer", fontsize=11)
    return save_png(fig, path)


def plot_densities(
    spectra: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    normalize: str | None = None,
    floor: float = DENSITY_FLOOR,
    title: str | None = None,
    xlabel: str | None = None,
) -> Path:
    """Several densities on one shared grid and log scale (``{label: spectrum}``)."""
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    _draw_densities(ax, spectra, normalize, floor)
    ax.set_xlabel(xlabel or r"eigenvalue $\lambda$", fontsize=9)
    ax.set_title(title or "Eigenvalue densities", fontsize=10)
    return save_png(fig, path)


def _draw_densities(ax: Any, spectra: Mapping[str, Any], normalize: str | None,
                    floor: float, colors: Sequence[str] | None = None) -> None:
    items = [(label, _as_spectrum(s)) for label, s in spectra.items()]
    scales = [s.scale(normalize) for _, s in items]
    grid, sigma = _shared_grid([s for _, s in items], scales)
    curves = [density_curve(s, grid, sigma, c) for (_, s), c in zip(items, scales)]
    curves, bottom = _floor_curves(curves, floor)
    for i, ((label, _), c) in enumerate(zip(items, curves)):
        if colors is not None:
            color = colors[i % len(colors)]
        else:
            color = FULL_COLOR if i == 0 else COLORS[i % len(COLORS)]
        ax.plot(grid, c, lw=1.2 if i else 1.5, color=color, label=label)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    ax.set_ylabel("density (log)", fontsize=9)
    ax.grid(alpha=0.3, lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper right")


def plot_gauss_newton_split(
    names: Sequence[str],
    hessian_top: Sequence[float],
    gn_top: Sequence[float],
    residual_top: Sequence[float],
    path: str | os.PathLike[str],
    *,
    spectra: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """The Gauss-Newton split ``Hess = G + (Hess - G)``.

    Left: for each entry (e.g. ``"full"`` and every layer) the top eigenvalue of the Hessian,
    of ``G`` and the largest ``|eigenvalue|`` of the residual, on a log scale. Right (when
    ``spectra`` is given, e.g. ``{"Hessian": ..., "G": ..., "residual": ...}`` of the full
    network): their densities on a shared eigenvalue axis.
    """
    names = list(names)
    pos = np.arange(len(names))
    panels = 2 if spectra else 1
    fig = new_figure(max(7.0, 0.9 * len(names) + 3.0) + (5.0 if spectra else 0.0), 3.8)
    axes = fig.subplots(1, panels, squeeze=False,
                        width_ratios=[max(1.2, 0.18 * len(names) + 0.6), 1][:panels])[0]
    ax = axes[0]
    h = np.asarray(hessian_top, dtype=float)
    g = np.asarray(gn_top, dtype=float)
    r = np.abs(np.asarray(residual_top, dtype=float))
    width = 0.27
    positive = np.concatenate([v[v > 0] for v in (h, g, r)])
    bottom = positive.min() / 20 if positive.size else 1e-12
    for off, vals, label, color in ((-width, h, "Hessian: max λ", COLORS[0]),
                                    (0.0, g, "G: max λ", COLORS[2]),
                                    (width, r, "residual: max |λ|", COLORS[3])):
        shown = vals > 0
        ax.bar(pos[shown] + off, vals[shown], width=width, color=color, label=label,
               bottom=0)
        for x in pos[~shown] + off:  # exactly zero (or negative): no bar on a log scale
            ax.annotate("0", (x, bottom), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7.5, color=color)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    _headroom(ax, np.concatenate([h, g, r]), True)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30 if len(names) > 6 else 0,
                       ha="right" if len(names) > 6 else "center", fontsize=8)
    ax.set_ylabel("eigenvalue (log scale)", fontsize=9)
    ax.set_title("Top eigenvalues: Hessian = G + residual", fontsize=10)
    ax.grid(axis="y", alpha=0.3, lw=0.5)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=3)
    if spectra:
        _draw_densities(axes[1], spectra, None, DENSITY_FLOOR,
                        colors=[COLORS[0], COLORS[2], COLORS[3], *COLORS[4:]])
        axes[1].set_xlabel(r"eigenvalue $\lambda$", fontsize=9)
        axes[1].set_title("Full network: densities", fontsize=10)
    fig.suptitle(title or "Gauss-Newton split", fontsize=11)
    return save_png(fig, path)


def plot_arm_curves(
    curves: Mapping[str, Mapping[str, Sequence[Any]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str,
    title: str,
    scale: float = 1.0,
    log: bool | None = None,
) -> Path:
    """One line per arm over epochs with a band of ± one standard deviation over seeds.

    Args:
        curves: ``{legend label: {"epochs", "mean", "std"}}`` (``std`` entries may be None);
            the labels are drawn as given (pass the names the report's table uses).
        ylabel, title: axis label (with its unit) and title.
        scale: multiply every value (e.g. 100 for accuracy in %).
        log: log scale; ``None`` picks it for positive values spanning more than 50x.

    >>> import os, tempfile
    >>> p = plot_arm_curves({"SGD": {"epochs": [1, 2], "mean": [0.5, 0.6], "std": [0.01, None]}},
    ...                     tempfile.mktemp(suffix=".png"), ylabel="test accuracy (%)",
    ...                     title="t", scale=100)
    >>> os.path.getsize(p) > 1000
    True
    """
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    everything = []
    for i, (label, c) in enumerate(curves.items()):
        ep = np.asarray(c["epochs"], dtype=float)
        mean = np.asarray([np.nan if m is None else scale * m for m in c["mean"]], dtype=float)
        std = np.asarray([0.0 if s is None else scale * s for s in c["std"]], dtype=float)
        color = COLORS[i % len(COLORS)]
        ax.plot(ep, mean, marker="o" if len(ep) < 15 else None, ms=3, color=color, label=label)
        if (std > 0).any():
            ax.fill_between(ep, mean - std, mean + std, color=color, alpha=0.18, lw=0)
        everything.append(mean)
    values = np.concatenate(everything) if everything else np.zeros(0)
    if log is None:
        _maybe_log(ax, values)
    elif log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    return save_png(fig, path)


def plot_intervals(
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    shade: Sequence[Any] = (),
    zero: bool = True,
    rotate: bool = False,
) -> Path:
    """Means with 95 % interval bars, one series per group, against shared x positions.

    Args:
        groups: ``{legend label: {"x": [...], "mean": [...], "low": [...], "high": [...]}}``;
            ``x`` numbers (e.g. epochs) or names (categories, in the first group's order).
        shade: x values to shade (e.g. the middle layers).
        zero: draw the line y = 0.

    >>> import os, tempfile
    >>> g = {"mlp5": {"x": ["a", "b"], "mean": [1.0, 2.0], "low": [0.5, 1.5], "high": [1.5, 2.5]}}
    >>> os.path.getsize(plot_intervals(g, tempfile.mktemp(suffix=".png"), xlabel="layer",
    ...                                ylabel="W1", title="t", shade=["b"])) > 1000
    True
    """
    fig = new_figure(max(6.4, 0.42 * max(len(g["x"]) for g in groups.values()) + 2.5)
                  if rotate else 6.4, 4.0 + (0.8 if rotate else 0.0))
    ax = fig.subplots()
    first = next(iter(groups.values()), {"x": []})
    categorical = any(isinstance(v, str) for v in first["x"])
    cats = list(first["x"]) if categorical else []
    offsets = np.linspace(-0.15, 0.15, len(groups)) if len(groups) > 1 else [0.0]
    for i, (label, g) in enumerate(groups.items()):
        xs = np.asarray([cats.index(v) for v in g["x"]] if categorical else g["x"], dtype=float)
        xs = xs + (offsets[i] if categorical else 0.0)
        mean = np.asarray(g["mean"], dtype=float)
        low = np.asarray(g["low"], dtype=float)
        high = np.asarray(g["high"], dtype=float)
        err = np.vstack([np.nan_to_num(mean - low), np.nan_to_num(high - mean)])
        ax.errorbar(xs, mean, yerr=err, fmt="o-" if not categorical else "o", ms=4, capsize=3,
                    color=COLORS[i % len(COLORS)], label=label, lw=1.2)
    for v in shade:
        x = cats.index(v) if categorical and v in cats else v
        if isinstance(x, (int, float)):
            ax.axvspan(x - 0.5, x + 0.5, color="#2ca02c", alpha=0.08, lw=0)
    if zero:
        ax.axhline(0.0, color="black", lw=0.7)
    if categorical:
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=60 if rotate else 0, ha="right" if rotate else
                           "center", fontsize=7.5)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    return save_png(fig, path)
