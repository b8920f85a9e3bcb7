"""The one figure style of hesslens: every figure (the layer study's, the reproduce report's,
``hesslens compare``'s, the sharpness and tracking reports') is made by :func:`new_figure` and
written by :func:`png_bytes` / :func:`save_png`, so size units, resolution, layout and colours
are decided here once.

Figures are matplotlib ``Figure`` objects on the Agg canvas: no display and no global pyplot
state, so they can be drawn from any thread or process. matplotlib is imported when the first
figure is made, not with this module: importing hesslens, its tracker or its monitor stays
light, and a command whose figures need a missing matplotlib says so in its preflight instead
of failing at import.

Example:
    >>> fig = new_figure(3.0, 2.0)
    >>> ax = fig.subplots()
    >>> _ = ax.plot([0, 1], [1, 0], color=COLORS[0])
    >>> png = png_bytes(fig)
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n", fig.dpi == DPI
    (True, True)
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from hesslens.files import write_bytes

__all__ = ["COLORS", "DPI", "FULL_COLOR", "new_figure", "png_bytes", "save_png"]

#: Resolution of every figure (dots per inch; sizes are in inches).
DPI = 110
#: The colour of the full network (or of any reference curve) beside its layers.
FULL_COLOR = "#444444"
#: The colours of series, in order (matplotlib's "tab10").
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def new_figure(width: float, height: float) -> Any:
    """A ``width`` x ``height`` inch matplotlib ``Figure`` at :data:`DPI` on the Agg canvas,
    with constrained layout (titles, labels and legends never overlap or get cut off)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # on first use: see above
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    """``fig`` as the bytes of a PNG at :data:`DPI` (e.g. to embed in an HTML page)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically (:func:`hesslens.files.write_bytes`) and
    return the path."""
    return write_bytes(path, png_bytes(fig))
