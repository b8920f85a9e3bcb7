"""The preconditioned operator P^(-1/2) (H + S) P^(-1/2) against dense float64 references, with
P built from an Adam optimizer's state after a few steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hesslens as hl
from hesslens.curvature.preconditioned import Preconditioned
from hesslens.errors import HesslensInputError
from tests.reference import classification_batches, dense_hessian, mlp, small_cnn

LOSS = nn.functional.cross_entropy


def _adam_state(model, batches, steps=4, **options):
    """Train with Adam (float64) for a few steps; return P of Cohen et al. 2022, per name."""
    opt = torch.optim.Adam(model.parameters(), **options)
    for _ in range(steps):
        opt.zero_grad()
        sum(LOSS(model(x), y) * len(y) for x, y in batches).div(
            sum(len(y) for _, y in batches)).backward()
        opt.step()
    g = opt.param_groups[0]
    (b1, b2), eps = g["betas"], g["eps"]
    P = {}
    for name, p in model.named_parameters():
        st = opt.state[p]
        t = float(st["step"])
        v = st["exp_avg_sq"]
        P[name] = (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps)
    return P


def _dense(model, batches):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dense_hessian(model, LOSS, batches, names), names


@pytest.mark.parametrize("make, shape", [(mlp, (6,)), (small_cnn, (1, 6, 6))])
def test_eigenvalues_equal_the_dense_preconditioned_hessian_after_adam_steps(make, shape):
    model = make(0).double()
    batches = [(x.double(), y) for x, y in classification_batches(shape, classes=3 if
                                                                  make is small_cnn else 4)]
    P = _adam_state(model, batches, lr=1e-2)
    H, names = _dense(model, batches)
    d = torch.cat([P[n].flatten() for n in names])
    M = H / d.sqrt()[:, None] / d.sqrt()[None, :]
    ref = torch.linalg.eigvalsh(M).flip(0)
    A = Preconditioned(hl.Hessian(model, LOSS, batches), P)
    top = A.eigenvalues(k=3, tol=1e-10)
    torch.testing.assert_close(top.values, ref[:3], rtol=1e-8, atol=1e-10)
    # P^-1 H has the same spectrum (it is similar to the symmetric form)
    nonsym = torch.linalg.eigvals(H / d[:, None]).real.sort(descending=True).values
    torch.testing.assert_close(top.values, nonsym[:3], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(A.dense(), M, rtol=1e-9, atol=1e-11)
    assert A.trace(method="exact").value == pytest.approx(float(M.trace()), rel=1e-10)


def test_shift_infinite_entries_and_flat_diagonal():
    model = mlp(1).double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    H, _ = _dense(model, batches)
    g = torch.Generator().manual_seed(0)
    d = torch.rand(H.shape[0], generator=g, dtype=torch.float64) + 0.2
    d[:10] = math.inf  # a frozen stretch: zero rows and columns
    s = torch.rand(H.shape[0], generator=g, dtype=torch.float64)
    D = torch.diag(d.rsqrt())
    ref = D @ (H + torch.diag(s)) @ D
    A = Preconditioned(hl.Hessian(model, LOSS, batches), d, shift=s)
    dense = A.dense()
    torch.testing.assert_close(dense, ref, rtol=1e-9, atol=1e-11)
    assert float(dense[:10].abs().max()) == 0.0
    scalar = Preconditioned(hl.Hessian(model, LOSS, batches), d, shift=0.3)
    eye = torch.eye(len(d), dtype=torch.float64)
    torch.testing.assert_close(scalar.dense(), D @ (H + 0.3 * eye) @ D, rtol=1e-9, atol=1e-11)
    # the gradient in the preconditioned coordinates
    _, grad = A.loss_and_gradient()
    _, raw = hl.Hessian(model, LOSS, batches).loss_and_gradient()
    torch.testing.assert_close(grad, raw * d.rsqrt())


def test_blocks_and_estimators_run_on_the_preconditioned_operator():
    model = mlp(2).double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    H, _ = _dense(model, batches)
    d = torch.linspace(0.5, 3.0, H.shape[0], dtype=torch.float64)
    A = Preconditioned(hl.Hessian(model, LOSS, batches), d)
    M = H / d.sqrt()[:, None] / d.sqrt()[None, :]
    idx = A.layer_indices()["2"]
    block = A.block("2")
    torch.testing.assert_close(block.dense(), M[idx][:, idx], rtol=1e-9, atol=1e-11)
    assert isinstance(A.gauss_newton(), Preconditioned)
    ref = torch.linalg.eigvalsh(M)
    tr = A.trace(rtol=0.02, seed=0)
    assert abs(tr.value - float(ref.sum())) < 5 * tr.stderr + 1e-8
    density = A.density(n_probes=2, n_steps=30, deflate=2)
    assert float(density.weights.sum()) == pytest.approx(1.0)
    assert float(density.nodes.max()) == pytest.approx(float(ref[-1]), rel=1e-6)


def test_bad_diagonals_are_refused_by_name():
    model = mlp(0)
    batches = classification_batches((6,), classes=4)
    H = hl.Hessian(model, LOSS, batches)
    with pytest.raises(HesslensInputError, match="must be positive"):
        Preconditioned(H, torch.zeros(H.dim))
    with pytest.raises(HesslensInputError, match="flat tensor of the operator's"):
        Preconditioned(H, torch.ones(3))
    with pytest.raises(HesslensInputError, match="no entry for the parameters"):
        Preconditioned(H, {"0.weight": torch.ones(10, 6)})
    with pytest.raises(HesslensInputError, match="wraps a curvature operator"):
        Preconditioned(torch.eye(3), torch.ones(3))
