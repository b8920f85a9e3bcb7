"""Eigenvalues, traces, layer traces and densities of real networks against dense float64
references, at default settings."""

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

import hesslens as hl
from tests.reference import (
    bn_model,
    classification_batches,
    dense_gauss_newton,
    dense_hessian,
    mlp,
    small_cnn,
)


def _wide_mlp():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                               torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _case(name):
    if name == "mlp":
        model, shape, classes = mlp(3), (6,), 4
    elif name == "wide":  # 1412 parameters: traces are estimated, not computed exactly
        model, shape, classes = _wide_mlp(), (6,), 4
    elif name == "cnn":
        model, shape, classes = small_cnn(3), (1, 7, 7), 3
    else:
        model, shape, classes = bn_model(3), (5,), 3
    batches = classification_batches(shape, n=(24, 17, 9), classes=classes, seed=5)
    return model, batches


@pytest.fixture(scope="module", params=["mlp", "cnn", "batchnorm", "wide"])
def setup(request):
    model, batches = _case(request.param)
    H = hl.Hessian(model, cross_entropy, batches)  # float32 model, default settings
    dense = dense_hessian(model, cross_entropy, batches, H.parameter_names)
    return model, batches, H, dense


def test_top_eigenvalues_and_vectors(setup):
    _, _, H, dense = setup
    evals, evecs = torch.linalg.eigh(dense)
    result = H.eigenvalues(k=5)
    ref = evals.flip(0)[:5]
    assert result.values.shape == (5,)
    assert bool(result.converged.all())
    assert torch.all(result.values[:-1] >= result.values[1:])
    rel = ((result.values - ref).abs() / ref.abs()).max()
    assert rel < 1e-4, rel
    for i in range(3):  # well separated on these models: vectors match up to sign
        cos = torch.dot(result.vectors[i].double(), evecs[:, -1 - i]).abs()
        assert cos > 1 - 1e-3
    assert result.n_hvp == H.n_products > 0


@pytest.mark.parametrize("which", ["SA", "LM"])
def test_other_ends_of_the_spectrum(setup, which):
    _, _, H, dense = setup
    evals = torch.linalg.eigvalsh(dense)
    result = H.eigenvalues(k=3, which=which)
    if which == "SA":
        ref = evals[:3].flip(0)
    else:
        ref = evals[evals.abs().argsort(descending=True)[:3]].sort(descending=True).values
    scale = evals.abs().max()
    assert torch.allclose(result.values, ref, atol=1e-4 * scale)


def test_block_top_eigenvalues(setup):
    _, _, H, dense = setup
    offset = 0
    for layer in H.layers:
        block = H.block(layer)
        sub = dense[offset : offset + block.dim, offset : offset + block.dim]
        offset += block.dim
        ref = torch.linalg.eigvalsh(sub)[-1]
        top = block.eigenvalues(k=1).values[0]
        assert abs(top - ref) <= 1e-4 * abs(ref), (layer, top, ref)


def test_trace(setup):
    _, _, H, dense = setup
    exact = torch.trace(dense).item()
    result = H.trace()
    if H.dim > 1000:
        assert result.method == "hutch++" and result.n_hvp < H.dim
    assert abs(result.value - exact) <= 0.03 * abs(exact)
    assert abs(result.value - exact) <= 5 * result.stderr + 1e-6 * abs(exact)
    assert result.n_hvp > 0


def test_layer_traces_from_shared_probes(setup):
    _, _, H, dense = setup
    full, layers = H.traces()
    assert list(layers) == H.layers
    assert np.isclose(sum(r.value for r in layers.values()), full.value, rtol=1e-9)
    offset = 0
    for layer, result in layers.items():
        size = H.block(layer).dim
        exact = torch.diagonal(dense)[offset : offset + size].sum().item()
        offset += size
        assert abs(result.value - exact) <= 0.10 * abs(exact) + 1e-3 * abs(full.value), layer
        assert abs(result.value - exact) <= 5 * result.stderr + 1e-6 * abs(full.value), layer


