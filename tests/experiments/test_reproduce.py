"""``hesslens reproduce`` end to end on a tiny plan: tuning, training, study, report, resume."""

import dataclasses
import json
from html import escape

import pytest

from hesslens.cli import main
from hesslens.errors import HesslensInputError
from hesslens.experiments.reproduce import reproduce
from hesslens.experiments.reproduce_plan import Arm, Plan, full_plan, quick_plan


def _tiny_plan(**changes) -> Plan:
    arms = (
        Arm("SGD"),
        Arm("SGD+L2", knob="weight_decay", grid=(1e-4, 1e-3), default=1e-4),
        Arm("HTR all layers", fixed={"htr_every": 2, "htr_layers": "all"}, knob="htr_gamma",
            grid=(1e-3,), default=1e-3),
    )
    plan = Plan(name="tiny", model="mlp", data="mnist1d", epochs=2, batch_size=256, lr=0.1,
                seeds=(0, 1), arms=arms, tune=True, tune_seed=100, n_tune_seeds=2,
                track_every=1, study_k=2, study_density_probes=1, study_density_steps=20,
                workers=1, final_val_fraction=0.0)
    return dataclasses.replace(plan, **changes)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    result = reproduce(_tiny_plan(), out, progress=False)
    return out, result


def test_writes_results_report_and_figures(study):
    out, result = study
    assert "paper's findings" in result["summary_text"]
    for name in ("results.json", "report.html", "plan.json", "compare/compare.json",
                 "compare/compare.csv", "study/sgd/results.json", "study/sgd/report.html"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["arms"]) == {"SGD", "SGD+L2", "HTR all layers"}
    assert all(arm["seeds"] == [0, 1] for arm in saved["arms"].values())
    assert len(saved["findings"]) == 5
    assert all(f["verdict"] in {"held", "partly", "did not hold", "not shown", "not measured"}
               for f in saved["findings"])
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 3
    assert "Findings of the paper" in html
    assert all(escape(f["claim"]) in html for f in saved["findings"])


def test_tunes_on_the_mean_over_tuning_seeds_never_on_test(study):
    out, result = study
    l2 = result["tuning"]["SGD+L2"]
    assert l2["tune_seeds"] == [100, 101]
    for g in l2["grid"]:  # every value on each tuning seed (their own seeds), on validation
        per_seed = []
        for seed in (100, 101):
            run = out / "tune" / "sgd-l2" / f"weight_decay={g['value']:g}" / f"seed{seed}"
            assert json.loads((run / "config.json").read_text())["seed"] == seed
            epochs = json.loads((run / "metrics.json").read_text())["epochs"]
            per_seed.append((epochs[-1]["val_acc"] + epochs[-2]["val_acc"]) / 2)
        assert g["val_acc_seeds"] == pytest.approx(per_seed)
        assert g["val_acc"] == pytest.approx(sum(per_seed) / 2)
        assert g["val_acc_min"] <= g["val_acc"] <= g["val_acc_max"]
    scores = {g["value"]: g["val_acc"] for g in l2["grid"]}
    assert l2["value"] == max(scores, key=scores.get)
    assert l2["margin"] == pytest.approx(abs(scores[1e-4] - scores[1e-3]))
    sgd = result["tuning"]["SGD"]  # the knob-less arm on the same seeds: the level to beat
    assert len(sgd["val_acc_seeds"]) == 2 and sgd["value"] is None


def test_final_runs_train_on_the_whole_training_set(study):
    out, _ = study
    cfg = json.loads((out / "runs" / "sgd" / "seed0" / "config.json").read_text())
    assert cfg["val_fraction"] == 0.0 and cfg["seed"] == 0


