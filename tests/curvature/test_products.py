"""Products of the Hessian, Gauss-Newton and residual operators against dense float64 matrices."""

import pytest
import torch
from torch.nn.functional import cross_entropy

import hesslens as hl
from hesslens.errors import HesslensInputError
from tests.reference import (
    bn_model,
    classification_batches,
    dense_gauss_newton,
    dense_hessian,
    frozen_model,
    mlp,
    small_cnn,
)

CASES = {
    "mlp": (mlp, (6,), 4),
    "cnn": (small_cnn, (1, 7, 7), 3),
    "batchnorm": (bn_model, (5,), 3),
    "frozen": (frozen_model, (4,), 3),
}


def _setup(case, path="auto", bn="eval"):
    build, shape, classes = CASES[case]
    model = build().double()
    batches = classification_batches(shape, classes=classes)
    batches = [(x.double(), y) for x, y in batches]
    H = hl.Hessian(model, cross_entropy, batches, path=path, batchnorm=bn)
    return model, batches, H


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("path", ["reverse", "forward", "auto"])
def test_hessian_products_match_dense(case, path):
    model, batches, H = _setup(case, path)
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(5, H.dim, generator=g, dtype=torch.float64)
    assert torch.allclose(H.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(H.hvp(V[0]), dense @ V[0], atol=1e-12, rtol=1e-10)
    assert H.hvp(V[0]).shape == (H.dim,)


@pytest.mark.parametrize("case", list(CASES))
def test_gauss_newton_and_residual_match_dense(case):
    model, batches, H = _setup(case)
    names = H.parameter_names
    G_dense = dense_gauss_newton(model, cross_entropy, batches, names)
    H_dense = dense_hessian(model, cross_entropy, batches, names)
    V = torch.randn(4, H.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(H.gauss_newton().hvp(V), V @ G_dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(H.residual().hvp(V), V @ (H_dense - G_dense), atol=1e-12, rtol=1e-10)
    G = hl.GaussNewton(model, cross_entropy, batches)
    assert torch.allclose(G.dense(), G_dense, atol=1e-12)
    # G is positive semi-definite for a convex loss in the outputs.
    assert torch.linalg.eigvalsh(G_dense).min() > -1e-10


@pytest.mark.parametrize("path", ["reverse", "forward"])
def test_batch_statistics_mode_matches_dense(path):
    model, batches, H = _setup("batchnorm", path=path, bn="batch")
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names, bn="batch")
    assert torch.allclose(H.dense(), dense, atol=1e-12)
    eval_dense = dense_hessian(model, cross_entropy, batches, H.parameter_names, bn="eval")
    assert not torch.allclose(dense, eval_dense, atol=1e-3)


def test_block_products_differentiate_only_the_block():
    model, batches, H = _setup("mlp")
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    offset = 0
    for layer in H.layers:
        block = H.block(layer)
        idx = slice(offset, offset + block.dim)
        assert block.parameter_names == H.layer_parameters[layer]
        assert torch.allclose(block.dense(), dense[idx, idx], atol=1e-12)
        offset += block.dim
    assert offset == H.dim


def test_frozen_parameter_and_parameter_free_module():
    model, _, H = _setup("frozen")
    assert "3.bias" not in H.parameter_names
    assert H.layers == ["0", "3", "5"]
    assert H.layer_parameters["3"] == ["3.weight"]
    assert H.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_float64_mode_analyses_a_float32_model_exactly():
    build, shape, classes = CASES["cnn"]
    model = build()  # float32
    batches = classification_batches(shape, classes=classes)
    H = hl.Hessian(model, cross_entropy, batches, dtype=torch.float64)
    assert H.dtype == torch.float64
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    assert torch.allclose(H.dense(), dense, atol=1e-12)
    assert next(model.parameters()).dtype == torch.float32


def test_several_batches_equal_one_concatenated_batch():
    model, batches, H = _setup("mlp")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one = hl.Hessian(model, cross_entropy, (x, y))
    assert H.num_samples == one.num_samples == len(y)
    assert torch.allclose(H.dense(), one.dense(), atol=1e-12)


def test_data_as_generator_and_dataloader():
    model, batches, H = _setup("mlp")
    from_gen = hl.Hessian(model, cross_entropy, (b for b in batches))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    from_loader = hl.Hessian(model, cross_entropy, loader)
    ref = H.dense()
    assert torch.allclose(from_gen.dense(), ref, atol=1e-12)
    assert torch.allclose(from_loader.dense(), ref, atol=1e-12)


def test_products_never_change_the_model():
    model = bn_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    batches = classification_batches((5,), classes=3)
    for bn in ("eval", "batch"):
        H = hl.Hessian(model, cross_entropy, batches, batchnorm=bn)
        H.eigenvalues(k=2)
        H.gauss_newton().hvp(torch.ones(H.dim))
        H.trace(max_hvp=100)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert modes == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_snapshot_of_parameters_at_construction():
    model, _batches, H = _setup("mlp")
    v = torch.ones(H.dim, dtype=torch.float64)
    hv = H.hvp(v)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(H.hvp(v), hv)


def test_to_scipy_linear_operator():
    from scipy.sparse.linalg import eigsh

    model, batches, H = _setup("mlp")
    op = H.to_scipy()
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(dense)[-2:].numpy()
    assert abs(sorted(top)[-1] - ref[-1]) < 1e-8 * abs(ref[-1])


def test_custom_layer_grouping():
    model, batches, _ = _setup("mlp")
    groups = {"hidden": ["0.weight", "0.bias", "2.weight", "2.bias"],
              "head": ["4.weight", "4.bias"]}
    H = hl.Hessian(model, cross_entropy, batches, layers=groups)
    assert H.layers == ["hidden", "head"]
    assert H.block("head").dim == 8 * 4 + 4


def _regression_batches(n=(7, 5, 3), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, 6, generator=g, dtype=torch.float64),
             torch.randn(k, 4, generator=g, dtype=torch.float64)) for k in n]


