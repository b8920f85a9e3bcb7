"""The one memory budget: what each setting derives, and that the estimators follow it."""

import pytest
import torch
from torch.nn.functional import cross_entropy

import hesslens as hl
from hesslens.curvature import memory
from hesslens.curvature.memory import MemoryBudget
from tests.reference import classification_batches, mlp


def test_small_operators_keep_the_estimators_defaults():
    budget = MemoryBudget.of(None, vector_bytes=4 * 10_000)
    assert budget.ncv(k=5, dim=10_000, steps=150) is None
    assert budget.trace() is None and budget.density_group(8, 10) is None
    assert budget.deflation(10) == 10


def test_large_operators_get_a_lean_basis_sketch_and_deflation():
    budget = MemoryBudget.of(None, vector_bytes=40_000_000)
    assert budget.vectors == 6
    assert budget.ncv(k=1, dim=10**7, steps=100) == 0  # the three-term recurrence
    assert budget.ncv(k=1, dim=10**7, steps=100, vector_later=False) == 5
    assert budget.ncv(k=5, dim=10**7, steps=150) == 9
    assert budget.trace() == (4, 1)
    assert budget.deflation(10) == 5 and budget.density_group(8, 5) == 1


def test_bytes_and_auto_split_one_budget():
    budget = MemoryBudget.of(2**30, vector_bytes=4 * 10**6)
    assert budget.estimator_bytes == 2**29 and budget.graph_cache_bytes == int(0.4 * 2**30)
    assert budget.product_bytes == 2**30 // 10
    auto = MemoryBudget.of("auto", vector_bytes=4 * 10**6)
    assert 0 < auto.estimator_bytes <= memory.available_memory("cpu") // 4 + 1
    with pytest.raises(hl.HesslensInputError, match="memory must be"):
        MemoryBudget.of("lots", vector_bytes=1)


def test_the_basis_leaves_a_gpu_that_cannot_hold_it(monkeypatch):
    budget = MemoryBudget.of(None, vector_bytes=4 * 10**8)
    monkeypatch.setattr(memory, "available_memory", lambda device: 10**9)
    assert budget.basis_device(6, torch.device("cuda")) == torch.device("cpu")
    monkeypatch.setattr(memory, "available_memory", lambda device: 10**11)
    assert budget.basis_device(6, torch.device("cuda")) is None
    assert budget.basis_device(6, torch.device("cpu")) is None


def test_an_explicit_budget_changes_the_basis_not_the_answer():
    """A budget that forces a restarted basis on a small operator still finds the dense top
    eigenvalues (to the tolerance), with a smaller basis than the default's."""
    model = mlp().double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    dense = hl.Hessian(model, cross_entropy, batches).dense()
    exact = torch.linalg.eigvalsh(dense).flip(0)[:2]
    vec_bytes = 8 * dense.shape[0]
    tight = hl.Hessian(model, cross_entropy, batches, memory=2 * 8 * vec_bytes)
    assert tight._shared.budget.ncv(2, tight.dim, 100) == 7
    top = tight.eigenvalues(k=2)
    torch.testing.assert_close(top.values, exact, rtol=1e-6, atol=1e-12)
    full, layers = tight.traces(rtol=0.05, max_hvp=4000)
    assert abs(full.value - float(dense.trace())) <= 4 * full.stderr + 1e-9
    assert sum(r.value for r in layers.values()) == pytest.approx(full.value, rel=1e-9)


def test_a_lean_top_eigenvalue_keeps_no_basis_and_forms_its_vector_when_read():
    """Where the budget holds few vectors, eigenvalues(k=1) runs the three-term recurrence:
    the dense top eigenvalue in the products of an unrestarted run; its eigenvector comes from
    a second pass when first read, and is refused after the parameters were reloaded."""
    model = mlp().double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    full = hl.Hessian(model, cross_entropy, batches)
    dense = full.dense()
    evals, evecs = torch.linalg.eigh(dense)
    reference = full.eigenvalues(k=1)
    lean = hl.Hessian(model, cross_entropy, batches, memory=4 * 8 * dense.shape[0])
    assert lean._shared.budget.ncv(1, lean.dim, 100) == 0
    top = lean.eigenvalues(k=1)
    torch.testing.assert_close(top.values[0], evals[-1], rtol=1e-6, atol=0.0)
    assert bool(top.converged[0]) and top.n_hvp == reference.n_hvp
    before = lean.n_products
    v = top.vectors[0]
    assert top.n_hvp == 2 * reference.n_hvp - 1 and lean.n_products > before
    # the Ritz vector of the same Krylov space as the full basis's, with the residual it
    # reported: an eigenvector to the accuracy the convergence rule asks (sqrt(tol))
    assert abs(float(v @ reference.vectors[0])) == pytest.approx(1.0, abs=1e-10)
    residual = float((dense @ v - top.values[0] * v).norm())
    assert residual == pytest.approx(float(top.residuals[0]), rel=1e-4, abs=1e-12)
    assert abs(float(v @ evecs[:, -1])) > 1 - 1e-6
    eager = lean.eigenvalues(k=1, return_vectors=True)  # a small basis: the vector now
    assert type(eager).__name__ == "EigenResult" and eager.vectors is not None
    torch.testing.assert_close(eager.values[0], evals[-1], rtol=1e-6, atol=0.0)
    assert abs(float(eager.vectors[0] @ evecs[:, -1])) > 1 - 1e-6
    bare = lean.eigenvalues(k=1, return_vectors=False)  # the three-term recurrence, no vector
    assert bare.vectors is None and bare.n_hvp == reference.n_hvp
    again = lean.eigenvalues(k=1)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    lean.reload_parameters(model)
    with pytest.raises(hl.HesslensInputError, match="operator changed"):
        _ = again.vectors
