"""The verdict rules of ``hesslens reproduce`` on synthetic inputs that make each verdict
happen, their intervals against scipy, and the report's captions, links, badges and %."""

import json
import math
import re
from html import escape
from html.parser import HTMLParser

import numpy as np
import pytest
from scipy import stats

from hesslens.analysis.intervals import cluster_bootstrap
from hesslens.analysis.probe_spectra import ProbeSpectra
from hesslens.experiments import reproduce_findings as rf
from hesslens.linalg import Spectrum

C = 10


def _ps(spectra: dict[str, list[Spectrum]], dims: dict[str, int] | None = None) -> dict:
    names = [n for n in spectra if n != "full"]
    dims = dims or {n: len(s[0]) for n, s in spectra.items()}
    top = {n: [float(max(abs(s[0].nodes)))] for n, s in spectra.items()}
    return ProbeSpectra(names, dims, top, spectra, {}).to_dict()


def _bulk_plus(n_out: int, dim: int = 200) -> Spectrum:
    """dim eigenvalues: n_out outliers spread over [1, 10], the rest zero."""
    return Spectrum.from_eigenvalues([0.0] * (dim - n_out) + list(np.linspace(1, 10, n_out)))


def _state(outliers: list[int], entries=("full", "a", "b")) -> dict:
    """One network state: every entry's probes have these outlier counts."""
    return _ps({e: [_bulk_plus(n) for n in outliers] for e in entries})


# ---------------------------------------------------------------------- finding 1
def test_finding1_held_when_the_control_fails():
    trained = {"0": _state([9, 10, 11]), "1": _state([10, 12, 10])}
    control = {"0": _state([100, 110, 95])}
    f = rf.layer_spectra_like_full(None, trained, control, C, num_samples=100)
    assert f.verdict == "held"
    assert f.details["specific"] is True
    assert "the outlier count separates" in f.numbers.lower()
    assert "[5, 20]" in f.rule  # the threshold is stated
    lo, hi = f.interval
    assert lo <= 10.33 <= hi


def test_finding1_not_specific_when_the_control_passes_too():
    trained = {"0": _state([9, 10, 11])}
    f = rf.layer_spectra_like_full(None, trained, {"0": _state([10, 10, 11])}, C)
    assert f.verdict == "partly"
    assert f.numbers.startswith("Not specific")
    assert f.details["specific"] is False


def test_finding1_did_not_hold_without_a_bulk():
    trained = {"0": _state([150, 160, 150])}  # 75 % of the spectrum outside the band
    f = rf.layer_spectra_like_full(None, trained, {"0": _state([100, 100])}, C)
    assert f.verdict == "did not hold"


def test_finding1_bulk_without_few_outliers_is_partly():
    trained = {"0": _state([60, 60, 61])}  # bulk 0.7 but 60 outliers, not about C
    f = rf.layer_spectra_like_full(None, trained, {"0": _state([100])}, C)
    assert f.verdict == "partly" and f.details["trained"] == {"bulk": True,
                                                               "few_outliers": False}


def test_finding1_interval_is_the_two_level_bootstrap():
    trained = {"0": _state([9, 10, 14]), "1": _state([12, 16, 10])}
    f = rf.layer_spectra_like_full(None, trained, None, C)
    _, lo, hi = cluster_bootstrap([[9.0, 10.0, 14.0], [12.0, 16.0, 10.0]])
    assert f.interval == pytest.approx((lo, hi), rel=1e-9)
    assert f.verdict == "partly" and "specificity is unknown" in f.numbers


# ---------------------------------------------------------------------- finding 2
FULL = Spectrum([0.0, 0.1, 1.0], [0.9, 0.08, 0.02])
FAR = Spectrum([-1.0, 0.0, 1.0], [0.3, 0.4, 0.3])
NAMES = ["l0", "l1", "l2", "l3", "l4", "l5"]  # middle: l2, l3, l4


