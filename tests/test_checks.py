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


# ---------------------------------------------------------------------- counts and numbers
@pytest.mark.parametrize(("check", "good", "bad", "words"), [
    ("check_positive_int", [1, np.int64(3)], [0, -2, 1.0, True, "2", None],
     "must be a positive integer"),
    ("check_nonnegative_int", [0, np.uint8(4)], [-1, 0.0, False, None],
     "must be a nonnegative integer"),
    ("check_optional_positive_int", [None, 2], [0, 2.0, True],
     "must be a positive integer or None"),
    ("check_positive_number", [1e-9, 3, np.float32(0.5)],
     [0, -1.0, float("nan"), float("inf"), True, "1"], "must be a positive number"),
    ("check_nonnegative_number", [0, 2.5], [-1e-9, float("nan"), float("inf"), False],
     "must be a non-negative number"),
])
def test_count_and_number_checks_accept_what_they_name_and_refuse_the_rest(check, good, bad,
                                                                           words):
    import hesslens.checks as checks

    fn = getattr(checks, check)
    for value in good:
        out = fn(value, "x")
        assert out == value and (out is None or type(out) in (int, float))
    for value in bad:
        with pytest.raises(HesslensInputError, match=f"x {words}, got"):
            fn(value, "x")


def _bad_counts():
    """One call per place that takes a count, each given a count it must refuse by name."""
    from hesslens.analysis.epoch_sharpness import EpochSharpness
    from hesslens.analysis.probe_spectra import probe_spectra
    from hesslens.analysis.study import layer_study
    from hesslens.curvature import Hessian
    from hesslens.integrations._schedule import Schedule
    from hesslens.linalg import MatrixOperator, hutchinson, hutchpp, slq
    from hesslens.linalg.trace import BlockTraceEstimator

    A = MatrixOperator(torch.eye(4, dtype=torch.float64))
    data = (torch.zeros(4, 2), torch.arange(4) % 2)
    H = Hessian(nn.Linear(2, 2), nn.functional.cross_entropy, data)
    return [
        (lambda: hutchinson(A, n_hvp=0), "n_hvp"),
        (lambda: hutchpp(A, n_hvp=9, batch_size=1.5), "batch_size"),
        (lambda: BlockTraceEstimator(A, min_probes=True), "min_probes"),
        (lambda: BlockTraceEstimator(A, sketch_rank=-1), "sketch_rank"),
        (lambda: BlockTraceEstimator(A).run(max_hvp=0), "max_hvp"),
        (lambda: slq(A, n_probes=2, n_steps=0), "n_steps"),
        (lambda: slq(A, n_probes=2, n_steps=3, probe_chunk=0), "probe_chunk"),
        (lambda: H.eigenvalues(k=True), "k"),
        (lambda: layer_study(nn.Linear(2, 2), nn.functional.cross_entropy, data,
                             density_probes=0, progress=False), "density_probes"),
        (lambda: probe_spectra(H, n_probes=0), "n_probes"),
        (lambda: Schedule(every_n_steps=0, every_n_epochs=None), "every_n_steps"),
        (lambda: EpochSharpness(*data, every=2.0), "every"),
    ]


def test_every_count_is_checked_by_the_one_validator():
    for call, name in _bad_counts():
        with pytest.raises(HesslensInputError, match=f"^{name} must be a (positive|nonnegative) "
                                                     "integer"):
            call()


def test_the_argparse_types_are_adapters_of_the_checks():
    import argparse

    from hesslens.experiments.common import (
        nonnegative_float,
        nonnegative_int,
        positive_float,
        positive_int,
        seed_int,
    )

    assert (positive_int("3"), nonnegative_int("0"), seed_int(str(SEED_LIMIT - 1)),
            nonnegative_float("0"), positive_float("0.5")) == (3, 0, SEED_LIMIT - 1, 0.0, 0.5)
    for fn, text, words in [(positive_int, "0", "expected a positive integer, got '0'"),
                            (positive_int, "x", "expected a positive integer, got 'x'"),
                            (nonnegative_int, "-1", "expected a non-negative integer"),
                            (seed_int, str(SEED_LIMIT), "below 2**32"),
                            (seed_int, "-1", "expected a non-negative integer"),
                            (nonnegative_float, "x", "expected a number, got 'x'"),
                            (nonnegative_float, "nan", "expected a non-negative number"),
                            (positive_float, "inf", "expected a positive number")]:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            fn(text)
        assert words in str(err.value), (fn, text, str(err.value))
