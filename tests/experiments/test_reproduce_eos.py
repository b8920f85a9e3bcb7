"""The edge-of-stability setting of `hesslens reproduce`: the verdict rule on records made to pass
and to fail, the quick plan's runs (which must show the edge), and the report's section."""

from __future__ import annotations

import json
import math

import pytest

from hesslens.experiments import reproduce_findings as findings
from hesslens.experiments.reproduce_eos import edge_section, run_edge_of_stability
from hesslens.experiments.reproduce_plan import EdgeOfStability, full_plan, quick_plan

BAND = (0.9, 1.25)


def _run(ratios, optimizer="SGD", lr=0.1):
    return {"optimizer": optimizer, "lr": lr,
            "records": [{"step": 5 * i, "ratio": r} for i, r in enumerate(ratios)]}


def test_a_run_that_sharpens_then_hovers_holds():
    hover = [1.05 + 0.04 * math.sin(0.7 * i) for i in range(30)]
    e = findings.edge_run(_run([0.2, 0.5, 0.95, *hover]), BAND)
    assert e["verdict"] == "held" and e["crossed_at"] == 15
    assert e["low"] < e["mean"] < e["high"] and e["share"] == 1.0


@pytest.mark.parametrize("ratios, verdict", [
    ([0.2, 0.5, 0.8, 0.9], "not shown"),                      # never reaches the threshold
    ([0.2, 0.6] + [1.1] * 5, "not shown"),                    # too few records after it
    ([0.2, 0.6] + [1.0 + 0.1 * i for i in range(20)], "did not hold"),  # keeps rising
    ([0.2, 0.6] + [1.05, 0.5] * 10, "did not hold"),          # falls far below
    ([0.95, 0.99] + [1.05] * 20, "not shown"),                # no progressive sharpening
])
def test_runs_that_do_not_show_the_edge(ratios, verdict):
    assert findings.edge_run(_run(ratios), BAND)["verdict"] == verdict


def test_adam_needs_no_sharpening_from_below_its_first_record():
    # Adam's first record (one step in) has a tiny preconditioner: far above the threshold
    e = findings.edge_run(_run([80.0, 0.3, 0.7] + [1.0, 0.98] * 10, "Adam"), BAND)
    assert e["verdict"] == "held"


def test_the_claim_is_partly_held_when_one_learning_rate_fails():
    good = _run([0.2, 0.5] + [1.05] * 20, lr=0.2)
    bad = _run([0.2, 0.5] + [1.0 + 0.1 * i for i in range(20)], lr=0.4)
    (gd,) = findings.edge_of_stability({"setting": {"band": BAND}, "runs": [good, bad]})
    assert gd.verdict == "partly" and "lr 0.4" in gd.setting
    assert findings.edge_of_stability(None) == []


def test_quick_plan_runs_show_the_edge_of_stability(tmp_path):
    # the quick plan's setting, as `hesslens reproduce --quick` runs it: both claims hold
    eos = quick_plan().edge_of_stability
    assert eos is not None and full_plan().edge_of_stability.gd[0][0] == 0.1
    result = run_edge_of_stability(eos)
    gd, adam = findings.edge_of_stability(result)
    assert gd.verdict == "held", gd.numbers
    assert adam.verdict == "held", adam.numbers
    assert BAND[0] <= gd.interval[0] and gd.interval[1] <= BAND[1]
    paragraph, png, caption = edge_section(json.loads(json.dumps(result)), tmp_path)
    assert "Cohen et al." in str(vars(paragraph))
    assert png == tmp_path / "edge_of_stability.png" and png.exists() and caption


def test_the_setting_lands_in_the_report(tmp_path):
    from hesslens.experiments.compare import compare_runs
    from hesslens.experiments.reproduce_plan import slug
    from hesslens.experiments.reproduce_report import write_reproduce_report
    from hesslens.experiments.reproduce_study import EXTRA, study_sizes
    from hesslens.training import TrainConfig
    from tests.experiments.test_reproduce_findings import MIDDLE, C, _layers, _state, _write_run

    runs = {}
    for s in (0, 1):
        d = tmp_path / "runs" / slug("SGD") / f"seed{s}"
        _write_run(d, TrainConfig(epochs=2, seed=s).to_dict(), [0.1, 0.8, 0.9], [5.0, 9.0, 8.0])
        runs.setdefault("SGD", []).append(d)
    comparison = compare_runs([str(d) for d in runs["SGD"]])
    tiny = run_edge_of_stability(EdgeOfStability(per_class=2, width=8, gd=((0.5, 20),),
                                                 adam=((1e-2, 20),), every=5))
    extra = {"sizes": study_sizes("quick").to_dict(),
             "default": {"model": "cnn1d", "num_classes": C, "num_samples": 100,
                         "trained": {"0": _state([9, 10])}, "init": {"0": _state([90, 99])}},
             "transformer": {"model": "gpt-nano", "data": "modadd", "num_sequences": 23,
                             "probes": _layers(MIDDLE)},
             "edge_of_stability": tiny}
    chosen = {"SGD": {"knob": None, "value": None, "grid": []}}
    result = write_reproduce_report(tmp_path, quick_plan(), chosen, runs, comparison,
                                    {EXTRA: extra}, {"train_seconds": 1.0})
    claims = [f["claim"] for f in result["beyond_the_paper"]]
    assert any("2/lr" in c for c in claims) and any("38/lr" in c for c in claims)
    page = (tmp_path / "report.html").read_text()
    assert "The edge of stability: setting and figure" in page
    assert (tmp_path / "figures" / "edge_of_stability.png").exists()
    # the findings' rows link the figure, which is drawn before them
    assert page.count('href="#fig-figures-edge_of_stability"') == 2
    assert "edge of stability (Cohen et al. 2021)" in result["summary_text"]
