"""The package's layers point down only: a static read of every import (top-level and
function-local) fails on one that reaches a layer above the module's own, or the package root
from inside the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hesslens"

#: Each part of the package and its floor: a module may import its own floor and those below.
FLOORS = {
    "version": 0, "errors": 0, "checks": 1, "files": 1, "locks": 1, "provenance": 1,
    "parallel": 1,
    "linalg": 2, "splits": 2,
    "curvature": 3, "zoo": 3,
    "training": 4, "analysis": 4,
    "report": 5,
    "monitoring": 6,
    "integrations": 7,
    "experiments": 8,
    "cli": 9, "__main__": 10,
}

#: Parts at one floor that must not import each other either.
APART = {("training", "analysis"), ("analysis", "training"), ("curvature", "zoo"),
         ("zoo", "curvature"), ("linalg", "splits"), ("splits", "linalg")}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute hesslens import in ``path``; relative imports are
    resolved against the package."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE).with_suffix("")
    here = ["hesslens", *rel.parts[:-1]] if rel.name != "__init__" else ["hesslens", *rel.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "hesslens":  # from hesslens import x: x is the part
                out.extend((node.lineno, f"hesslens.{alias.name}") for alias in node.names)
            else:
                out.append((node.lineno, module))
    return [(line, m) for line, m in out if m == "hesslens" or m.startswith("hesslens.")]


def _violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        part = _part(path)
        assert part in FLOORS, f"{path.relative_to(PACKAGE)} is in no layer: add it to FLOORS"
        for line, module in _imports(path):
            target = module.split(".")[1] if "." in module else None
            where = f"{path.relative_to(PACKAGE)}:{line} imports {module}"
            if target is None:
                found.append(f"{where}: the package root, from inside the package")
            elif target not in FLOORS:
                found.append(f"{where}: an unknown part")
            elif target != part and (FLOORS[target] > FLOORS[part] or (part, target) in APART):
                found.append(f"{where}: a layer above (or beside) {part}")
    return found


def test_every_import_points_down():
    violations = _violations()
    assert not violations, "imports that point up:\n" + "\n".join(violations)


@pytest.mark.parametrize("source, expected", [
    ("from hesslens.report.figures import DPI\n", "a layer above"),
    ("import hesslens\n", "the package root"),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    """Guard for the guard: an upward import planted in a copy of a low module is found."""
    fake = tmp_path / "hesslens"
    (fake / "linalg").mkdir(parents=True)
    (fake / "linalg" / "planted.py").write_text(source)
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert any(expected in v for v in _violations())
