"""The plan of ``hesslens reproduce`` without training: one recipe for every arm, tuning seeds
apart from the final ones, the published MNIST-1D CNN, any zoo pair with bad names refused
before any work, the job split across ranks, and the cost stage's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hesslens.cli import main
from hesslens.errors import HesslensInputError
from hesslens.experiments.reproduce import _check_plan, _config
from hesslens.experiments.reproduce_cost import apply_costs, median_ratio
from hesslens.experiments.reproduce_jobs import share, weight
from hesslens.experiments.reproduce_plan import full_plan, quick_plan
from hesslens.training import TrainConfig
from hesslens.zoo import build_model


@pytest.mark.parametrize("make", [full_plan, quick_plan])
def test_every_arm_shares_one_recipe_and_differs_in_its_own_knob(make):
    plan = make()
    recipe = plan.base_config()
    for arm in plan.arms:
        assert not set(arm.fixed) & set(recipe)  # an arm cannot change the shared recipe
        for final in (False, True):
            cfg = TrainConfig.from_dict(_config(plan, arm, None, 0, "cpu", final=final))
            cfg.validate()
            for key in ("model", "data", "epochs", "batch_size", "lr", "momentum", "schedule",
                        "lr_gamma"):
                assert getattr(cfg, key) == recipe[key]
    knobs = {arm.knob for arm in plan.arms}
    assert knobs == {None, "weight_decay", "sam_rho", "htr_gamma"}


def test_full_plan_tunes_on_two_seeds_apart_from_the_final_ones_with_three_values_each():
    plan = full_plan()
    assert plan.tune and len(plan.tuning_seeds()) >= 2 and len(plan.seeds) >= 3
    assert not set(plan.tuning_seeds()) & set(plan.seeds)
    assert all(len(arm.grid) == 3 for arm in plan.arms if arm.knob)
    assert plan.val_fraction == 0.1 and plan.final_val_fraction == 0.0
    curvatures = {arm.fixed.get("htr_curvature", "hessian") for arm in plan.arms
                  if arm.knob == "htr_gamma"}
    assert curvatures == {"hessian", "gauss_newton", "fisher"}
    assert "cnn1d3 on mnist1d: SGD, momentum 0.9, lr 0.1, batch 100, 30 epochs" in plan.recipe()


def test_the_default_model_is_the_published_mnist1d_cnn():
    model = build_model(full_plan().model, (1, 40), 10, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
            for c in convs] == [(1, 25, 5, 2, 1), (25, 25, 3, 2, 1), (25, 25, 3, 2, 1)]
    assert (model.classifier.in_features, model.classifier.out_features) == (125, 10)
    assert sum(p.numel() for p in model.parameters()) == 5210
    assert model(torch.zeros(3, 1, 40)).shape == (3, 10)


@pytest.mark.parametrize("argv, match", [
    (["--model", "alexnet"], "unknown model 'alexnet'; choose one of: cnn1d, cnn1d3"),
    (["--data", "imagenet"], "unknown data set 'imagenet'; choose one of: mnist1d"),
    (["--model", "lenet"], "lenet: input_shape must be 3-D"),
    (["--model", "gpt-nano", "--data", "modadd"], "Hugging Face model"),
    (["--model", "mlp", "--data", "modadd"], "token task"),
    (["--model", "lenet", "--data", "cifar10"], "no root folder was given"),
])
def test_a_pair_it_cannot_train_exits_2_before_any_work(tmp_path, capsys, argv, match):
    out = tmp_path / "study"
    assert main(["reproduce", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not out.exists()


def test_plan_json_records_the_pair_and_another_pair_is_refused(tmp_path):
    plan = quick_plan().with_pair("mlp", "digits")
    _check_plan(tmp_path, plan)
    held = json.loads((tmp_path / "plan.json").read_text())
    assert (held["model"], held["data"]) == ("mlp", "digits")
    _check_plan(tmp_path, plan.with_pair())  # the same study again (resume): accepted
    import dataclasses

    _check_plan(tmp_path, dataclasses.replace(plan, workers=1, world_size=2))  # how, not what
    with pytest.raises(HesslensInputError, match="different study"):
        _check_plan(tmp_path, plan.with_pair("cnn1d3", "digits"))
    with pytest.raises(HesslensInputError, match="different study"):
        _check_plan(tmp_path, plan.with_pair(data="mnist1d"))


def test_ranks_share_every_job_once_longest_first_to_the_least_loaded():
    jobs = [({"epochs": 4, "sam_rho": 0.05}, "sam"), ({"epochs": 4}, "sgd0"),
            ({"epochs": 4}, "sgd1"), ({"epochs": 4, "htr_gamma": 1e-3, "htr_every": 1}, "htr"),
            ({"epochs": 4, "weight_decay": 1e-4}, "l2")]
    assert weight(jobs[3][0]) == 4 * 5 and weight(jobs[0][0]) == 8
    parts = [share(jobs, r, 2) for r in range(2)]
    names = [[d for _, d in p] for p in parts]
    assert sorted(names[0] + names[1]) == sorted(d for _, d in jobs)  # each once
    assert names == [["htr"], ["sam", "sgd0", "sgd1", "l2"]]  # 20 against 8 + 4 + 4 + 4
    assert share(jobs, 0, 1) == jobs
    assert [[d for _, d in share(jobs, r, 3)] for r in range(3)] == [
        ["htr"], ["sam", "l2"], ["sgd0", "sgd1"]]


def test_cost_is_the_median_of_per_round_ratios_and_replaces_the_shared_core_times():
    assert median_ratio([1.0, 2.0, 1.0], [2.0, 3.0, 5.0]) == 2.0
    comparison = {"arms": [{"runs": ["r/sgd/0", "r/sgd/1"], "seconds_per_epoch": 0.5,
                            "cost_vs_sgd": 1.0},
                           {"runs": ["r/sam/0"], "seconds_per_epoch": 1.6, "cost_vs_sgd": 3.2}]}
    cost = {"method": "alone", "arms": {"SGD": {"seconds_per_epoch": 0.2, "vs_sgd": 1.0},
                                        "SAM": {"seconds_per_epoch": 0.4, "vs_sgd": 1.9}}}
    apply_costs(comparison, {"SGD": ["r/sgd/0"], "SAM": ["r/sam/0"]}, cost)
    sgd, sam = comparison["arms"]
    assert (sam["cost_vs_sgd"], sam["seconds_per_epoch"]) == (1.9, 0.4)
    assert sam["seconds_per_epoch_in_study"] == 1.6 and sgd["seconds_per_epoch"] == 0.2
    assert comparison["notes"] == ["cost vs SGD: alone."]


def test_a_tuning_run_that_diverges_scores_zero_and_is_named(tmp_path):
    from hesslens.experiments.reproduce import _summary
    from hesslens.experiments.reproduce_jobs import diverged, finished, run_jobs

    base = {"model": "mlp", "data": "mnist1d", "epochs": 2, "batch_size": 500, "lr": 1e6,
            "momentum": 0.9, "schedule": "none", "val_fraction": 0.1, "seed": 100}
    bad, good = tmp_path / "bad", tmp_path / "good"
    with pytest.raises(HesslensInputError, match="diverged"):  # the final runs: an error
        run_jobs([(base, tmp_path / "final")], 1, False, "final")
    run_jobs([(base, bad), ({**base, "lr": 0.1}, good)], 1, False, "tune", allow_diverge=True)
    assert "training diverged at epoch 1" in diverged(bad) and diverged(good) is None
    assert finished(bad, 2) and finished(good, 2)  # a resumed study does not train it again
    summary = _summary([bad, good], [100, 101])
    assert summary["val_acc_seeds"][0] == 0.0 and summary["val_acc_seeds"][1] > 0.1  # chance
    assert summary["diverged_seeds"] == [100]
