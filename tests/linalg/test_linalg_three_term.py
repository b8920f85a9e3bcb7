"""The three-term Lanczos recurrence (eigsh(k=1, ncv=0)) against dense float64 spectra and the
full-basis Lanczos it must equal."""

import warnings

import numpy as np
import pytest
import torch

from hesslens.errors import BudgetWarning, HesslensInputError
from hesslens.linalg import MatrixOperator, eigsh
from hesslens.linalg.three_term import DeferredVectorsResult


def symmetric(n=300, seed=0, top=(10.0, 9.0, 8.5), low=-3.0, high=5.0):
    g = np.random.default_rng(seed)
    ev = np.concatenate([top, g.uniform(low, high, n - len(top))])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    return torch.tensor((Q * ev) @ Q.T)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_equals_the_full_basis_run_and_the_dense_spectrum(which):
    A = symmetric(low=-9.5, high=5.0)  # SA and LM: the bottom end -9.5.. is the target
    exact = torch.linalg.eigvalsh(A)
    target = {"LA": exact[-1], "SA": exact[0],
              "LM": exact[torch.argmax(exact.abs())]}[which]
    full = eigsh(MatrixOperator(A), k=1, which=which, max_steps=300)
    three = eigsh(MatrixOperator(A), k=1, which=which, ncv=0, max_steps=300)
    assert isinstance(three, DeferredVectorsResult)
    # the same Krylov space: the same products, give or take one where float64 rounding
    # parts the two after many steps
    assert bool(three.converged[0]) and abs(three.n_hvp - full.n_hvp) <= 1
    assert abs(float(three.values[0]) - float(full.values[0])) <= float(
        three.bounds[0] + full.bounds[0])
    assert abs(float(three.values[0]) - float(target)) <= float(three.bounds[0]) + 1e-12
    assert abs(float(three.values[0]) - float(target)) <= 1e-6 * abs(float(target))
    m = three.n_hvp
    v = three.vectors[0]  # the second pass: m - 1 more products
    assert three.n_hvp == 2 * m - 1
    assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(v @ full.vectors[0])) == pytest.approx(1.0, abs=1e-7)
    assert float((A @ v - three.values[0] * v).norm()) == pytest.approx(
        float(three.residuals[0]), rel=1e-3, abs=1e-12)


def test_float32_products_converge_to_the_float64_value():
    A = symmetric(seed=1)
    exact = float(torch.linalg.eigvalsh(A)[-1])
    res = eigsh(MatrixOperator(A.float()), k=1, ncv=0)
    assert bool(res.converged[0])
    assert abs(float(res.values[0]) - exact) <= 1e-5 * exact
    assert res.vectors.dtype == torch.float32


def test_an_invariant_krylov_space_stops_with_the_exact_value():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0] * 20, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = eigsh(A, k=1, ncv=0)
    assert res.n_hvp <= 4 and float(res.values[0]) == pytest.approx(3.0, abs=1e-12)
    assert float(res.bounds[0]) == 0.0 and bool(res.converged[0])
    v = res.vectors[0]
    assert float((A @ v - 3.0 * v).norm()) < 1e-10


def test_budget_stop_warns_and_says_not_converged():
    A = symmetric(seed=2, top=(10.0, 9.999))
    with pytest.warns(BudgetWarning, match="max_steps=5"):
        res = eigsh(A, k=1, ncv=0, max_steps=5)
    assert not bool(res.converged[0]) and res.n_hvp == 5


def test_warm_start_callback_and_values_only():
    A = symmetric(seed=3)
    cold = eigsh(A, k=1, ncv=0)
    m = cold.n_hvp
    seen = []
    warm = eigsh(A + 1e-4 * torch.eye(A.shape[0], dtype=A.dtype), k=1, ncv=0,
                 v0=cold.vectors, callback=lambda step, theta, bound: seen.append(step))
    assert warm.n_hvp < m and seen == list(range(1, warm.n_hvp + 1))
    assert float(warm.values[0]) == pytest.approx(float(cold.values[0]) + 1e-4, rel=1e-7)
    bare = eigsh(A, k=1, ncv=0, return_vectors=False)
    assert bare.vectors is None and bare.n_hvp == m


def test_the_vector_is_formed_only_when_read_and_refused_after_the_operator_changed():
    class Versioned(MatrixOperator):
        version = 0

    op = Versioned(symmetric(seed=4))
    res = eigsh(op, k=1, ncv=0)
    m = res.n_hvp
    assert "vectors" not in repr(res) and res.to_dict()["n_hvp"] == m  # nothing computed
    op.version = 1
    with pytest.raises(HesslensInputError, match="operator changed"):
        _ = res.vectors
    assert res.n_hvp == m


def test_ncv_zero_is_for_one_eigenvalue():
    with pytest.raises(HesslensInputError, match="ncv=0"):
        eigsh(symmetric(n=50), k=2, ncv=0)
