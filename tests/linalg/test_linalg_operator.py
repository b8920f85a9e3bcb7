import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

from hesslens.errors import HesslensInputError
from hesslens.linalg import (
    DISTRIBUTIONS,
    CountingOperator,
    DeflatedOperator,
    EigenResult,
    MatrixOperator,
    SymmetricOperator,
    TraceResult,
    as_operator,
    random_probes,
)


def sym(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (B + B.T) / 2


def test_matrix_operator_products_and_count():
    A = sym(7)
    op = MatrixOperator(A)
    assert isinstance(op, SymmetricOperator)
    V = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), (A @ V.T).T)
    op.matmat(V[:1])
    assert op.n_products == 4
    assert (op.dim, op.dtype, op.device) == (7, torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 2), (5,)])
def test_matrix_operator_rejects_non_square(shape):
    with pytest.raises(ValueError, match="square"):
        MatrixOperator(torch.zeros(shape))


def test_matmat_rejects_bad_batch():
    op = MatrixOperator(torch.eye(3))
    with pytest.raises(HesslensInputError, match=r"\(k, 3\)"):
        op.matmat(torch.ones(3))
    with pytest.raises(ValueError):
        CountingOperator(op).matmat(torch.ones(2, 4))


def test_counting_operator():
    A = sym(5)
    op = CountingOperator(MatrixOperator(A))
    V = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), V @ A)
    op.matmat(V)
    assert (op.n_products, op.n_calls) == (8, 2)


def test_deflated_operator_matches_dense_projection():
    A = sym(9, 1)
    U = torch.linalg.qr(torch.randn(9, 3, dtype=torch.float64))[0].T  # (3, 9) orthonormal
    P = torch.eye(9, dtype=torch.float64) - U.T @ U
    op = DeflatedOperator(MatrixOperator(A), U)
    V = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), (P @ A @ P @ V.T).T)
    with pytest.raises(ValueError):
        DeflatedOperator(MatrixOperator(A), torch.zeros(2, 8))


def test_as_operator_variants():
    A = sym(4)
    op = MatrixOperator(A)
    assert as_operator(op) is op
    assert isinstance(as_operator(A), MatrixOperator)
    assert as_operator(A.numpy()).dim == 4
    lin = as_operator(aslinearoperator(A.numpy()))
    V = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(lin.matmat(V), V @ A)
    with pytest.raises(TypeError):
        as_operator("not an operator")


def test_random_probes_distributions():
    g = torch.Generator().manual_seed(3)
    R = random_probes(500, 40, "rademacher", g, torch.float64)
    assert R.shape == (500, 40)
    assert set(R.unique().tolist()) == {-1.0, 1.0}
    G = random_probes(4000, 5, "gaussian", torch.Generator().manual_seed(0), torch.float64)
    cov = G.T @ G / G.shape[0]
    torch.testing.assert_close(cov, torch.eye(5, dtype=torch.float64), atol=0.1, rtol=0)


def test_random_probes_reproducible_across_dtypes():
    a = random_probes(3, 8, "gaussian", torch.Generator().manual_seed(5), torch.float64)
    b = random_probes(3, 8, "gaussian", torch.Generator().manual_seed(5), torch.float32)
    assert b.dtype == torch.float32
    assert torch.equal(a.float(), b)
    c = random_probes(3, 8, "gaussian", torch.Generator().manual_seed(6), torch.float64)
    assert not torch.equal(a, c)


def test_random_probes_unknown_distribution():
    with pytest.raises(ValueError) as err:
        random_probes(2, 3, "uniform", torch.Generator())
    for name in DISTRIBUTIONS:
        assert name in str(err.value)


def test_result_reprs_are_short():
    r = EigenResult(
        values=torch.arange(20.0, 0, -1, dtype=torch.float64),
        vectors=None,
        residuals=torch.zeros(20, dtype=torch.float64),
        converged=torch.ones(20, dtype=torch.bool),
        n_hvp=40,
        n_steps=40,
        which="LA",
    )
    text = repr(r)
    assert len(text) < 200 and "20/20" in text and "..." in text
    assert r.k == 20 and r.all_converged
    assert r.to_dict()["values"][0] == 20.0
    t = TraceResult(value=1.5, stderr=0.1, n_hvp=10, method="hutchinson", n_samples=10)
    assert "1.5" in repr(t) and t.to_dict()["n_hvp"] == 10
    assert np.isfinite(t.value)


class _IntoOperator(MatrixOperator):
    """A matrix that can write its products into a given tensor, and counts when it does."""

    into_calls = 0

    def matmat_into(self, V, out):
        self.into_calls += 1
        self.n_products += V.shape[0]
        return torch.matmul(V, self.matrix, out=out)


def test_lanczos_products_go_straight_into_its_basis():
    from hesslens.linalg import eigsh

    A = sym(30, seed=3)
    op = _IntoOperator(A)
    got = eigsh(op, k=2, ncv=6, tol=1e-10)
    ref = torch.linalg.eigvalsh(A).flip(0)[:2]
    torch.testing.assert_close(got.values, ref, rtol=1e-8, atol=1e-10)
    assert op.into_calls == got.n_hvp > 0


def test_matmat_as_copies_into_out_for_an_operator_without_matmat_into():
    from hesslens.linalg.operator import matmat_as

    A = sym(5, seed=4)
    V = torch.randn(2, 5, dtype=torch.float64)
    out = torch.empty(2, 5, dtype=torch.float32)
    assert matmat_as(MatrixOperator(A), V, torch.float32, out=out) is out
    torch.testing.assert_close(out, (V @ A).float())
