"""One figure style: every figure is made by hesslens.report.style.new_figure at one resolution
with one layout, and written by its PNG helpers; no other module builds matplotlib figures."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import hesslens
from hesslens.report import style

SRC = Path(hesslens.__file__).parent
NOT_YET: set[str] = set()


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_a_figure_has_the_style_size_resolution_and_layout(tmp_path):
    fig = style.new_figure(4.0, 2.5)
    assert tuple(fig.get_size_inches()) == (4.0, 2.5) and fig.dpi == style.DPI == 110
    assert type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    ax = fig.subplots()
    ax.plot([0, 1, 2], [2, 0, 1], color=style.COLORS[0])
    ax.axhline(1.0, color=style.FULL_COLOR)
    png = style.png_bytes(fig)
    assert _png_size(png) == (440, 275)  # inches x DPI
    path = style.save_png(fig, tmp_path / "sub" / "f.png")
    assert path == tmp_path / "sub" / "f.png" and _png_size(path.read_bytes()) == (440, 275)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.png"]  # no temporary left


def test_no_module_but_the_style_builds_or_saves_a_matplotlib_figure():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in {"report/style.py", *NOT_YET}:
            continue
        text = path.read_text()
        if re.search(r"^\s*(from|import) matplotlib", text, re.M) or ".savefig(" in text:
            offenders.append(rel)
    assert offenders == []


def test_the_commands_figures_come_out_at_the_style_resolution():
    from hesslens.experiments.compare import metric_figure
    from hesslens.experiments.reproduce_figures import _layer_curvature_figure

    result = {"arms": [{"label": "SGD", "curves": {"trace": {
        "epochs": [0, 1, 2], "mean": [1.0, 2.0, 4.0], "std": [0.1, None, 0.2]}}}]}
    assert _png_size(metric_figure(result, "trace")) == (round(6.4 * 110), round(4.2 * 110))
    runs = [{"epochs": [{"epoch": e, "layer_trace": {"fc": 1.0 + e}, "trace": 2.0 + e}
                        for e in range(3)]}]
    png = _layer_curvature_figure(runs, "layer_trace", "t")
    assert _png_size(png) == (round(6.4 * 110), round(4.0 * 110))
