"""Curvature over training: the figures and the page of a
:class:`~hesslens.analysis.tracker.CurvatureRecorder`'s records, and :class:`CurvatureTracker`
(``hl.CurvatureTracker``), the recorder with ``write_report``.

The recorder lives in the analysis layer, which draws nothing; the report layer above it adds
the figures (the style of :mod:`hesslens.report.figures`), so every import points down:

* ``curvature_full.png``: the full network's top eigenvalues and trace over the steps;
* ``curvature_layers.png``: each layer block's top eigenvalue and trace (the full network
  dashed);
* ``similarity_layers.png`` and ``densities_last.png`` where similarities and densities were
  recorded; ``sharpness.png`` where records carry an optimizer's ``threshold``.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> tracker = CurvatureTracker(model, nn.functional.cross_entropy, (x, y), every=2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(4):
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     _ = tracker.update(step)
    >>> [r["step"] for r in tracker.history]
    [0, 2]
    >>> tracker.write_report(tempfile.mkdtemp()).name
    'report.html'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hesslens.analysis.tracker import FILES, CurvatureRecorder
from hesslens.errors import HesslensInputError
from hesslens.report.figures import plot_layer_densities
from hesslens.report.html import Code, Figure, Paragraph, Report, Table
from hesslens.report.sharpness import plot_sharpness
from hesslens.report.style import new_figure, save_png

__all__ = ["CurvatureTracker", "write_history_report"]


class CurvatureTracker(CurvatureRecorder):
    """``hl.CurvatureTracker(model, loss_fn, data, out=None, every=1, layers=True, ...)``:
    :class:`~hesslens.analysis.tracker.CurvatureRecorder` (the measurement, ``update``,
    ``history``, the files and the folder's lock) with :meth:`write_report`."""

    def write_report(self, folder: str | Path, title: str = "Curvature over training") -> Path:
        """Write the figures over training (``curvature_full.png``, ``curvature_layers.png``,
        and the similarity and last densities where recorded), the history
        (``curvature.json``, ``curvature.csv``) and a self-contained ``report.html`` (figures
        embedded) into ``folder``; return the report's path."""
        if not self.history:
            raise HesslensInputError("nothing recorded yet: call update() before write_report()")
        return write_history_report(self.history, folder, title=title,
                                    settings=self.settings())


def _log_if_wide(ax: Any, series: Sequence[Sequence[float | None]]) -> None:
    """A log scale when every value is positive and they span more than 50x."""
    v = np.array([x for s in series for x in s if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all() and v.max() / v.min() > 50:
        ax.set_yscale("log")


def _series(history: Sequence[Mapping[str, Any]], layer: str | None, key: str,
            sub: str | None = None) -> list[Any]:
    out = []
    for r in history:
        entry = r["full"] if layer is None else r.get("layers", {}).get(layer, {})
        if key == "top":
            value = (entry.get("top_eigenvalues") or [None])[0]
        else:
            value = entry.get(key)
            if isinstance(value, Mapping):
                value = value.get(sub) if sub else None
        out.append(value)
    return out


def _plot_full(history: Sequence[Mapping[str, Any]], path: Path) -> Path:
    steps = [r["step"] for r in history]
    fig = new_figure(9.0, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    k = max(len(r["full"].get("top_eigenvalues", [])) for r in history)
    tops = [[(r["full"]["top_eigenvalues"][i] if i < len(r["full"]["top_eigenvalues"])
              else None) for r in history] for i in range(k)]
    for i, s in enumerate(tops):
        ax1.plot(steps, [np.nan if v is None else v for v in s], marker="o", ms=3,
                 label=fr"$\lambda_{i + 1}$")
    _log_if_wide(ax1, tops)
    ax1.set_title("Top eigenvalues, full network", fontsize=10)
    ax1.legend(fontsize=8, frameon=False)
    tr = _series(history, None, "trace")
    if any(v is not None for v in tr):
        err = [e or 0.0 for e in _series(history, None, "trace_stderr")]
        t = np.array([np.nan if v is None else v for v in tr], dtype=float)
        ax2.plot(steps, t, marker="o", ms=3, color="#ff7f0e")
        ax2.fill_between(steps, t - np.array(err), t + np.array(err), color="#ff7f0e",
                         alpha=0.25, lw=0)
        _log_if_wide(ax2, [tr])
    ax2.set_title("Trace, full network (± standard error)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    return save_png(fig, path)


def _plot_layers(history: Sequence[Mapping[str, Any]], names: Sequence[str], key: str,
                 path: Path, title: str, sub: str | None = None) -> Path:
    steps = [r["step"] for r in history]
    fig = new_figure(9.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    drawn = []
    for ax, what, label in ((ax1, "top", "top eigenvalue"), (ax2, key, title)):
        all_series = []
        for name in names:
            s = _series(history, name, what, sub)
            all_series.append(s)
            ax.plot(steps, [np.nan if v is None else v for v in s], marker="o", ms=2.5,
                    lw=1.2, label=name)
        if what != "similarity":
            full = _series(history, None, what)
            if any(v is not None for v in full):
                all_series.append(full)
                ax.plot(steps, [np.nan if v is None else v for v in full], color="#444444",
                        ls="--", lw=1.2, label="full network")
        _log_if_wide(ax, all_series)
        ax.set_title(f"{label.capitalize()} per layer", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
        drawn.append(ax)
    drawn[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_png(fig, path)


def _similarity_key(history: Sequence[Mapping[str, Any]]) -> str | None:
    for r in history:
        for entry in r.get("layers", {}).values():
            sim = entry.get("similarity")
            if isinstance(sim, Mapping):
                return "wasserstein" if "wasserstein" in sim else next(iter(sim), None)
            if sim is not None:
                return ""
    return None


def write_history_report(
    history: Sequence[Mapping[str, Any]],
    folder: str | Path,
    *,
    title: str = "Curvature over training",
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Figures and ``report.html`` for a list of tracker records, with the history
    (``curvature.json``, ``curvature.csv``) beside them (see
    :meth:`CurvatureTracker.write_report`); returns the page's path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HesslensInputError(f"{str(folder)!r} is a file; give a folder for the report")
    FILES.write(folder, history, settings)
    names = list(dict.fromkeys(n for r in history for n in r.get("layers", {})))
    report = Report(title, subtitle=f"{len(history)} records, steps {history[0]['step']} to "
                                    f"{history[-1]['step']}")
    full_png = _plot_full(history, folder / "curvature_full.png")
    first, last = history[0], history[-1]

    def row(label: str, entry_first: Mapping[str, Any], entry_last: Mapping[str, Any]) -> list:
        def top(e: Mapping[str, Any]) -> Any:
            return (e.get("top_eigenvalues") or [None])[0]
        return [label, top(entry_first), top(entry_last), entry_first.get("trace"),
                entry_last.get("trace"), entry_last.get("trace_stderr")]

    cols = ["", f"top eigenvalue (step {first['step']})", f"top eigenvalue (step {last['step']})",
            f"trace (step {first['step']})", f"trace (step {last['step']})", "± (last)"]
    rows = [row("full network", first["full"], last["full"])]
    rows += [row(n, first.get("layers", {}).get(n, {}), last.get("layers", {}).get(n, {}))
             for n in names]
    report.section(
        "Full network",
        Figure.from_file(full_png, caption="Top eigenvalues and trace of the full Hessian on the "
                                           "analysis data, at each recorded step."),
        Table(cols, rows, caption="First and last record"))
    thresholds = [r.get("threshold") for r in history]
    if any(t is not None for t in thresholds):  # records of a callback that found an optimizer
        sharp_png = plot_sharpness([r["step"] for r in history],
                                   [(r["full"].get("top_eigenvalues") or [None])[0]
                                    for r in history], thresholds, folder / "sharpness.png")
        report.section("Sharpness and the edge of stability", Figure.from_file(
            sharp_png, caption="Top eigenvalue of the full Hessian against the optimizer's "
                               "stability threshold (2/lr; (2 + 2 momentum)/lr), log scale."))
    if names:
        layer_png = _plot_layers(history, names, "trace", folder / "curvature_layers.png",
                                 "trace")
        blocks: list[Any] = [Figure.from_file(
            layer_png, caption="Each layer block's top eigenvalue and trace (dashed: the full "
                               "network).")]
        sim_key = _similarity_key(history)
        if sim_key is not None:
            sim_png = _plot_layers(history, names, "similarity",
                                   folder / "similarity_layers.png",
                                   f"distance to the full spectrum ({sim_key or 'similarity'})",
                                   sub=sim_key)
            blocks.append(Figure.from_file(sim_png, caption="Each layer's spectrum against the "
                                                            "full one, over training."))
        dens = {n: e["density"] for n, e in last.get("layers", {}).items() if "density" in e}
        if dens and "density" in last["full"]:
            dens_png = plot_layer_densities(last["full"]["density"], dens,
                                            folder / "densities_last.png",
                                            title=f"Densities at step {last['step']}")
            blocks.append(Figure.from_file(dens_png, caption="Eigenvalue densities at the last "
                                                             "record, each layer against the "
                                                             "full network."))
        report.section("Per layer", *blocks)
    secs = [float(r.get("seconds") or 0.0) for r in history]
    report.section("Cost", Paragraph(
        f"{sum(secs):.3g} s in all for {len(history)} records ({sum(secs) / len(secs):.3g} s "
        "each)."), *([Code(json.dumps(dict(settings), indent=1, default=str),
                           summary="settings")] if settings else []))
    return report.write(folder / "report.html")
