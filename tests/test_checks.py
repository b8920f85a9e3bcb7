"""Seeds: every entry point that takes one refuses, by name, what some seeded library would not
take (numpy's and scikit-learn's 32 bits), before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hesslens.checks import SEED_LIMIT, check_seed
from hesslens.errors import HesslensInputError

BAD_SEEDS = [2**32, 2**64, 2**70, -1, 1.5, True, "3", None, np.float64(2.0)]


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, np.int64(7), np.uint32(2**32 - 1)])
def test_seeds_every_library_takes_pass(seed):
    assert check_seed(seed) == int(seed) and type(check_seed(seed)) is int
    np.random.RandomState(check_seed(seed))  # numpy's legacy generator takes it
    torch.Generator().manual_seed(check_seed(seed))


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_other_seeds_are_refused_naming_the_range(seed):
    with pytest.raises(HesslensInputError, match=r"seed must be an integer in \[0, 4294967295\]"):
        check_seed(seed)
    assert SEED_LIMIT == 2**32


def _zoo_dataset(seed):
    from hesslens import zoo

    return zoo.load_dataset("digits", seed=seed)


def _zoo_model(seed):
    from hesslens import zoo

    return zoo.build_model("mlp", (1, 8, 8), 10, seed=seed)


def _task(seed):
    from hesslens.zoo.tasks import load_task

    return load_task("modadd", seed=seed)


def _config(seed):
    from hesslens.training import TrainConfig

    return TrainConfig(seed=seed).validate()


def _penalty(seed):
    from hesslens.training.penalty import HessianTracePenalty

    return HessianTracePenalty(nn.Linear(2, 2), seed=seed)


def _tracker(seed):
    from hesslens.report.tracking import CurvatureTracker

    return CurvatureTracker(nn.Linear(2, 2), nn.functional.cross_entropy,
                            (torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)), seed=seed)


def _split(seed):
    from hesslens.splits import split_train_val

    return split_train_val(torch.zeros(20, 2), torch.arange(20) % 2, seed=seed)


def _subset(seed):
    from hesslens.splits import analysis_subset

    return analysis_subset(torch.zeros(20, 2), torch.arange(20) % 2, per_class=2, seed=seed)


@pytest.mark.parametrize("entry", [_zoo_dataset, _zoo_model, _task, _config, _penalty,
                                   _tracker, _split, _subset])
@pytest.mark.parametrize("seed", [2**32, 2**64, -3])
def test_library_entry_points_refuse_a_seed_out_of_range(entry, seed):
    with pytest.raises(HesslensInputError, match=r"seed must be an integer in \[0, 4294967295\]"):
        entry(seed)
    entry(2**32 - 1)  # the largest seed works everywhere


def test_the_penalty_draws_its_own_seed_in_range():
    from hesslens.training.penalty import HessianTracePenalty

    torch.manual_seed(0)
    seeds = {HessianTracePenalty(nn.Linear(2, 2)).seed for _ in range(20)}
    assert all(0 <= s < SEED_LIMIT for s in seeds) and len(seeds) == 20


def test_a_seed_out_of_range_fails_the_trainer_before_its_folder_exists(tmp_path):
    from hesslens.training import TensorData, TrainConfig, train

    data = TensorData(torch.zeros(8, 2), torch.arange(8) % 2, torch.zeros(4, 2),
                      torch.arange(4) % 2, num_classes=2)
    with pytest.raises(HesslensInputError, match="seed must be"):
        train(TrainConfig(seed=2**32, epochs=1), tmp_path / "run", model=nn.Linear(2, 2),
              dataset=data, progress=False)
    assert not (tmp_path / "run").exists()
