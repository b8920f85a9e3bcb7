"""Estimates that know the precision of their products: bfloat16 and float16 products never give
a value marked converged that is further from the float64 answer than its tolerance."""

import warnings

import numpy as np
import pytest
import torch

from hesslens.errors import BudgetWarning, HesslensInputError, PrecisionWarning
from hesslens.linalg import (
    CountingOperator,
    DeflatedOperator,
    MatrixOperator,
    block_traces,
    eigsh,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
)
from hesslens.linalg.operator import product_eps
from hesslens.linalg.precision import Precision

HALF = [torch.bfloat16, torch.float16]


class RoundedOperator:
    """A dense float64 matrix whose products are computed in ``precision`` (vector, matrix and
    result rounded to it) while the algorithms see ``dtype`` vectors: a half-precision network
    multiplied with float32 vectors. ``declare=False`` hides the product precision."""

    def __init__(self, matrix, precision, dtype=torch.float32, declare=True):
        self.matrix = matrix.to(precision)
        self.precision = precision
        self.dim, self.dtype, self.device = matrix.shape[0], dtype, matrix.device
        if declare:
            self.product_eps = torch.finfo(precision).eps
        self.n_products = 0

    def matmat(self, V):
        self.n_products += V.shape[0]
        return (V.to(self.precision) @ self.matrix).to(self.dtype)


def _operators(A, precision):
    """The same half-precision products seen two ways: as a half-dtype operator, and as float32
    vectors with a declared product precision."""
    return {"half-dtype": MatrixOperator(A.to(precision)),
            "declared": RoundedOperator(A, precision)}


def _reference(A):
    return np.sort(np.linalg.eigvalsh(A.double().numpy()))[::-1]


def _relative_errors(result, ref, which="LA"):
    order = {"LA": ref, "SA": ref[::-1]}[which]
    want = np.sort(order[: len(result)])[::-1]
    return np.abs(result.values.numpy() - want) / np.abs(want)


def _converged_within_tol(result, ref, tol, which="LA"):
    err = _relative_errors(result, ref, which)
    conv = result.converged.numpy()
    assert np.all(err[conv] <= tol), (err, conv, tol)
    return err


def test_product_eps_is_declared_or_the_dtype_s():
    A = torch.eye(4)
    assert product_eps(MatrixOperator(A)) == torch.finfo(torch.float32).eps
    assert product_eps(MatrixOperator(A.to(torch.bfloat16))) == torch.finfo(torch.bfloat16).eps
    op = RoundedOperator(A.double(), torch.float16)
    assert product_eps(op) == torch.finfo(torch.float16).eps
    # wrappers carry the precision of what they wrap
    assert product_eps(CountingOperator(op)) == torch.finfo(torch.float16).eps
    assert product_eps(DeflatedOperator(op, torch.eye(4)[:1])) == torch.finfo(torch.float16).eps
    assert Precision.of(op).name == "float16" and not Precision.of(op).fine
    assert Precision.of(MatrixOperator(A.double())).fine