def _layers(close: set[str], n_probes: int = 3, jitter: float = 0.0) -> dict:
    spectra = {"full": [FULL] * n_probes}
    for name in NAMES:
        base = FULL if name in close else FAR
        spectra[name] = [Spectrum(base.nodes, base.weights + jitter * (p + 1) * np.arange(3))
                         for p in range(n_probes)]
    return _ps(spectra, {n: 100 for n in ["full", *NAMES]})


MIDDLE, OUTER = {"l2", "l3", "l4"}, {"l0", "l1", "l5"}


def test_finding2_held_when_the_middle_is_closer_in_every_seed():
    runs = {str(s): _layers(MIDDLE, jitter=0.01 * s) for s in range(3)}
    f = rf.middle_layers_most_similar({"deep": runs})
    assert f.verdict == "held" and f.interval[0] > 0
    units = [rf.middle_minus_outer(ProbeSpectra.from_dict(runs[s])) for s in sorted(runs)]
    _, lo, hi = cluster_bootstrap(units)
    assert f.interval == pytest.approx((lo, hi), rel=1e-12)


def test_finding2_did_not_hold_when_the_outer_layers_are_closer():
    runs = {str(s): _layers(OUTER) for s in range(3)}
    assert rf.middle_layers_most_similar({"deep": runs}).verdict == "did not hold"


def test_finding2_not_shown_when_seeds_disagree():
    runs = {"0": _layers(MIDDLE), "1": _layers(OUTER), "2": _layers(MIDDLE | OUTER)}
    f = rf.middle_layers_most_similar({"deep": runs})
    assert f.verdict == "not shown" and f.interval[0] < 0 < f.interval[1]


def test_finding2_partly_when_a_second_setting_contradicts_and_tracks_epochs():
    deep = {str(s): _layers(MIDDLE) for s in range(3)}
    other = {str(s): _layers(OUTER) for s in range(2)}
    f = rf.middle_layers_most_similar({"deep": deep, "cnn": other},
                                      over_epochs={0: other, 5: deep})
    assert f.verdict == "partly"
    assert "epoch 0:" in f.numbers and "epoch 5:" in f.numbers


# ---------------------------------------------------------------------- finding 3
def _run(seed: int, tops: list[float], traces: list[float], layer_factor: float = 1.0):
    epochs = []
    for e, (t, tr) in enumerate(zip(tops, traces)):
        epochs.append({"epoch": e, "top_eigenvalue": t, "trace": tr,
                       "layer_top_eigenvalue": {"a": t * layer_factor**e},
                       "layer_trace": {"a": tr * layer_factor**e}})
    return {"config": {"seed": seed}, "epochs": epochs}


def test_finding3_held_from_epoch_zero_with_sign_test_and_interval():
    ratios = [0.5, 0.4, 0.6, 0.45, 0.55]
    runs = [_run(s, [10.0, 12.0, 10.0 * r], [50.0, 55.0, 50.0 * r], 0.8)
            for s, r in enumerate(ratios)]
    f = rf.curvature_falls(runs)
    assert f.verdict == "held"
    assert f.p_value == pytest.approx(0.5**5)
    logs = np.log(ratios)
    ref = stats.t.interval(0.95, 4, loc=logs.mean(), scale=stats.sem(logs))
    assert f.interval == pytest.approx(ref, rel=1e-10)
    assert "(epoch 0)" in f.numbers
    three = rf.curvature_falls(runs[:3])  # the interval decides; the sign test is reported
    assert three.verdict == "held" and three.p_value == pytest.approx(0.125)


def test_finding3_did_not_hold_when_curvature_rose_from_initialisation():
    runs = [_run(s, [1.0, 6.0, 3.0 + 0.1 * s], [10.0, 40.0, 12.0 + s]) for s in range(5)]
    f = rf.curvature_falls(runs)
    assert f.verdict == "did not hold"
    assert "log(last/peak)" in f.numbers  # the fall after the peak is still reported


