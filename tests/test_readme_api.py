"""The README's "Python API" section: its code blocks run as written, one after the other."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Python API"


def _blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_python_api_examples_run_as_written():
    blocks = _blocks()
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    H = scope["H"]
    assert H.layers[:2] == ["transformer.wte", "transformer.wpe"]
    assert "transformer.h.1.attn.v" in H.layers
    assert H.block("transformer.h.0.attn.q").dim == 16 * 16 + 16