@pytest.mark.parametrize("loss_fn", [torch.nn.functional.mse_loss,
                                     torch.nn.functional.huber_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("path", ["reverse", "auto"])
def test_regression_losses_match_dense(loss_fn, path):
    """Forward-mode AD is missing for mse_loss's and huber_loss's backward: the automatic
    path choice must fall back, and Gauss-Newton must not need it."""
    model = mlp().double()
    batches = _regression_batches()
    H = hl.Hessian(model, loss_fn, batches, path=path)
    names = H.parameter_names
    H_dense = dense_hessian(model, loss_fn, batches, names)
    G_dense = dense_gauss_newton(model, loss_fn, batches, names)
    V = torch.randn(5, H.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(H.hvp(V), V @ H_dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(H.hvp(V[0]), H_dense @ V[0], atol=1e-12, rtol=1e-10)
    G = hl.GaussNewton(model, loss_fn, batches)
    assert torch.allclose(G.hvp(V), V @ G_dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(G.hvp(V[0]), G_dense @ V[0], atol=1e-12, rtol=1e-10)
    top = H.eigenvalues(k=2, tol=1e-10).values
    assert torch.allclose(torch.as_tensor(top, dtype=torch.float64),
                          torch.linalg.eigvalsh(H_dense).flip(0)[:2], atol=1e-8, rtol=1e-7)


class _WithUnusedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = mlp()
        self.aux = torch.nn.Linear(6, 2)  # trainable, never called

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("path", ["reverse", "forward", "auto"])
def test_unused_trainable_parameters_have_zero_curvature(path):
    model = _WithUnusedHead().double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    H = hl.Hessian(model, cross_entropy, batches, path=path)
    assert "aux" in H.layers
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(H.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    assert torch.allclose(H.hvp(V[0]), dense @ V[0], atol=1e-12, rtol=1e-10)
    assert H.block("aux").trace(method="exact").value == 0.0
    top = H.eigenvalues(k=1, tol=1e-10).values[0]
    assert top == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-7)


@pytest.mark.parametrize("path", ["forward", "reverse"])
def test_non_finite_loss_in_a_later_batch_is_named(path):
    model = mlp().double()
    batches = [(x.double(), y) for x, y in classification_batches((6,), classes=4)]
    batches[1][0][0, 0] = float("nan")
    H = hl.Hessian(model, cross_entropy, batches, path=path)
    with pytest.raises(HesslensInputError, match="not finite"):
        H.trace(method="exact")
    with pytest.raises(HesslensInputError, match="not finite"):
        hl.GaussNewton(model, cross_entropy, batches, reuse_graph=False).eigenvalues(k=1)


def test_batched_paths_are_not_timed_when_a_chunk_holds_too_few_vectors():
    """Where product_bytes lets a chunk hold fewer than 4 vectors (large networks), batched
    products run as the loop with no timing of the batched paths (their temporaries would add
    to the peak for nothing); with room they are timed as before. Both match the dense Hessian."""
    model, batches, _ = _setup(next(iter(CASES)), "auto")
    dense = dense_hessian(model, cross_entropy, batches, hl.Hessian(model, cross_entropy,
                                                                    batches).parameter_names)
    V = torch.randn(6, dense.shape[0], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    tight = hl.Hessian(model, cross_entropy, batches, product_bytes=1)
    assert tight._shared.loop.vectors_per_chunk(tight.parameter_names) == 1
    torch.testing.assert_close(tight.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    assert tight.engine_choice["batched"] == "reverse-loop"
    assert "batched" not in tight.path_choice.timings
    assert tight.path_choice.calibration_products == 0
    roomy = hl.Hessian(model, cross_entropy, batches)
    torch.testing.assert_close(roomy.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    assert set(roomy.path_choice.timings["batched"]) >= {"reverse-loop", "reverse-batched"}


def test_shared_parameters_give_the_copy_s_products_and_refuse_stale_ones():
    """snapshot=False uses the model's own parameters (no second copy): the same products as a
    copy, the model untouched (no gradients left on it), a named error once an optimizer step
    changed them, and reload_parameters takes the new weights."""
    model, batches, copied = _setup("mlp")
    shared = hl.Hessian(model, cross_entropy, batches, snapshot=False)
    assert shared._shared.loop.model.shared and not copied._shared.loop.model.shared
    V = torch.randn(3, shared.dim, generator=torch.Generator().manual_seed(4),
                    dtype=torch.float64)
    torch.testing.assert_close(shared.hvp(V), copied.hvp(V), atol=1e-13, rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    with pytest.raises(HesslensInputError, match="changed since the operator took them"):
        shared.hvp(V)
    shared.reload_parameters(model)
    dense = dense_hessian(model, cross_entropy, batches, shared.parameter_names)
    torch.testing.assert_close(shared.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    with pytest.raises(HesslensInputError, match="changed since"):  # its blocks share the check
        with torch.no_grad():
            model[0].weight.add_(1.0)
        shared.block(shared.layers[0]).hvp(V[:, :shared.block(shared.layers[0]).dim])


@pytest.mark.parametrize("case", ["mlp", "cnn", "batchnorm"])
def test_cached_gradient_graph_holds_no_gradient_values(case):
    """The cached first-order graph keeps the graph, not the gradient's entries (one parameter
    copy less); the products stay those of the dense Hessian, batched and one at a time."""
    model, batches, H = _setup(case, path="reverse")
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(H.hvp(V), V @ dense, atol=1e-12, rtol=1e-10)
    graphs = H._shared.loop._graphs["hessian"]
    assert len(graphs) == len(batches)
    grads = [g for graph in graphs for g in graph.grads.values() if g.requires_grad]
    assert grads and all(g.untyped_storage().nbytes() == 0 for g in grads)
    assert torch.allclose(H.hvp(V[1]), dense @ V[1], atol=1e-12, rtol=1e-10)


def test_a_gradient_the_graph_saves_keeps_its_values():
    """A gradient whose own storage the graph saved (double backward reads its values) is not
    freed, and its products stay exact."""
    from hesslens.curvature import products

    w = torch.tensor([0.5, -1.0], dtype=torch.float64)

    class ExpOfGradient(torch.autograd.Function):
        """Identity forward; backward returns exp(grad), whose node saves its own result."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad.exp()

    def loss_of(p):
        return (ExpOfGradient.apply(p["w"]) ** 3).sum() / 6  # g = exp(w^2 / 2)

    graph = products.first_order_graph(loss_of, {"w": w}, ["w"], keep_values=False)
    g = graph.grads["w"]
    assert g.untyped_storage().nbytes() == g.numel() * g.element_size()
    assert torch.allclose(g, (w**2 / 2).exp(), atol=1e-15)
    v = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
    kept = products.first_order_graph(loss_of, {"w": w}, ["w"])
    assert torch.equal(products.hvp(graph.grads, graph.leaves, v)[0],
                       products.hvp(kept.grads, kept.leaves, v)[0])


def test_a_graph_that_is_not_kept_is_freed():
    """Counting what a graph saves must not keep it alive: a saved output held by its own
    node's saved-tensor record is a reference cycle nothing frees (every product rebuilt
    without the graph cache leaked a batch's activations)."""
    import gc
    import weakref

    from hesslens.curvature import products

    seen = []

    def loss_of(p):
        e = p["w"].exp()  # exp saves its output for backward
        seen.append(weakref.ref(e))
        return e.sum() ** 2

    graph = products.first_order_graph(loss_of, {"w": torch.randn(4)}, ["w"])
    assert float(products.hvp(graph.grads, graph.leaves, [torch.ones(4)])[0].norm()) > 0
    del graph
    gc.collect()
    assert seen[0]() is None
