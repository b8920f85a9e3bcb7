"""BlockTraceEstimator: a trace estimate as an object that goes on with more probes, giving
what one run with the later arguments gives, for only the products not spent yet."""

import warnings

import numpy as np
import pytest
import torch

from hesslens.errors import BudgetWarning, HesslensInputError
from hesslens.linalg import BlockTraceEstimator, CountingOperator, MatrixOperator, block_traces

SLICES = {"a": slice(0, 50), "b": slice(50, 250), "c": slice(250, 280), "d": slice(280, 600)}


@pytest.fixture(scope="module")
def layered():
    """An NN-like matrix whose diagonal blocks differ in scale (as test_linalg_trace's)."""
    g = np.random.default_rng(11)
    n = 600
    ev = np.concatenate(
        [[80.0, 40, 25, 12, 8, 5, 3, 2], -g.uniform(0.1, 1.0, 6), g.exponential(0.05, n - 14)])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    d = np.ones(n)
    for sl, scale in zip(SLICES.values(), (3.0, 1.0, 0.3, 0.1)):
        d[sl] = scale
    A = d[:, None] * ((Q * ev) @ Q.T) * d[None, :]
    return torch.tensor((A + A.T) / 2)


def _same(r1, r2):
    assert (r1[0].value, r1[0].stderr, r1[0].n_hvp) == (r2[0].value, r2[0].stderr, r2[0].n_hvp)
    for name, r in r2[1].items():
        assert (r1[1][name].value, r1[1][name].stderr) == (r.value, r.stderr), name


def test_a_stricter_rule_goes_on_from_where_the_full_trace_stopped(layered):
    op = CountingOperator(MatrixOperator(layered))
    est = BlockTraceEstimator(op, SLICES, seed=5)
    full_only, parts = est.run(rtol=0.005, max_hvp=2000, block_floor=None)
    assert all(r.converged is None for r in parts.values())  # no block rule asked for
    first = op.n_products
    both = est.run(rtol=0.005, max_hvp=2000)
    fresh = block_traces(MatrixOperator(layered), SLICES, rtol=0.005, max_hvp=2000, seed=5)
    assert full_only.n_hvp == first < fresh[0].n_hvp  # the blocks needed more probes
    _same(both, fresh)
    assert op.n_products == est.n_products == fresh[0].n_hvp  # nothing multiplied twice
    assert all(r.converged for r in both[1].values())


def test_a_larger_budget_goes_on_after_a_budget_stop(layered):
    op = CountingOperator(MatrixOperator(layered))
    est = BlockTraceEstimator(op, SLICES, seed=1)
    with pytest.warns(BudgetWarning, match="max_hvp=96"):
        short = est.run(rtol=1e-3, max_hvp=96)  # 32 sketch products + 4 full batches
    assert short[0].n_hvp == 96 and not short[0].converged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetWarning)
        longer = est.run(rtol=1e-3, max_hvp=400)
        fresh = block_traces(MatrixOperator(layered), SLICES, rtol=1e-3, max_hvp=400, seed=1)
    _same(longer, fresh)
    assert op.n_products == 400


def test_asking_again_costs_nothing_and_a_looser_rule_keeps_the_better_estimate(layered):
    op = CountingOperator(MatrixOperator(layered))
    est = BlockTraceEstimator(op, SLICES, seed=2)
    strict = est.run(rtol=0.01)
    spent = op.n_products
    _same(est.run(rtol=0.01), strict)
    _same(est.run(rtol=0.05, block_floor=None), strict)  # as good as asked, and better
    assert op.n_products == spent


def test_an_exact_result_is_kept(layered):
    A = layered[:60, :60]
    op = CountingOperator(MatrixOperator(A))
    est = BlockTraceEstimator(op, {"a": slice(0, 20)})
    full, parts = est.run()
    assert parts["a"].value == pytest.approx(float(A.diagonal()[:20].sum()))
    assert full.method == "exact" and full.value == pytest.approx(float(torch.trace(A)))
    assert est.run(rtol=1e-4)[0].value == full.value and op.n_products == 60 == est.n_hvp


def test_a_large_sketch_is_dropped_between_runs_and_drawn_again(layered, monkeypatch):
    import hesslens.linalg.trace as trace_module

    op = CountingOperator(MatrixOperator(layered))
    est = BlockTraceEstimator(op, SLICES, seed=5)
    monkeypatch.setattr(trace_module, "WORK_BYTES", 1)  # nothing is small enough to keep
    est.run(rtol=0.005, max_hvp=2000, block_floor=None)
    assert est.kept_basis is None
    both = est.run(rtol=0.005, max_hvp=2000)
    monkeypatch.undo()
    fresh = block_traces(MatrixOperator(layered), SLICES, rtol=0.005, max_hvp=2000, seed=5)
    _same(both, fresh)  # the same sketch again: the same numbers
    assert est.n_products == op.n_products == est.n_hvp + 16  # the sketch drawn twice


@pytest.mark.parametrize("kwargs, match", [
    (dict(rtol=-1.0), "rtol must be nonnegative"),
    (dict(max_hvp=10), "max_hvp=10 is below 2 \\* sketch_rank"),
    (dict(max_hvp=0), "max_hvp must be a positive integer"),
])
def test_bad_run_arguments_are_named(layered, kwargs, match):
    with pytest.raises(HesslensInputError, match=match):
        BlockTraceEstimator(layered, SLICES).run(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=2**40), "seed must be an integer"),
    (dict(min_probes=1), "min_probes must be at least 2"),
    (dict(sketch_rank=-1), "sketch_rank must be a nonnegative integer"),
    (dict(distribution="cauchy"), "unknown probe distribution"),
])
def test_bad_estimator_arguments_are_named(layered, kwargs, match):
    with pytest.raises(HesslensInputError, match=match):
        BlockTraceEstimator(layered, SLICES, **kwargs)
