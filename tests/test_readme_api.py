"""The README's "Python API" section: its code blocks run as written, one after the other."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from hesslens.curvature.layouts import layouts, unregister_layout

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Python API"


def _blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_python_api_examples_run_as_written():
    blocks = _blocks()
    assert len(blocks) == 4
    scope: dict = {}
    known = {layout.name for layout in layouts()}
    try:
        for block in blocks:
            exec(compile(textwrap.dedent(block), "README.md", "exec"), scope)
    finally:  # the example registers layouts of its own: leave the table as it was
        for layout in layouts():
            if layout.name not in known:
                unregister_layout(layout.name)
    H = scope["H"]
    assert H.layers[:2] == ["transformer.wte", "transformer.wpe"]
    assert "transformer.h.1.attn.v" in H.layers
    assert H.block("transformer.h.0.attn.q").dim == 16 * 16 + 16
