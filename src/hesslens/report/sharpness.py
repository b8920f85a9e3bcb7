"""Sharpness over training: the figures and the page of a
:class:`~hesslens.analysis.sharpness.SharpnessRecorder`'s records, and
:class:`SharpnessMonitor` (``hl.SharpnessMonitor``), the recorder with ``write_report``.

The recorder lives in the analysis layer, which draws nothing; the report layer above it adds
the figures, so every import points down (the monitor is the recorder's subclass here).

Figures (the style of :mod:`hesslens.report.style`):

* :func:`plot_sharpness`: the sharpness (and the directional sharpness along the update)
  against the optimizer's threshold over the steps, on a log scale; for Adam a second panel
  with the preconditioned sharpness against ``(2 + 2β1) / ((1 - β1) η)``;
* :func:`plot_gradient_share`: the share of the gradient in the top-k eigenspace and the
  overlap of the top eigenvector with the previous record's.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> mon = SharpnessMonitor(model, nn.functional.cross_entropy, (x, y), opt)
    >>> for step in range(3):
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     _ = mon.update(step)
    >>> mon.write_report(tempfile.mkdtemp()).name
    'report.html'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hesslens.analysis.sharpness import FILES, SharpnessRecorder
from hesslens.errors import HesslensInputError
from hesslens.report.html import Code, Figure, Paragraph, Report, Table
from hesslens.report.style import COLORS, FULL_COLOR, new_figure, save_png

__all__ = ["SharpnessMonitor", "plot_gradient_share", "plot_sharpness",
           "write_sharpness_report"]


def _array(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _log_axis(ax: Any, *series: np.ndarray) -> None:
    v = np.concatenate([s[np.isfinite(s)] for s in series]) if series else np.array([])
    if v.size and (v > 0).all():
        ax.set_yscale("log")


def plot_sharpness(
    steps: Sequence[float],
    sharpness: Sequence[float | None],
    threshold: Sequence[float | None],
    path: str | os.PathLike[str],
    *,
    directional: Sequence[float | None] | None = None,
    preconditioned: Sequence[float | None] | None = None,
    preconditioned_threshold: Sequence[float | None] | None = None,
    title: str | None = None,
) -> Path:
    """The sharpness against the threshold over ``steps`` (log scale), and, where
    ``preconditioned`` is given, a second panel with the preconditioned sharpness against its
    threshold (``threshold`` then belongs to that panel; the first shows the sharpness)."""
    x = np.asarray(steps, dtype=float)
    pre = preconditioned is not None and np.isfinite(_array(preconditioned)).any()
    fig = new_figure(9.0 if pre else 5.6, 3.5)
    axes = fig.subplots(1, 2) if pre else [fig.subplots(1, 1)]
    ax = axes[0]
    s = _array(sharpness)
    ax.plot(x, s, color=COLORS[0], marker="o", ms=2.5, lw=1.3,
            label=r"sharpness $\lambda_1(H)$")
    drawn = [s]
    if directional is not None and np.isfinite(_array(directional)).any():
        d = _array(directional)
        ax.plot(x, d, color=COLORS[2], lw=1.0, ls=":", label=r"along the update $u^THu/u^Tu$")
        drawn.append(np.abs(d))
    if not pre:
        t = _array(threshold)
        if np.isfinite(t).any():
            ax.plot(x, t, color=FULL_COLOR, ls="--", lw=1.2, label="stability threshold")
            drawn.append(t)
    _log_axis(ax, *drawn)
    ax.set_title("Sharpness" + ("" if pre else " and the edge of stability"), fontsize=10)
    if pre:
        ax2 = axes[1]
        p = _array(preconditioned)
        t = _array(threshold if preconditioned_threshold is None else preconditioned_threshold)
        ax2.plot(x, p, color=COLORS[1], marker="o", ms=2.5, lw=1.3,
                 label=r"preconditioned $\lambda_1(P^{-1}H)$")
        ax2.plot(x, t, color=FULL_COLOR, ls="--", lw=1.2,
                 label=r"threshold $(2+2\beta_1)/((1-\beta_1)\eta)$")
        _log_axis(ax2, p, t)
        ax2.set_title("Preconditioned sharpness (Adam)", fontsize=10)
    for a in axes:
        a.set_xlabel("step", fontsize=9)
        a.grid(alpha=0.3, lw=0.5)
        a.tick_params(labelsize=8)
        a.legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_png(fig, path)


def plot_gradient_share(
    steps: Sequence[float],
    share: Sequence[float | None],
    path: str | os.PathLike[str],
    *,
    overlap: Sequence[float | None] | None = None,
    k: int = 1,
) -> Path:
    """The gradient's share in the top-``k`` eigenspace and the top eigenvector's overlap with
    the previous record's, over ``steps`` (both in [0, 1])."""
    x = np.asarray(steps, dtype=float)
    fig = new_figure(5.6, 3.3)
    ax = fig.subplots(1, 1)
    ax.plot(x, _array(share), color=COLORS[3], marker="o", ms=2.5, lw=1.3,
            label=fr"$|V_{{{k}}}^Tg|^2/|g|^2$ (gradient in the top-{k} space)")
    if overlap is not None and np.isfinite(_array(overlap)).any():
        ax.plot(x, _array(overlap), color=COLORS[4], ls="--", lw=1.1,
                label=r"$|\langle v_1, v_1^{prev}\rangle|$ (top eigenvector's turn)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("step", fontsize=9)
    ax.set_title("Gradient in the top eigenspace", fontsize=10)
    ax.grid(alpha=0.3, lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    return save_png(fig, path)


def _column(history: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in history]


def write_sharpness_report(
    history: Sequence[Mapping[str, Any]],
    folder: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any] | None = None,
    title: str = "Sharpness over training",
) -> Path:
    """``sharpness.json``, ``sharpness.csv``, ``sharpness.png``, ``gradient_share.png`` and a
    self-contained ``report.html`` for a list of records; returns the page's path."""
    if not history:
        raise HesslensInputError("nothing recorded yet: call update() before write_report()")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HesslensInputError(f"{str(folder)!r} is a file; give a folder for the report")
    FILES.write(folder, history, settings)
    steps = _column(history, "step")
    pre = [r.get("preconditioned_sharpness") for r in history]
    has_pre = any(v is not None for v in pre)
    sharp_png = plot_sharpness(
        steps, _column(history, "sharpness"), _column(history, "threshold"),
        folder / "sharpness.png", directional=_column(history, "directional_sharpness"),
        preconditioned=pre if has_pre else None)
    k = max(len(r.get("eigenvalues") or [1]) for r in history)
    share_png = plot_gradient_share(steps, _column(history, "gradient_share"),
                                    folder / "gradient_share.png",
                                    overlap=_column(history, "overlap"), k=k)
    first, last = history[0], history[-1]
    compared = last.get("compared") or "sharpness"
    report = Report(title, subtitle=f"{len(history)} records, steps {first['step']} to "
                                    f"{last['step']}")
    keys = ["sharpness", "threshold", "preconditioned_sharpness", "ratio",
            "directional_sharpness", "gradient_share", "overlap", "loss", "n_hvp"]
    rows = [[key, first.get(key), last.get(key)] for key in keys
            if first.get(key) is not None or last.get(key) is not None]
    rule = (settings or {}).get("rule") or {}
    what = (f"The threshold ({rule.get('optimizer')}: {rule.get('formula')}) bounds the "
            f"{compared.replace('_', ' ')}" if rule.get("formula") else
            "No stability threshold (no optimizer, or one whose threshold is not known)")
    above = [r for r in history if (r.get("ratio") or 0.0) > 1.0]
    report.section(
        "Sharpness and the edge of stability",
        Figure.from_file(sharp_png, caption=(
            "Top Hessian eigenvalue on the monitor's data at each record (log scale), the "
            "curvature along the optimizer's last update, and the optimizer's stability "
            "threshold; for Adam, the preconditioned sharpness against its threshold.")),
        Paragraph(f"{what}. {len(above)} of {len(history)} records are above it "
                  f"(ratio > 1)."),
        Table(["", f"step {first['step']}", f"step {last['step']}"], rows,
              caption="First and last record"))
    report.section(
        "Gradient in the top eigenspace",
        Figure.from_file(share_png, caption=(
            "Share of the gradient's squared norm in the span of the top eigenvectors "
            "(Gur-Ari et al. 2018), and the overlap of the top eigenvector with the previous "
            "record's.")))
    hvp = [int(r.get("n_hvp") or 0) for r in history]
    secs = [float(r.get("seconds") or 0.0) for r in history]
    report.section("Cost", Paragraph(
        f"{sum(hvp)} Hessian products in all, median {float(np.median(hvp)):.3g} a record; "
        f"{sum(secs):.3g} s ({sum(secs) / len(secs):.3g} s a record)."),
        *([Code(json.dumps(dict(settings), indent=1, default=str), summary="settings")]
          if settings else []))
    return report.write(folder / "report.html")


class SharpnessMonitor(SharpnessRecorder):
    """``hl.SharpnessMonitor(model, loss_fn, data, optimizer, every=1, k=1, out=None, ...)``:
    :class:`~hesslens.analysis.sharpness.SharpnessRecorder` (the measurement, ``update``,
    ``history``) with :meth:`write_report`."""

    def write_report(self, folder: str | os.PathLike[str],
                     title: str = "Sharpness over training") -> Path:
        """Write the history, the figures and a self-contained ``report.html`` into
        ``folder``; return the page's path."""
        return write_sharpness_report(self.history, folder, settings=self.settings(),
                                      title=title)

