"""A user's own matrix is one subclass of the operator base with one per-batch method: the
README's example (the Fisher with labels sampled from the model) against a dense reference."""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import hesslens as hl
from tests.reference import flat_functions


class MonteCarloFisher(hl.CurvatureOperator):
    """The Fisher ``E_x E_{y ~ p(y|x)} [g g^T]`` with one label sampled from the model per
    input: ``F_b v = sum_n w J_n^T d_n d_n^T J_n v``, ``d_n = softmax(z_n) - onehot(y_n)``."""

    def batch_products(self, batch, names, vectors, out=None):
        params = {n: batch.params[n] for n in names}
        z, pullback = torch.func.vjp(batch.outputs, params)          # z and v -> J^T v
        p = z.detach().softmax(-1)
        labels = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(batch.index))
        d = p - nn.functional.one_hot(labels[:, 0], p.shape[-1]).to(p.dtype)
        w = batch.weight / z.shape[0]                                 # each input's share
        products = []
        for j in range(vectors[0].shape[0]):
            v = {n: t[j] for n, t in zip(names, vectors)}
            _, jv = torch.func.jvp(batch.outputs, (params,), (v,))       # J v
            products.append(pullback(w * d * (d * jv).sum(-1, keepdim=True))[0])
        return [torch.stack([prod[n] for prod in products]) for n in names]


def _dense_monte_carlo_fisher(model, batches, names):
    flat, forward = flat_functions(model, names)
    total = sum(len(y) for _, y in batches)
    rows = []
    for index, (x, _) in enumerate(batches):
        with torch.no_grad():
            p = forward(flat, x).softmax(-1)
        labels = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(index))[:, 0]
        for i in range(len(x)):
            rows.append(torch.func.grad(
                lambda vec, i=i, x=x, labels=labels: cross_entropy(forward(vec, x[i:i + 1]),
                                                                   labels[i:i + 1]))(flat))
    G = torch.stack(rows)
    return G.T @ G / total


def test_a_matrix_of_ones_own_matches_its_dense_reference():
    model, batches = _small_problem(inputs=5, hidden=7, sizes=(6, 4))
    F = MonteCarloFisher(model, cross_entropy, batches)
    dense = _dense_monte_carlo_fisher(model, batches, F.parameter_names)
    V = torch.randn(3, F.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(F.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    top = F.eigenvalues(k=2)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(dense).flip(0)[:2],
                               rtol=1e-6, atol=1e-12)
    # its blocks are its own kind, restricted to a layer's parameters
    block = F.block("2")
    assert isinstance(block, MonteCarloFisher)
    idx = F.layer_indices()["2"]
    torch.testing.assert_close(block.dense(), dense[idx][:, idx], atol=1e-12, rtol=1e-10)


def test_a_matrix_without_its_per_batch_method_is_named():
    class Nothing(hl.CurvatureOperator):
        pass

    op = Nothing(nn.Linear(2, 2), cross_entropy, (torch.randn(3, 2), torch.tensor([0, 1, 0])))
    with pytest.raises(NotImplementedError, match="Nothing must implement batch_products"):
        op.hvp(torch.ones(op.dim))


def _small_problem(inputs=4, hidden=5, sizes=(6, 3)):
    """A float64 tanh MLP with 3 classes and uneven batches of ``sizes`` samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, inputs, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    return model, batches


def test_products_written_into_a_given_tensor_equal_the_products():
    model, batches = _small_problem()
    H = hl.Hessian(model, cross_entropy, batches)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dense = H.dense()
    for op, ref in ((H, dense), (H.gauss_newton(), H.gauss_newton().dense()),
                    (H.residual(), dense - H.gauss_newton().dense()),
                    (H.block("2"), None)):
        out = torch.full_like(V[:, :op.dim], float("nan"))  # stale contents must not leak in
        W = V[:, :op.dim]
        got = op.matmat_into(W, out)
        assert got is out
        expected = op.matmat(W) if ref is None else W @ ref
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # the full operator sums into the given tensor itself, with no result of its own
    out = torch.empty_like(V)
    assert H._apply(V, out) is out


def test_products_into_a_tensor_of_another_dtype_are_refused_by_name():
    model, batches = _small_problem()
    H = hl.Hessian(model, cross_entropy, batches)
    with pytest.raises(hl.HesslensInputError, match="matmat_into needs out"):
        H.matmat_into(torch.ones(1, H.dim, dtype=torch.float64),
                      torch.empty(1, H.dim, dtype=torch.float32))
