"""The empirical Fisher against dense float64 sums of per-sample gradient outer products."""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy, mse_loss

import hesslens as hl
from tests.reference import bn_model, flat_functions, mlp, small_cnn


def _dense_fisher(model, loss_fn, batches, names, weights=None, bn="eval"):
    """``sum_n w_n g_n g_n^T`` (float64) with ``g_n`` the gradient of sample ``n``'s loss
    alone; ``w_n = 1/N`` unless ``weights`` (one per sample, in batch order) are given."""
    flat, forward = flat_functions(model, names, bn)
    grads = []
    for x, y in batches:
        for i in range(len(y)):
            def loss(vec, i=i, x=x, y=y):
                return loss_fn(forward(vec, x[i:i + 1].double()), y[i:i + 1])

            grads.append(torch.func.grad(loss)(flat))
    G = torch.stack(grads)
    w = torch.full((len(grads),), 1.0 / len(grads), dtype=torch.float64) if weights is None \
        else torch.as_tensor(weights, dtype=torch.float64)
    return (G * w[:, None]).T @ G


def _batches(shape, classes, sizes=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("build, shape, classes", [(mlp, (6,), 4), (small_cnn, (1, 7, 7), 3),
                                                   (bn_model, (5,), 3)])
def test_empirical_fisher_matches_dense_on_uneven_batches(build, shape, classes):
    model = build().double()
    batches = _batches(shape, classes)
    F = hl.EmpiricalFisher(model, cross_entropy, batches)
    dense = _dense_fisher(model, cross_entropy, batches, F.parameter_names)
    V = torch.randn(3, F.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(F.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(F.hvp(V[0]), dense @ V[0], atol=1e-12, rtol=1e-10)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    top = F.eigenvalues(k=3)
    torch.testing.assert_close(top.values, exact[:3], rtol=1e-6, atol=1e-10)
    assert F.trace(method="exact").value == pytest.approx(float(dense.trace()), rel=1e-10)
    full, layers = F.traces(rtol=0.02, max_hvp=4000)
    assert abs(full.value - float(dense.trace())) <= 4 * full.stderr + 1e-9
    for name, idx in F.layer_indices().items():
        exact_block = float(dense[idx][:, idx].trace())
        assert abs(layers[name].value - exact_block) <= 4 * layers[name].stderr + 1e-9


def test_empirical_fisher_of_a_regression_loss_and_its_blocks():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(n, 4, generator=g, dtype=torch.float64),
                torch.randn(n, 3, generator=g, dtype=torch.float64)) for n in (6, 3, 4)]
    H = hl.Hessian(model, mse_loss, batches)
    F = H.empirical_fisher()
    names = F.parameter_names
    dense = _dense_fisher(model, mse_loss, batches, names)
    V = torch.randn(2, F.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(F.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    block = F.block("2")
    idx = torch.arange(4 * 6 + 6, F.dim)
    torch.testing.assert_close(block.dense(), dense[idx][:, idx], atol=1e-12, rtol=1e-10)
    assert type(block) is hl.EmpiricalFisher
    # positive semi-definite, as a sum of outer products
    assert torch.linalg.eigvalsh(F.dense()).min() > -1e-12


def test_empirical_fisher_weights_language_model_samples_by_their_tokens():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11,
                                     n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, 3:] = -100  # a shorter sequence: fewer loss terms
    batches = [{"input_ids": ids[:2], "labels": labels[:2]},
               {"input_ids": ids[2:], "labels": labels[2:]}]
    F = hl.EmpiricalFisher(model, None, batches, layers="transformer")
    names = F.parameter_names
    params = dict(model.named_parameters())
    flat = torch.cat([params[n].detach().flatten() for n in names])
    shapes = [params[n].shape for n in names]

    def row_loss(vec, r):
        """Row ``r``'s loss, the model's recipe in float64 (transformers' own rounds the
        logits to float32)."""
        chunks = torch.split(vec, [s.numel() for s in shapes])
        pieces = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        logits = torch.func.functional_call(model, pieces, (),
                                            {"input_ids": ids[r:r + 1]}).logits
        return nn.functional.cross_entropy(logits[0, :-1], labels[r, 1:])

    terms = [(labels[r, 1:] != -100).sum().item() for r in range(3)]
    grads = torch.stack([torch.func.grad(row_loss)(flat, r) for r in range(3)])
    w = torch.tensor(terms, dtype=torch.float64) / sum(terms)
    dense = (grads * w[:, None]).T @ grads
    v = torch.randn(F.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(F.hvp(v), dense @ v, atol=1e-10, rtol=1e-8)


def test_empirical_fisher_refuses_a_loss_that_is_not_a_mean_of_samples():
    model = mlp().double()
    batches = _batches((6,), 4, sizes=(8,))
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0],
                                                       dtype=torch.float64))
    F = hl.EmpiricalFisher(model, weighted, batches)
    with pytest.raises(hl.HesslensInputError, match="not the mean of its samples' losses"):
        F.hvp(torch.ones(F.dim, dtype=torch.float64))