def test_finding3_partly_when_the_evidence_is_mixed():
    runs = [_run(s, [5.0, 5.0, 5.0 * r], [20.0, 20.0, 20.0 * r])
            for s, r in enumerate([0.5, 1.4, 0.7, 1.2])]
    assert rf.curvature_falls(runs).verdict == "partly"


# ---------------------------------------------------------------------- finding 5
def _arm(accs, traces, seeds=(0, 1, 2, 3)):
    def stat(v):
        return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "values": list(v)}

    return {"final": {"test_acc": stat(accs), "trace": stat(traces)}, "seeds": list(seeds)}


def test_finding5_paired_interval_matches_scipy_and_decides():
    sgd = _arm([0.90, 0.91, 0.89, 0.92], [12.0, 13.0, 11.5, 12.5])
    htr = _arm([0.93, 0.935, 0.925, 0.945], [8.0, 9.0, 8.5, 8.8])
    f = rf.htr_helps({"SGD": sgd, "HTR all layers": htr})
    assert f.verdict == "held"
    d = np.subtract([0.93, 0.935, 0.925, 0.945], [0.90, 0.91, 0.89, 0.92])
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert f.interval == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert f.p_value == pytest.approx(stats.ttest_rel(d, np.zeros(4)).pvalue, rel=1e-8)
    same = _arm([0.905, 0.90, 0.90, 0.915], [12.5, 12.0, 12.0, 13.0])
    assert rf.htr_helps({"SGD": sgd, "HTR all layers": same}).verdict == "not shown"
    worse = _arm([0.85, 0.86, 0.84, 0.86], [20.0, 21.0, 19.0, 22.0])
    assert rf.htr_helps({"SGD": sgd, "HTR all layers": worse}).verdict == "did not hold"


# ---------------------------------------------------------------------- transformer
def test_transformer_section_compares_heterogeneity_with_the_cnn():
    blocks = ["wte", "h.0.attn.q", "h.0.attn.k", "h.0.mlp_in", "h.0.mlp_out", "ln_f"]
    shapes = [FAR, FULL, FULL, FULL, FAR, Spectrum([-1.0, 1.0], [0.5, 0.5])]
    jit = [0.0, 0.01, 0.02]
    tf = _ps({"full": [FULL] * 3,
              **{b: [Spectrum(s.nodes, s.weights + j) for j in jit]
                 for b, s in zip(blocks, shapes)}}, {n: 50 for n in ["full", *blocks]})
    alike = {"0": _ps({"full": [FULL] * 2, "a": [FULL] * 2, "b": [FULL.scaled(2.0)] * 2,
                       "c": [FULL] * 2}, {n: 50 for n in ("full", "a", "b", "c")})}
    f = rf.transformer_blocks(tf, {"cnn": alike})
    assert f.verdict == "held"  # middle blocks (q, k, mlp_in) are FULL, and H_tf > H_cnn = 0
    assert "transformer minus CNN" in f.numbers
    assert "excess comes from the embeddings" not in f.numbers
    # the same blocks with the attention and MLP blocks all alike: the excess is the norms'
    alike_core = [FAR, FULL, FULL, FULL, FULL, Spectrum([-1.0, 1.0], [0.5, 0.5])]
    tf2 = _ps({"full": [FULL] * 3,
               **{b: [Spectrum(s.nodes, s.weights + j) for j in jit]
                  for b, s in zip(blocks, alike_core)}}, {n: 50 for n in ["full", *blocks]})
    assert "excess comes from the embeddings" in rf.transformer_blocks(
        tf2, {"cnn": alike}).numbers
    assert rf.transformer_blocks(None).verdict == "not measured"


