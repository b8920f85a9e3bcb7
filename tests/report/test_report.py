"""Writers, figures, the HTML page and the layer study's files."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum
from hesslens.report import (
    CSV_COLUMNS,
    Code,
    Figure,
    Paragraph,
    Report,
    Table,
    figures,
    to_jsonable,
    write_csv,
    write_json,
    write_layer_study,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG
    return struct.unpack(">II", head[16:24])


class _Checker(HTMLParser):
    void = frozenset({"meta", "img", "br", "hr", "link", "input", "col", "source"})

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.external = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is not None and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag not in self.void:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append(tag)


def _check_html(text):
    c = _Checker()
    c.feed(text)
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert not c.external  # self-contained
    return c


# ------------------------------------------------------------------ io
def test_to_jsonable_and_strict_json(tmp_path):
    obj = {"t": torch.tensor([1.5, 2.0]), "n": np.float32(0.25), "i": np.int64(3),
           "nan": float("nan"), "inf": float("inf"), "arr": np.arange(2), "tup": (1, 2),
           "dt": torch.float64, "spec": Spectrum([0.0, 1.0], [1.0, 1.0])}
    out = to_jsonable(obj)
    assert out["t"] == [1.5, 2.0] and out["n"] == 0.25 and out["i"] == 3
    assert out["nan"] is None and out["inf"] == "inf" and out["arr"] == [0, 1]
    assert out["dt"] == "float64" and out["spec"] == {"nodes": [0.0, 1.0], "weights": [0.5, 0.5]}
    path = write_json(tmp_path / "sub" / "r.json", obj)
    assert json.loads(path.read_text())["tup"] == [1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left
    assert os.stat(path).st_mode & 0o044  # readable by others, not mkstemp's 0600
    with pytest.raises(HesslensInputError):
        to_jsonable(object())


def test_write_csv(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"a": 1, "b": None}, {"a": 2.5, "b": [1, 2]}])
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"a": "1", "b": ""}, {"a": "2.5", "b": "1 2"}]


def test_write_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(HesslensInputError):
        write_json(tmp_path / "f" / "r.json", {})


# ------------------------------------------------------------------ html
def test_report_is_self_contained_html(tmp_path):
    png = figures.plot_densities({"a": Spectrum([0.0, 1.0], [0.9, 0.1])}, tmp_path / "d.png")
    report = Report("Title <x>", subtitle="sub")
    report.section("One", Paragraph("a < b & c"), Table(["k", "v"], [["x", 0.123456789],
                                                                    {"k": "y", "v": None}]))
    section = report.section("Two")
    section.add(Figure.from_file(png, caption="cap"), Code("x = 1", summary="code"))
    text = report.render()
    c = _check_html(text)
    assert text.startswith("<!DOCTYPE html>")
    assert "a &lt; b &amp; c" in text and "Title &lt;x&gt;" in text
    assert "0.1235" in text and "–" in text
    assert len(c.images) == 1 and c.images[0].startswith("data:image/png;base64,")
    assert '<a href="#' in text  # navigation between sections
    out = report.write(tmp_path / "r.html")
    assert out.read_text() == text or "Written by hesslens" in out.read_text()


def test_blocks_validate_their_input():
    with pytest.raises(HesslensInputError):
        Figure(b"not a png")
    with pytest.raises(HesslensInputError):
        Report("x").section("s", "just a string")
    with pytest.raises(HesslensInputError):
        Table(["a", "b"], [[1]]).render()


def test_links_badges_and_blocks_in_cells_are_rendered_not_escaped():
    from hesslens.report.html import Badge, Link

    link = Link("study <sgd>", 'study/sgd/report.html?a="1"')
    assert link.render() == ('<a href="study/sgd/report.html?a=&quot;1&quot;">'
                             "study &lt;sgd&gt;</a>")
    p = Paragraph(["a < b, see ", link, " and ", Badge("held"), "."]).render()
    assert p.startswith("<p>a &lt; b, see <a href=") and '<span class="badge badge-held">' in p
    table = Table(["finding", "verdict"], [["x & y", Badge("did not hold")],
                                            ["z", Badge("partly", kind="partly")]]).render()
    assert "<td>x &amp; y</td>" in table
    assert '<td><span class="badge badge-did-not-hold">did not hold</span></td>' in table
    assert '<span class="badge badge-partly">partly</span>' in table
    page = Report("r")
    page.section("s", Paragraph(["go to ", link]))
    assert ".badge-held" in page.render()  # the page carries the badge styles


def test_folded_columns_leave_the_table_in_view_and_come_back_under_details():
    from html.parser import HTMLParser

    html = Table(["arm", "acc", "seeds", "per seed"], [["SGD", 91.5, 3, "90, 92, 92.5"],
                                                        {"arm": "L2", "acc": 91.0, "seeds": 3,
                                                         "per seed": "91, 91, 91"}],
                 fold=["seeds", "per seed"], highlight=[1]).render()
    view, folded = html.split("<details", 1)
    assert "<th>seeds</th>" not in view and "90, 92, 92.5" not in view
    assert "<th>arm</th><th>acc</th>" in view and "<td>SGD</td>" in view
    assert '<summary>all columns (seeds, per seed)</summary>' in folded
    assert "<th>arm</th><th>acc</th><th>seeds</th><th>per seed</th>" in folded
    assert "90, 92, 92.5" in folded and "91, 91, 91" in folded
    assert view.count('<tr class="hl">') == 1 and folded.count('<tr class="hl">') == 1

    class Cells(HTMLParser):  # every row has as many cells as its table has columns
        def __init__(self):
            super().__init__()
            self.rows, self.heads = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.heads.append(0)
            elif tag == "th":
                self.heads[-1] += 1
            elif tag == "tr":
                self.rows.append([len(self.heads) - 1, 0])
            elif tag == "td":
                self.rows[-1][1] += 1

    cells = Cells()
    cells.feed(html)
    assert cells.heads == [2, 4]
    assert all(n == cells.heads[t] for t, n in cells.rows if n)
    with pytest.raises(HesslensInputError, match="fold names columns"):
        Table(["a"], [[1]], fold=["b"]).render()


def test_folding_table_rows_open_to_full_width_blocks():
    from hesslens.report.html import Badge, Details, FoldingTable, Link, Strong

    rows = [([Badge("held"), Strong("One"), "It held: 0.5 [0.4, 0.6].", Link("fig", "#f1")],
             [Paragraph("all the numbers of one"), Paragraph("the rule of one")]),
            ([Badge("partly"), "Two", "Partly.", "–"], [Paragraph("numbers of two")])]
    html = FoldingTable(["verdict", "finding", "what decided it", "figure"], rows,
                        widths=["8rem", "12rem", "1fr", "6rem"]).render()
    head, *details = html.split('<details class="folding-row">')
    assert len(details) == 2
    assert head.count("<span>") == 5  # the marker column and four headers
    summary, body = details[0].split("</summary>")
    assert '<span class="badge badge-held">held</span>' in summary
    assert "<strong>One</strong>" in summary and '<a href="#f1">fig</a>' in summary
    assert "all the numbers" not in summary and "all the numbers of one" in body
    assert summary.count("grid-template-columns: 1rem 8rem 12rem 1fr 6rem") == 1
    assert "numbers of two" in details[1] and "numbers of one" not in details[1]
    with pytest.raises(HesslensInputError, match="row 0 has 1 cells for 2 columns"):
        FoldingTable(["a", "b"], [(["x"], [])]).render()
    with pytest.raises(HesslensInputError, match="widths"):
        FoldingTable(["a", "b"], [], widths=["1fr"]).render()
    d = Details(["more about ", Strong("x")], [Paragraph("hidden")]).render()
    assert d.startswith("<details><summary>more about <strong>x</strong></summary>")
    assert "<details open>" in Details("s", [], open=True).render()


def test_figures_can_be_link_targets(tmp_path):
    png = figures.plot_arm_curves({"a": {"epochs": [0, 1], "mean": [1, 2], "std": [0, 0]}},
                                  tmp_path / "x.png", ylabel="y", title="t")
    assert '<figure id="fig-x"><img' in Figure.from_file(png, id="fig-x").render()
    assert "<figure><img" in Figure.from_file(png).render()


def test_arm_curves_and_interval_plots_are_real_pngs(tmp_path):
    curves = {"SGD": {"epochs": [0, 1, 2], "mean": [0.1, 0.8, 0.9], "std": [None, 0.01, 0.02]},
              "HTR all layers": {"epochs": [0, 1, 2], "mean": [0.1, 0.7, 0.92],
                                 "std": [None, 0.02, 0.01]}}
    a = figures.plot_arm_curves(curves, tmp_path / "acc.png", ylabel="test accuracy (%)",
                                title="accuracy", scale=100.0)
    groups = {"epoch 0": {"x": ["l0", "l1", "l2"], "mean": [0.1, 0.05, 0.2],
                          "low": [0.08, 0.04, 0.15], "high": [0.12, 0.06, 0.25]},
              "epoch 5": {"x": ["l0", "l1", "l2"], "mean": [0.03, 0.01, 0.04],
                          "low": [0.02, float("nan"), 0.03], "high": [0.04, float("nan"), 0.05]}}
    b = figures.plot_intervals(groups, tmp_path / "int.png", xlabel="layer", ylabel="W1",
                               title="t", shade=["l1"], rotate=True)
    c = figures.plot_intervals({"D": {"x": [0, 5, 40], "mean": [0.1, -0.1, 0.2],
                                      "low": [0.0, -0.2, 0.1], "high": [0.2, 0.0, 0.3]}},
                               tmp_path / "d.png", xlabel="epoch", ylabel="D", title="t")
    for p in (a, b, c):
        w, h = _png_size(p)
        assert 500 <= w <= 2200 and 250 <= h <= 1600
        assert os.path.getsize(p) > 10_000  # drawn, not blank


# ------------------------------------------------------------------ figures
def test_figures_are_real_pngs(tmp_path):
    full = Spectrum(np.r_[np.random.default_rng(0).normal(0, 0.02, 200), [0.5, 0.8, 1.0]],
                    np.ones(203))
    layers = {"conv1": full.scaled(0.1), "fc": full.scaled(0.5), "out": full}
    paths = [
        figures.plot_layer_densities(full, layers, tmp_path / "a.png",
                                     distances={"fc": 0.01}, depths={"fc": 0.5}),
        figures.plot_similarity_vs_depth(list(layers), [0, 0.5, 1],
                                         {"W1": [0.1, 0.05, 0.2], "JS": [0.2, 0.1, 0.3]},
                                         tmp_path / "b.png", highlight=["fc"]),
        figures.plot_layer_curvature(list(layers), [0.1, 0.5, 1.0], [1.0, -0.5, 2.0],
                                     tmp_path / "c.png", trace_err=[0.1, 0.1, 0.2],
                                     full_top=1.2, full_trace=2.5),
        figures.plot_gauss_newton_split(["full", *layers], [1.2, 0.1, 0.5, 1.0],
                                        [1.0, 0.1, 0.5, 1.0], [0.3, 1e-9, 0.0, -2e-8],
                                        tmp_path / "d.png",
                                        spectra={"Hessian": full, "G": full.scaled(0.9)}),
    ]
    for p in paths:
        w, h = _png_size(p)
        assert 500 <= w <= 2200 and 250 <= h <= 1600
        assert os.path.getsize(p) > 15_000  # drawn, not blank


# ------------------------------------------------------------------ the layer study's files
@pytest.fixture(scope="module")
def study_dict():
    from hesslens.analysis import layer_study

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3))
    data = (torch.randn(40, 5), torch.randint(0, 3, (40,)))
    study = layer_study(model, torch.nn.functional.cross_entropy, data, k=2,
                        density_probes=2, density_steps=20, progress=False)
    d = study.to_dict()
    d["run"] = {"model": "tiny", "data": "random", "per_class": None}
    return d


def test_write_layer_study(tmp_path, study_dict):
    paths = write_layer_study(study_dict, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["densities.png", "gauss_newton.png", "layer_curvature.png", "layers.csv",
                     "report.html", "results.json", "similarity_depth.png"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["layers"].keys() == study_dict["layers"].keys()
    rows = list(csv.DictReader((tmp_path / "layers.csv").open()))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["name"] for r in rows] == ["full", "0", "2", "4"]
    assert math.isclose(sum(float(r["trace"]) for r in rows[1:]), float(rows[0]["trace"]),
                        rel_tol=1e-9)
    html = paths["html"].read_text()
    c = _check_html(html)
    assert len(c.images) == 4
    assert all(re.fullmatch(r"data:image/png;base64,[A-Za-z0-9+/=]+", s) for s in c.images)
    assert html.count("<table") >= 3
    for name in ("densities", "similarity", "curvature", "gauss_newton"):
        assert paths[f"figure:{name}"].exists()


def test_report_without_gauss_newton(tmp_path, study_dict):
    d = json.loads(json.dumps(study_dict))
    d["full"]["gauss_newton"] = None
    for e in d["layers"].values():
        e["gauss_newton"] = None
    paths = write_layer_study(d, tmp_path)
    assert "figure:gauss_newton" not in paths
    assert len(_check_html(paths["html"].read_text()).images) == 3