def test_density_against_exact_measure(setup):
    _, _, H, dense = setup
    evals = torch.linalg.eigvalsh(dense).numpy()
    exact = hl.Spectrum.from_eigenvalues(evals)
    density = H.density()
    assert np.isclose(density.weights.sum(), 1.0)
    assert abs(density.nodes.max() - evals.max()) <= 1e-3 * abs(evals.max())
    assert abs(density.mean - evals.mean()) <= 0.10 * abs(evals.mean())
    point_mass = hl.Spectrum(np.zeros(1), np.ones(1))
    assert density.wasserstein(exact) < 0.2 * exact.wasserstein(point_mass)


def test_gauss_newton_top_eigenvalues(setup):
    model, batches, H, _ = setup
    G = H.gauss_newton()
    dense = dense_gauss_newton(model, cross_entropy, batches, H.parameter_names)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    result = G.eigenvalues(k=3)
    assert ((result.values - ref).abs() / ref.abs()).max() < 1e-4


def test_estimators_are_reproducible_with_a_seed():
    model, batches = _case("wide")
    a = hl.Hessian(model, cross_entropy, batches, path="reverse")
    b = hl.Hessian(model, cross_entropy, batches, path="reverse")
    assert a.trace(seed=3).value == b.trace(seed=3).value
    assert torch.equal(a.eigenvalues(k=2, seed=4).values, b.eigenvalues(k=2, seed=4).values)
    assert a.trace(seed=3).value != a.trace(seed=4).value


def test_traces_after_trace_continue_its_probes():
    # trace() stops on the full trace alone; traces() after it continues the same probes to
    # meet the per-layer rule: the same result as traces() alone, for fewer products
    model, batches = _case("wide")
    fresh = hl.Hessian(model, cross_entropy, batches, path="reverse")
    full_fresh, layers_fresh = fresh.traces(rtol=0.1, seed=2)
    H = hl.Hessian(model, cross_entropy, batches, path="reverse")
    alone = H.trace(rtol=0.1, seed=2)
    before = H.n_products
    full, layers = H.traces(rtol=0.1, seed=2)
    assert alone.n_hvp < full_fresh.n_hvp  # the layers needed more probes than the full trace
    assert H.n_products - before == fresh.n_products - alone.n_hvp
    assert (full.value, full.stderr, full.n_hvp) == (
        full_fresh.value, full_fresh.stderr, full_fresh.n_hvp)
    for name, r in layers_fresh.items():
        assert (layers[name].value, layers[name].stderr) == (r.value, r.stderr)


def test_reload_parameters_equals_a_fresh_operator():
    """After an optimizer step, H.reload_parameters(model) gives the products, eigenvalues and
    traces of an operator built afresh on the moved model, blocks and Gauss-Newton included,
    and it does not change the model."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model.double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    H = hl.Hessian(model, cross_entropy, (x, y))
    G = H.gauss_newton()
    block = H.block("2")
    H.eigenvalues(k=2)
    before = H.traces(rtol=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    H.reload_parameters(model)
    fresh = hl.Hessian(model, cross_entropy, (x, y))
    names = [n for n, _ in model.named_parameters()]
    dense = dense_hessian(model, cross_entropy, [(x, y)], names)
    v = torch.randn(3, H.dim, dtype=torch.float64)
    assert torch.allclose(H.hvp(v), v @ dense, atol=1e-10)
    assert torch.allclose(G.hvp(v), fresh.gauss_newton().hvp(v), atol=1e-10)
    assert torch.allclose(block.hvp(v[:, -24:]), fresh.block("2").hvp(v[:, -24:]), atol=1e-10)
    top = H.eigenvalues(k=2)
    exact = torch.linalg.eigvalsh(dense).flip(0)[:2]
    assert torch.allclose(top.values, exact, rtol=1e-6)
    after = H.traces(rtol=0.05)
    assert after[0].value == fresh.traces(rtol=0.05)[0].value
    assert after[0].value != before[0].value
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_reload_parameters_refuses_another_model():
    model = torch.nn.Linear(3, 2)
    H = hl.Hessian(model, cross_entropy, (torch.randn(4, 3), torch.randint(0, 2, (4,))))
    with pytest.raises(hl.HesslensInputError, match="not those the operator was built on"):
        H.reload_parameters(torch.nn.Linear(3, 4, bias=False))
    with pytest.raises(hl.HesslensInputError, match="shape"):
        H.reload_parameters(torch.nn.Linear(4, 2))
