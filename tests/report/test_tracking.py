"""hl.CurvatureTracker's report: the recorder of hesslens.analysis.tracker with its figures
and self-contained page, and a package import that stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import hesslens as hl
from hesslens.analysis.tracker import HISTORY_JSON, CurvatureRecorder
from hesslens.errors import HesslensInputError
from hesslens.report.tracking import CurvatureTracker

LOSS = nn.functional.cross_entropy


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 4),
                         nn.Tanh(), nn.Linear(4, 3))


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model, x, y, steps, tracker):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        model.train()
        opt.zero_grad()
        LOSS(model(x), y).backward()
        opt.step()
        tracker.update(step)


def test_the_package_tracker_is_the_recorder_with_a_report():
    assert hl.CurvatureTracker is CurvatureTracker
    assert issubclass(CurvatureTracker, CurvatureRecorder)
    assert not hasattr(CurvatureRecorder, "write_report")  # the analysis layer draws nothing


def test_report_embeds_its_figures(tmp_path):
    x, y = _data()
    model = _model()
    tracker = CurvatureTracker(model, LOSS, (x, y), similarity=True)
    _train(model, x, y, steps=3, tracker=tracker)
    path = tracker.write_report(tmp_path / "rep")
    html = path.read_text()
    figures = ["curvature_full.png", "curvature_layers.png", "similarity_layers.png",
               "densities_last.png"]
    for name in figures:
        assert (tmp_path / "rep" / name).stat().st_size > 1000
    assert html.count('<img src="data:image/png;base64,') == len(figures)
    assert 'src="http' not in html and 'href="http' not in html
    assert json.loads((tmp_path / "rep" / HISTORY_JSON).read_text())["records"] == json.loads(
        json.dumps(tracker.history))


def test_a_report_before_any_record_is_refused(tmp_path):
    x, y = _data()
    tracker = CurvatureTracker(_model(), LOSS, (x, y), layers=False, trace=False)
    with pytest.raises(HesslensInputError, match="nothing recorded yet"):
        tracker.write_report(tmp_path)


def test_import_hesslens_stays_light():
    code = ("import sys, hesslens; hesslens.CurvatureTracker; "
            "print(any(m in sys.modules for m in ('transformers', 'lightning', "
            "'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