# ---------------------------------------------------------------------- the report
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.links, self.badges, self.cells = [], [], [], []
        self._in, self._fig, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in.append(tag)
        if tag == "figure":
            self._fig = {"img": False, "caption": ""}
        elif tag == "img" and self._fig is not None:
            self._fig["img"] = True
        elif tag == "a":
            self.links.append(a.get("href"))
        elif tag == "span" and "badge" in (a.get("class") or ""):
            self.badges.append(a["class"])
        elif tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figures.append(self._fig)
            self._fig = None
        elif tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if self._in:
            self._in.pop()

    def handle_data(self, data):
        if self._fig is not None and "figcaption" in self._in:
            self._fig["caption"] += data
        if self._cell is not None:
            self._cell += data


def _write_run(path, cfg, accs, traces):
    path.mkdir(parents=True)
    epochs = [{"epoch": e, "test_acc": a, "trace": t, "top_eigenvalue": t / 5,
               "epoch_seconds": 0.1, "layer_trace": {"a": t / 2, "b": t / 2},
               "layer_top_eigenvalue": {"a": t / 10, "b": t / 9}}
              for e, (a, t) in enumerate(zip(accs, traces))]
    (path / "metrics.json").write_text(json.dumps({"config": cfg, "epochs": epochs}))


def test_report_has_captions_links_badges_arm_names_and_percent(tmp_path, monkeypatch):
    from hesslens.experiments import reproduce_figures
    from hesslens.experiments.compare import compare_runs
    from hesslens.experiments.reproduce_plan import quick_plan, slug
    from hesslens.experiments.reproduce_report import write_reproduce_report
    from hesslens.experiments.reproduce_study import EXTRA, study_sizes
    from hesslens.report import figures
    from hesslens.training import TrainConfig

    plan = quick_plan()
    runs = {}
    for arm, extra_cfg, shift in (("SGD", {}, 0.0), ("HTR all layers", {"htr_gamma": 1e-3},
                                                      0.01)):
        for s in (0, 1):
            d = tmp_path / "runs" / slug(arm) / f"seed{s}"
            cfg = TrainConfig(epochs=2, seed=s, **extra_cfg).to_dict()
            _write_run(d, cfg, [0.1, 0.8 + shift, 0.9 + shift + 0.002 * s],
                       [5.0, 20.0 - 10 * shift, 12.0 - 100 * shift + s])
            runs.setdefault(arm, []).append(d)
    comparison = compare_runs([str(d) for v in runs.values() for d in v])
    study_dir = tmp_path / "study" / "sgd"
    figures.plot_arm_curves({"x": {"epochs": [0, 1], "mean": [1, 2], "std": [0, 0]}},
                            study_dir / "similarity_depth.png", ylabel="y", title="t")
    (study_dir / "report.html").write_text("<html></html>")
    layer_study = {"full": {"top_eigenvalues": [1.0], "gauss_newton": None},
                   "layers": {"a": {"similarity": {"wasserstein": 0.1}, "gauss_newton": None},
                              "b": {"similarity": {"wasserstein": 0.2}, "gauss_newton": None}}}
    deep = {"model": "mlp5", "data": "mnist1d", "seeds": [0, 1], "epochs": [0, 3],
            "spectra": {"0": {"0": _layers(OUTER), "1": _layers(OUTER)},
                        "3": {"0": _layers(MIDDLE), "1": _layers(MIDDLE)}},
            "seconds": {"wall": 2.0, "cpu": 1.5}}
    extra = {"sizes": study_sizes("quick").to_dict(), "deep": deep,
             "default": {"model": "cnn1d", "num_classes": C, "num_samples": 100,
                         "trained": {"0": _state([9, 10])}, "init": {"0": _state([90, 99])}},
             "transformer": {"model": "gpt-nano", "data": "modadd", "num_sequences": 23,
                             "probes": _layers(MIDDLE),
                             "trained": {"steps": 5, "optimizer": "AdamW", "train_acc": 1.0,
                                         "test_acc": 0.3, "probes": _layers(OUTER)}}}
    seen = []
    real = figures.plot_arm_curves

    def spy(curves, *args, **kwargs):
        seen.append((list(curves), kwargs.get("scale", 1.0), kwargs["ylabel"]))
        return real(curves, *args, **kwargs)

    monkeypatch.setattr(reproduce_figures, "plot_arm_curves", spy)  # the name the report calls
    chosen = {"SGD": {"knob": None, "value": None, "grid": [], "tune_seeds": [100, 101],
                      "val_acc": 0.9, "val_acc_std": 0.01, "val_acc_min": 0.893,
                      "val_acc_max": 0.907, "val_acc_seeds": [0.893, 0.907]},
              "HTR all layers": {"knob": "htr_gamma", "value": 1e-3, "margin": 0.001,
                                 "stderr": 0.004, "tune_seeds": [100, 101], "grid": [
                                     {"value": 1e-3, "val_acc": 0.91, "val_acc_std": 0.004,
                                      "val_acc_min": 0.907, "val_acc_max": 0.913,
                                      "val_acc_seeds": [0.907, 0.913]},
                                     {"value": 3e-3, "val_acc": 0.909, "val_acc_std": 0.002,
                                      "val_acc_min": 0.908, "val_acc_max": 0.910,
                                      "val_acc_seeds": [0.908, 0.910]},
                                     {"value": 3e-2, "val_acc": 0.45, "val_acc_std": 0.6,
                                      "val_acc_min": 0.0, "val_acc_max": 0.9,
                                      "val_acc_seeds": [0.0, 0.9], "diverged_seeds": [100]}]}}
    (tmp_path / "cost.json").write_text(json.dumps({
        "method": "each arm one epoch alone, median of 3 rounds",
        "load_average_before": [8.28, 7.4, 7.4], "load_average_after": [8.1, 7.4, 7.4]}))
    comparison["notes"].append("cost vs SGD: each arm one epoch alone, median of 3 rounds.")
    result = write_reproduce_report(tmp_path, plan, chosen, runs, comparison,
                                    {"SGD": layer_study, EXTRA: extra}, {"train_seconds": 3.0})
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    assert len(page.figures) >= 8
    assert all(f["img"] and len(f["caption"]) > 40 for f in page.figures)
    assert "study/sgd/report.html" in page.links and "compare/compare.csv" in page.links
    # one badge per finding and for the transformer section, plus the summary's
    verdicts = [f["verdict"] for f in result["findings"] + result["beyond_the_paper"]]
    assert len(page.badges) >= len(verdicts)
    for v in verdicts:
        assert f"badge-{v.replace(' ', '-')}" in " ".join(page.badges)
    # legends are the table's arm names; accuracy is drawn and tabled in %
    acc = [s for s in seen if s[2].startswith("test accuracy")]
    assert acc and acc[0][0] == ["SGD", "HTR all layers"] and acc[0][1] == 100.0
    assert "(%)" in acc[0][2]
    assert any(c.startswith("90.10 ± 0.14") for c in page.cells), page.cells[:12]
    # the tuning grid in %, with its spread over tuning seeds and the reference row
    assert "90.70, 91.30" in page.cells and "90.70-91.30" in page.cells
    assert "reference" in page.cells and "chosen" in page.cells
    assert "diverged on seed 100 (scored 0)" in page.cells
    text = (tmp_path / "report.html").read_text()
    assert "within noise" in text
    assert "(cost.json): each arm one epoch alone, median of 3 rounds; 1-minute load " \
           "average 8.28 before, 8.10 after" in text
    assert text.count("median of 3 rounds") == 1  # the note is not repeated
    assert result["findings"][1]["verdict"] == "held"
    # the transformer at initialisation and trained, each against the CNN in the same state
    init, trained = result["beyond_the_paper"]
    assert "at initialisation" in init["setting"] and "train accuracy 100.0 %" in trained["setting"]
    assert trained["verdict"] in {"did not hold", "partly"}  # its outer blocks are the close ones
    assert not math.isnan(result["findings"][1]["interval"][0])

    # at a glance: every verdict comes before the first figure (the first screen), in a row
    # with its one sentence and its figure links; the numbers and the rule fold under it
    rows = text.split('<details class="folding-row">')[1:]
    checked = result["findings"] + result["beyond_the_paper"]
    assert len(rows) == len(checked)
    assert text.index("<figure") > text.rindex('<details class="folding-row">')
    ids = set(re.findall(r'<figure id="([^"]+)"', text))
    for row, f in zip(rows, checked):
        summary, folded = row.split("</summary>", 1)
        assert f"badge-{f['verdict'].replace(' ', '-')}" in summary
        assert escape(f["summary"]) in summary and escape(f["title"]) in summary
        assert escape(f["rule"]) in folded.split("</details>")[0]
        assert escape(f["rule"]) not in summary
        links = re.findall(r'href="#([^"]+)"', summary)
        assert set(links) <= ids, (links, ids)
        assert links or f["verdict"] == "not measured", summary
    assert 'href="#fig-figures-deep_middle_gap"' in rows[1].split("</summary>")[0]
    # the per-arm tables' extra columns fold away
    view = text.split('<h2>Arms at equal budget</h2>')[1].split("<details")[0]
    assert "<th>test accuracy %</th>" in view and "<th>s / epoch</th>" not in view


