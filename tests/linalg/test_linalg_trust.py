"""Numbers you can trust: non-finite products raise, budget stops warn (every estimator path)."""

import warnings

import numpy as np
import pytest
import torch

from hesslens.errors import BudgetWarning, NonFiniteCurvatureError
from hesslens.linalg import (
    MatrixOperator,
    block_traces,
    eigsh,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
)
from hesslens.linalg.operator import check_finite, matmat_as


class PoisonedOperator(MatrixOperator):
    """A dense matrix whose products turn non-finite from the ``after``-th call on."""

    def __init__(self, matrix, bad=float("nan"), after=0):
        super().__init__(matrix)
        self.bad, self.after, self.calls = bad, after, 0

    def matmat(self, V):
        out = super().matmat(V)
        self.calls += 1
        if self.calls > self.after:
            out = out.clone()
            out[0, -1] = self.bad
        return out


def spd(n=120, seed=0):
    g = np.random.default_rng(seed)
    ev = np.concatenate([[30.0, 12.0, 7.0], g.uniform(0.01, 1.0, n - 3)])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    return torch.tensor((Q * ev) @ Q.T)


ESTIMATORS = {
    "eigsh": lambda op: eigsh(op, k=3),
    "eigsh-restarted": lambda op: eigsh(op, k=3, ncv=8),
    "eigsh-three-term": lambda op: eigsh(op, k=1, ncv=0),
    "lanczos": lambda op: lanczos(op, 20),
    "hutchinson": lambda op: hutchinson(op, n_hvp=40),
    "hutchpp": lambda op: hutchpp(op, n_hvp=60),
    "block_traces": lambda op: block_traces(op, {"a": slice(0, 60)}, max_hvp=200),
    "block_traces-exact": lambda op: block_traces(op, max_hvp=200, min_probes=100),
    "slq-full": lambda op: slq(op, n_probes=3, n_steps=20, reorth="full"),
    "slq-none": lambda op: slq(op, n_probes=3, n_steps=20, reorth="none"),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("after", [0, 2])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_non_finite_products_raise_on_every_path(name, after, bad):
    op = PoisonedOperator(spd(), bad=bad, after=after)
    with pytest.raises(NonFiniteCurvatureError, match="curvature product is not finite"):
        ESTIMATORS[name](op)


def test_non_finite_error_names_the_cause_and_is_not_a_value_error():
    with pytest.raises(NonFiniteCurvatureError) as info:
        check_finite(torch.tensor([[1.0, float("nan"), float("inf")]]))
    msg = str(info.value)
    assert "1 NaN and 1 infinite entries of 3" in msg
    assert "the loss is finite but its second derivative is not" in msg
    assert not isinstance(info.value, ValueError)  # not mistaken for bad input
    ok = torch.ones(2, 3)
    assert check_finite(ok) is ok


def test_matmat_as_checks_shape_and_casts():
    op = MatrixOperator(torch.eye(3, dtype=torch.float32))
    out = matmat_as(op, torch.ones(2, 3, dtype=torch.float64), torch.float64)
    assert out.dtype == torch.float64 and out.shape == (2, 3)

    class Wrong(MatrixOperator):
        def matmat(self, V):
            return super().matmat(V)[:, :2]

    with pytest.raises(ValueError, match="shape"):
        matmat_as(Wrong(torch.eye(3)), torch.ones(1, 3))


def test_eigsh_budget_stop_warns_once_with_the_fix():
    A = spd(300)
    with pytest.warns(BudgetWarning) as record:
        res = eigsh(A, k=5, max_steps=6, tol=1e-12)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "max_steps=6" in msg and "tol=1e-12" in msg and "raise max_steps or tol" in msg
    assert "5 of 5 eigenvalues not converged" in msg
    assert not bool(res.converged.all())
    g = torch.Generator().manual_seed(0)
    B = torch.randn(300, 300, generator=g, dtype=torch.float64)
    wigner = (B + B.T) / 2  # no gaps at the edge: slow convergence
    with pytest.warns(BudgetWarning, match="max_steps=30"):
        res = eigsh(wigner, k=3, max_steps=30, ncv=6)  # the restarted path too
    assert res.n_hvp == 30 and not bool(res.converged.all())


def test_converged_estimates_do_not_warn():
    A = spd(300)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        assert bool(eigsh(A, k=3).converged.all())
        assert bool(eigsh(A, k=3, ncv=8).converged.all())
        full, _ = block_traces(A, rtol=0.05)
        assert full.converged
        # rtol=0 asks for exactly max_hvp products: not a budget stop
        full0, _ = block_traces(A, rtol=0.0, max_hvp=80)
        assert full0.n_hvp == 80


def test_trace_budget_stop_warns_with_the_reached_error():
    A = spd(600, seed=3)
    with pytest.warns(BudgetWarning) as record:
        full, blocks = block_traces(A, {"a": slice(0, 300)}, rtol=1e-4, max_hvp=100)
    assert not blocks["a"].converged
    assert len(record) == 1
    msg = str(record[0].message)
    rel = full.stderr / abs(full.value)
    assert f"{rel:.2%}" in msg and "max_hvp=100" in msg and "rtol=0.01%" in msg
    assert "raise max_hvp or rtol" in msg and "1 of 1 blocks" in msg
    assert not full.converged and full.n_hvp == 100


def test_an_operator_that_returns_its_input_is_not_corrupted():
    """Estimators update products in place: a product that is its own input (the identity,
    returned as is) must still give the identity's numbers."""

    class Identity:
        dim, dtype, device = 300, torch.float64, torch.device("cpu")

        def matmat(self, V):
            return V

    op, dense = Identity(), MatrixOperator(torch.eye(300, dtype=torch.float64))
    assert hutchinson(op, n_hvp=20).value == pytest.approx(300.0, rel=1e-12)
    kw = {"slices": {"a": slice(0, 100)}, "rtol": 0.0, "max_hvp": 80, "sketch_rank": 4}
    full, blocks = block_traces(op, **kw)
    full_ref, blocks_ref = block_traces(dense, **kw)  # same probes
    assert full.value == pytest.approx(full_ref.value, rel=1e-12)
    assert blocks["a"].value == pytest.approx(blocks_ref["a"].value, rel=1e-12)
    assert abs(full.value - 300.0) < 4 * full.stderr
    assert hutchpp(op, n_hvp=60).value == pytest.approx(hutchpp(dense, n_hvp=60).value, rel=1e-12)
    spec, _ = slq(op, n_probes=2, n_steps=5, reorth="none")
    np.testing.assert_allclose(spec.nodes, 1.0, rtol=1e-12)
    res = eigsh(op, k=2, ncv=6)
    np.testing.assert_allclose(res.values.numpy(), [1.0, 1.0], rtol=1e-12)