@pytest.mark.parametrize("bad", [0.0, -1e-3, 1.0, float("nan")])
def test_a_declared_precision_outside_0_1_is_refused(bad):
    op = RoundedOperator(torch.eye(3, dtype=torch.float64), torch.bfloat16)
    op.product_eps = bad
    with pytest.raises(HesslensInputError, match="product_eps must be a relative precision"):
        eigsh(op, k=1)


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("view", ["half-dtype", "declared"])
def test_eigsh_in_half_precision_never_reports_a_value_off_by_more_than_tol(
        make_nn_like, precision, view):
    A, _ = make_nn_like(300, seed=1)
    A = A.to(precision).double()  # the float64 copy of the half-precision matrix
    ref = _reference(A)
    eps, scale = torch.finfo(precision).eps, abs(ref).max()
    op = _operators(A, precision)[view]
    for seed in range(3):
        with pytest.warns(PrecisionWarning, match=rf"{str(precision)[6:]}.*dtype=torch.float32"):
            res = eigsh(op, k=3, seed=seed)  # tol=1e-6: out of reach in half precision
        assert not res.converged.any()
        # ... yet as accurate as the precision allows: within the noise it assumes
        err = _converged_within_tol(res, ref, 1e-6)
        assert np.all(err * np.abs(ref[:3]) <= 2 * eps * scale), err
    # a tolerance the precision can deliver for the top values converges them, truthfully
    tol = 0.05 if precision == torch.bfloat16 else 5e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        res = eigsh(op, k=6, tol=tol)
    assert res.converged[0]
    _converged_within_tol(res, ref, tol)


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_every_converged_value_is_within_tol_across_tolerances(make_nn_like, precision, which):
    A, _ = make_nn_like(200, seed=2)
    A = A.to(precision).double()
    ref = _reference(A)
    op = RoundedOperator(A, precision)
    for tol in (1e-1, 3e-2, 1e-2, 1e-3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            res = eigsh(op, k=4, which=which, tol=tol, ncv=12)
        _converged_within_tol(res, ref, tol, which)


def test_the_same_products_without_a_declared_precision_are_trusted_as_float32(make_nn_like):
    # what the declaration is for: float32 vectors hiding bfloat16 products stop on the
    # float32 floor and call bfloat16-accurate values converged to 1e-6
    A, _ = make_nn_like(300, seed=1)
    A = A.to(torch.bfloat16).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hidden = eigsh(RoundedOperator(A, torch.bfloat16, declare=False), k=3)
    assert hidden.converged.all()
    with pytest.warns(PrecisionWarning):
        declared = eigsh(RoundedOperator(A, torch.bfloat16), k=3)
    assert not declared.converged.any()


@pytest.mark.parametrize("precision", HALF)
def test_no_false_breakdown_in_half_precision(make_nn_like, precision):
    # a residual of 10 eps of bfloat16 is rounding noise, never a sign of invariance: the
    # process runs every step asked for
    A, _ = make_nn_like(300, seed=3)
    for op in _operators(A, precision).values():
        run = lanczos(op, 40)
        assert run.num_steps == 40 and not run.invariant
    # 3 distinct eigenvalues: in float32 the space is invariant after 3 steps; rounding the
    # vectors to half precision leaves a residual at its rounding level, which is no proof
    D = torch.diag(torch.tensor([4.0, 2.0, 2.0, 1.0] * 5, dtype=torch.float64))
    assert lanczos(RoundedOperator(D, torch.float32), 10).invariant
    run = lanczos(RoundedOperator(D, precision), 10)
    assert run.num_steps == 10 and not run.invariant
    # eigsh restarts on such a residual, as on an invariant space: the repeated top value is
    # found with its multiplicity (not 4, 2, 1), within its bounds, never called exact
    tol = 0.1 if precision == torch.bfloat16 else 1e-2
    res = eigsh(RoundedOperator(D, precision), k=3, tol=tol)
    np.testing.assert_allclose(res.values.numpy(), [4.0, 4.0, 4.0],
                               rtol=2 * torch.finfo(precision).eps)
    assert res.converged.all() and (res.bounds > 0).all()


@pytest.mark.parametrize("precision", HALF)
def test_slq_in_half_precision_runs_its_steps_and_matches_the_moments(make_nn_like, precision):
    A, _ = make_nn_like(200, seed=4)
    A = A.to(precision).double()
    ev = np.linalg.eigvalsh(A.numpy())
    for reorth in ("full", "none"):
        spec, n_hvp = slq(RoundedOperator(A, precision), n_probes=4, n_steps=25, reorth=reorth)
        assert n_hvp == 100  # no run stopped early on a false breakdown
        scale = abs(ev).max()
        assert abs(spec.nodes.max() - ev.max()) <= 2 * torch.finfo(precision).eps * scale
        assert abs(spec.moment(2) - np.mean(ev**2)) <= 0.2 * np.mean(ev**2)


@pytest.mark.parametrize("precision", HALF)
def test_traces_in_half_precision_carry_the_rounding_error(make_nn_like, precision):
    A, _ = make_nn_like(120, seed=5)
    A = A.to(precision).double()
    exact = float(torch.trace(A))
    op = RoundedOperator(A, precision)
    # the exact path: dim unit vectors, whose rounding is no longer "stderr 0"
    full, parts = block_traces(op, {"a": slice(0, 40)}, rtol=0.01, min_probes=100)
    assert full.method == "exact" and full.stderr > 0 and full.converged
    assert abs(full.value - exact) <= full.stderr
    assert abs(parts["a"].value - float(A.diagonal()[:40].sum())) <= parts["a"].stderr
    r = hutchinson(op, n_hvp=500)
    assert r.method == "exact" and r.stderr > 0 and abs(r.value - exact) <= r.stderr
    # estimates: the error stays within a few standard errors, which include the rounding
    for r in (hutchinson(op, n_hvp=60), hutchpp(op, n_hvp=60)):
        assert abs(r.value - exact) <= 4 * r.stderr
    # a tolerance below what the precision allows: not converged, and said so
    with pytest.warns(PrecisionWarning, match="rtol=0.00%"):
        full, parts = block_traces(op, {"a": slice(0, 40)}, rtol=1e-6, max_hvp=500)
    assert not full.converged and not parts["a"].converged
    assert abs(full.value - exact) <= 4 * full.stderr


def test_a_budget_stop_in_half_precision_is_still_a_budget_warning(make_nn_like):
    A, _ = make_nn_like(120, seed=5)
    op = RoundedOperator(A, torch.float16)
    with pytest.warns(BudgetWarning, match="max_steps=8"):
        res = eigsh(op, k=3, max_steps=8, which="SA", ncv=6)
    assert not res.converged.all()
