"""The README's section "Curvature in your own training loop": its code blocks run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Curvature in your own training loop"


def _blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    body = text[start:end if end >= 0 else None]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_section_has_a_plain_loop_a_trainer_example_and_the_own_model_trainer():
    blocks = _blocks()
    assert len(blocks) == 3
    assert "CurvatureTracker" in blocks[0] and "CurvatureCallback" in blocks[1]
    assert "train(config" in blocks[2]
    assert len(blocks[0].strip().splitlines()) <= 12


def test_plain_loop_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_blocks()[0], "README.md", "exec"), scope)
    history = scope["tracker"].history
    assert [r["step"] for r in history] == list(range(0, 50, 5))
    assert all(set(r["layers"]) == {"0", "2"} and r["full"]["trace"] > 0 for r in history)
    html = (tmp_path / "runs" / "curv" / "report.html").read_text()
    assert "data:image/png;base64," in html


def test_trainer_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it (the test extra has it)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_blocks()[1], "README.md", "exec"), scope)
    assert "[4, 8]" in capsys.readouterr().out
    assert [r["step"] for r in scope["callback"].history] == [4, 8]
    assert (tmp_path / "runs" / "gpt2-curv" / "report.html").exists()


def test_own_model_training_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_blocks()[2], "README.md", "exec"), scope)
    run = scope["run"]
    assert len(run["epochs"]) == 5 + 1  # epoch 0 (initialisation) and five trained epochs
    assert run["final"]["trace"] > 0 and 0.5 < run["final"]["test_acc"] <= 1.0
    assert (tmp_path / "runs" / "my-mlp" / "metrics.json").exists()


def test_sharpness_section_runs_and_reaches_the_edge(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    start = text.index("## Sharpness while you train")
    body = text[start:text.find("\n## ", start + 10)]
    (block,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    ratios = [r["ratio"] for r in scope["mon"].history]
    assert ratios[0] < 0.5 and 0.9 < max(ratios) < 1.3  # sharpens up to 2 / lr
    assert (tmp_path / "runs" / "sharp" / "report.html").exists()
    assert "[0." in capsys.readouterr().out
