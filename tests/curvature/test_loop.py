"""The data loop's row chunks: a large model's batches split so that a product holds one
chunk's graph, with the products of the whole batches (dense float64 references)."""

import pytest
import torch
from torch.nn.functional import cross_entropy

import hesslens as hl
from hesslens.curvature import memory
from tests.reference import bn_model, classification_batches, dense_hessian, mlp


def _batches(n=(16, 11, 3), shape=(6,), classes=4):
    return [(x.double(), y) for x, y in classification_batches(shape, n=n, classes=classes)]


def test_split_batches_give_the_dense_hessian_and_its_estimates():
    model = mlp().double()
    batches = _batches()
    dense = dense_hessian(model, cross_entropy, batches, [n for n, _ in model.named_parameters()])
    H = hl.Hessian(model, cross_entropy, batches, path="reverse", reuse_graph=False)
    loop = H._shared.loop
    saved = loop._measure_activations()
    assert loop.split_rows(saved) is None  # a batch within twice the bound stays whole
    rows = loop.split_rows(saved // 8)
    assert rows is not None and 1 <= rows < 16 and loop.rows_per_chunk == rows
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(H.hvp(V), V @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H.hvp(V[0]), dense @ V[0], rtol=1e-10, atol=1e-12)
    loss, grad = H.loss_and_gradient()
    whole = hl.Hessian(model, cross_entropy, batches).loss_and_gradient()
    assert loss == pytest.approx(whole[0], rel=1e-12)
    torch.testing.assert_close(grad, whole[1], rtol=1e-10, atol=1e-13)
    top = H.eigenvalues(k=2)
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(dense).flip(0)[:2],
                               rtol=1e-6, atol=1e-12)


def test_the_default_budget_splits_a_large_model_s_big_batches(monkeypatch):
    """memory=None on a model the budget calls large (here: every model, by a floor of 0)
    whose batch saves more than a parameter copy: chunks of rows and no graph cache, with the
    same products; a small batch stays whole and cached."""
    monkeypatch.setattr(memory, "FLOOR_BYTES", 0)
    model = mlp().double()
    batches = _batches(n=(64, 40))
    H = hl.Hessian(model, cross_entropy, batches)
    loop = H._shared.loop
    assert loop.rows_per_chunk is not None and loop.graph_cache_bytes == 0
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    V = torch.randn(2, H.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(H.hvp(V), V @ dense, rtol=1e-10, atol=1e-12)
    small = hl.Hessian(model, cross_entropy, _batches(n=(2,)))
    assert small._shared.loop.rows_per_chunk is None
    assert small._shared.loop.graph_cache_bytes > 0
    pinned = hl.Hessian(model, cross_entropy, batches, reuse_graph=True)
    assert pinned._shared.loop.rows_per_chunk is None


def _never_split(H):
    loop = H._shared.loop
    return loop.split_rows(1) is None and loop.rows_per_chunk is None


def test_batches_are_not_split_where_the_chunks_would_change_the_loss():
    batches = _batches(n=(12,))
    # batch statistics, and a loss that couples the samples of a batch
    assert _never_split(hl.Hessian(bn_model().double(), cross_entropy,
                                   _batches(n=(12,), shape=(5,), classes=3), batchnorm="batch"))

    def centred(out, y):
        return cross_entropy(out - out.mean(dim=0), y)

    assert _never_split(hl.Hessian(mlp().double(), centred, batches))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 4)).double()
    assert _never_split(hl.Hessian(model, cross_entropy, batches, allow_dropout=True))