def test_costs_come_from_the_separate_stage(study):
    out, result = study
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["arms"]) == {"SGD", "SGD+L2", "HTR all layers"}
    assert cost["threads"] == 1 and cost["rounds"] >= 3
    for name, arm in cost["arms"].items():
        ratios = [a / b for a, b in zip(arm["round_seconds"], cost["arms"]["SGD"]["round_seconds"])]
        assert arm["vs_sgd"] == pytest.approx(sorted(ratios)[len(ratios) // 2])
        assert result["arms"][name]["cost_vs_sgd"] == arm["vs_sgd"]
    assert cost["arms"]["SGD"]["vs_sgd"] == 1.0
    # HTR's double backward on every 2nd step costs more than a plain step
    assert cost["arms"]["HTR all layers"]["vs_sgd"] > 1.2
    assert any(n.startswith("cost vs SGD") for n in result["notes"])


def test_curvature_is_tracked_every_epoch(study):
    out, _ = study
    metrics = json.loads((out / "runs" / "sgd" / "seed0" / "metrics.json").read_text())
    for epoch in metrics["epochs"]:
        assert epoch["trace"] > 0 and epoch["top_eigenvalue"] > 0
        assert set(epoch["layer_trace"]) == set(epoch["layer_top_eigenvalue"])


def test_second_call_resumes_without_training_again(study):
    out, first = study
    before = (out / "runs" / "sgd" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = reproduce(_tiny_plan(), out, progress=False)
    assert (out / "runs" / "sgd" / "seed0" / "metrics.json").stat().st_mtime_ns == before
    assert again["arms"]["SGD"]["final"] == first["arms"]["SGD"]["final"]


def test_a_different_plan_in_the_same_folder_is_refused(study):
    out, _ = study
    with pytest.raises(HesslensInputError, match="different study"):
        reproduce(_tiny_plan(epochs=3), out, progress=False)


def test_quick_plan_is_an_equal_budget_comparison():
    plan = quick_plan()
    names = [a.name for a in plan.arms]
    assert names == ["SGD", "SGD+L2", "SAM", "HTR all layers", "HTR middle layers",
                     "HTR GN middle layers", "HTR Fisher middle layers"]
    assert len(plan.seeds) >= 2
    assert plan.model == full_plan().model == "cnn1d3"


def test_cli_help_and_bad_out(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reproduce", "--quick", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]


def _arm(acc, acc_sd, tr, tr_sd):
    return {"final": {"test_acc": {"mean": acc, "std": acc_sd},
                      "trace": {"mean": tr, "std": tr_sd}}}


@pytest.mark.parametrize("htr_all, htr_mid, verdict", [
    # an earlier README run (2026-11-27): every difference inside the seed noise
    ((0.9158, 0.0114, 11.4, 2.3), (0.9158, 0.0031, 11.9, 0.8), "not shown"),
    ((0.95, 0.002, 6.0, 0.5), (0.95, 0.002, 6.5, 0.5), "held"),
    ((0.95, 0.002, 6.0, 0.5), (0.9158, 0.003, 11.9, 0.8), "partly"),
    ((0.85, 0.002, 20.0, 0.5), (0.86, 0.002, 19.0, 0.5), "did not hold"),
])
def test_htr_verdict_counts_only_differences_beyond_seed_noise(htr_all, htr_mid, verdict):
    from hesslens.experiments.reproduce_findings import htr_helps

    arms = {"SGD": _arm(0.9150, 0.0045, 12.1, 3.4), "SGD+L2": _arm(0.9156, 0.0052, 12.0, 3.0),
            "HTR all layers": _arm(*htr_all), "HTR middle layers": _arm(*htr_mid)}
    assert htr_helps(arms).verdict == verdict


def test_results_record_the_data_fingerprint_and_versions(study):
    import torch

    from hesslens.provenance import dataset_fingerprint
    from hesslens.zoo import load_dataset

    out, _ = study
    saved = json.loads((out / "results.json").read_text())
    expected = dataset_fingerprint(load_dataset("mnist1d"), "mnist1d")
    assert saved["data"] == expected
    assert expected["sizes"]["x_train"] == [4000, 1, 40] and expected["sizes"]["y_test"] == [1000]
    (used,) = saved["training_data"]  # every final run trained on these very arrays
    assert used["sha256"] == expected["sha256"] and len(used["runs"]) == 3 * 2
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["versions"]["device"] == "cpu"
    layer_study = json.loads((out / "study" / "sgd" / "results.json").read_text())
    assert layer_study["data"]["sha256"] == expected["sha256"]
    assert layer_study["data"]["analysis_subset"]["sizes"]["y"] == [100]
    run = json.loads((out / "runs" / "sgd" / "seed0" / "metrics.json").read_text())
    assert run["data"] == expected and run["versions"]["numpy"] == saved["versions"]["numpy"]