def test_each_summary_gives_the_deciding_number_and_its_interval():
    f2 = rf.middle_layers_most_similar({"deep": {str(s): _layers(MIDDLE, jitter=0.01 * s)
                                                 for s in range(3)}})
    lo, hi = f2.interval
    assert f"[{lo:.3g}, {hi:.3g}]" in f2.summary and "above 0" in f2.summary
    assert f2.to_dict()["summary"] == f2.summary and f2.title
    runs = [_run(s, [10.0, 12.0, 10.0 * r], [50.0, 55.0, 50.0 * r], 0.8)
            for s, r in enumerate([0.5, 0.4, 0.6, 0.45, 0.55])]
    f3 = rf.curvature_falls(runs)
    assert f"[{f3.interval[0]:.3g}, {f3.interval[1]:.3g}]" in f3.summary
    assert f"x{math.exp(np.mean(np.log([0.5, 0.4, 0.6, 0.45, 0.55]))):.2f}" in f3.summary
    assert "fell in 5/5 seeds" in f3.summary
    sgd = _arm([0.90, 0.91, 0.89, 0.92], [12.0, 13.0, 11.5, 12.5])
    htr = _arm([0.93, 0.935, 0.925, 0.945], [8.0, 9.0, 8.5, 8.8])
    f5 = rf.htr_helps({"SGD": sgd, "HTR all layers": htr})
    lo, hi = f5.interval
    diff = 100 * np.mean(np.subtract([0.93, 0.935, 0.925, 0.945], [0.90, 0.91, 0.89, 0.92]))
    assert f"test accuracy {diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}]" in f5.summary
    assert "1/1 HTR arms more accurate" in f5.summary
    trained = {"0": _state([9, 10, 11]), "1": _state([10, 12, 10])}
    f1 = rf.layer_spectra_like_full(None, trained, {"0": _state([100, 110, 95])}, C)
    assert f"[{f1.interval[0]:.3g}, {f1.interval[1]:.3g}]" in f1.summary
    assert "the rule separates them" in f1.summary
    no_bulk = rf.layer_spectra_like_full(None, {"0": _state([150, 160, 150])}, None, C)
    assert no_bulk.summary.startswith("No bulk near zero")
    bare = rf.Finding("claim", "held", "rule", "numbers", interval=(0.1, 0.3), setting="D")
    assert bare.sentence() == "D: 95 % interval [0.1, 0.3]."
