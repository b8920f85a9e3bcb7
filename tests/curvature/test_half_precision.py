"""Half-precision networks against their float64 copies: no estimate is reported converged that
is further from the float64 answer than its tolerance, and the warning names the fix."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import hesslens as hl
from hesslens.errors import PrecisionWarning

HALF = [torch.bfloat16, torch.float16]


def _tanh_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _gelu_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(16, 3))


def _data(model_name):
    g = torch.Generator().manual_seed(2)
    shape = (6,) if model_name == "mlp" else (1, 6)
    return torch.randn(64, *shape, generator=g), torch.randint(0, 3, (64,), generator=g)


@pytest.fixture(scope="module", params=[(m, p) for m in ("mlp", "cnn") for p in HALF],
                ids=lambda c: f"{c[0]}-{str(c[1])[6:]}")
def case(request):
    name, precision = request.param
    model = (_tanh_mlp() if name == "mlp" else _gelu_cnn()).to(precision)
    data = _data(name)
    H = hl.Hessian(model, cross_entropy, data)
    # the float64 copy of the very same (rounded) weights is the reference
    dense = hl.Hessian(copy.deepcopy(model).double(), cross_entropy, data).dense()
    return model, data, H, dense, precision


def _check_converged_within_tol(result, ref, tol):
    err = (result.values - ref).abs() / ref.abs()
    assert not bool((err[result.converged] > tol).any()), (err, result.converged, tol)
    return err


def test_top_eigenvalues_are_never_converged_beyond_their_precision(case):
    _, _, H, dense, precision = case
    evals = torch.linalg.eigvalsh(dense).flip(0)
    eps, scale = torch.finfo(precision).eps, float(evals.abs().max())
    for k, seed in ((3, 0), (1, 0), (1, 1), (1, 2)):
        with pytest.warns(PrecisionWarning, match=rf"{str(precision)[6:]}.*dtype=torch\.float32"):
            result = H.eigenvalues(k=k, seed=seed)  # tol=1e-6: beyond half precision
        assert not bool(result.converged.any())
        # the values themselves are as accurate as the products (no early stop)
        assert float((result.values - evals[:k]).abs().max()) <= 2 * eps * scale, seed


@pytest.mark.parametrize("tol", [1e-1, 3e-2, 1e-2, 1e-3])
def test_converged_values_are_within_tol_of_float64(case, tol):
    _, _, H, dense, _ = case
    ref = torch.linalg.eigvalsh(dense).flip(0)[:4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        result = H.eigenvalues(k=4, tol=tol)
    _check_converged_within_tol(result, ref, tol)


def test_a_tolerance_the_precision_can_deliver_converges(case):
    _, _, H, dense, precision = case
    ref = torch.linalg.eigvalsh(dense).flip(0)[:1]
    result = H.eigenvalues(k=1, tol=0.1 if precision == torch.bfloat16 else 0.01)
    assert bool(result.converged.all())
    _check_converged_within_tol(result, ref, 0.1)


def test_traces_include_the_rounding_error(case):
    _, _, H, dense, _ = case
    exact = float(torch.trace(dense))
    full = H.trace()
    assert full.stderr > 0  # exact path or not, rounding is never "stderr 0"
    assert abs(full.value - exact) <= 4 * full.stderr
    full, layers = H.traces()
    offset = 0
    for layer, result in layers.items():
        size = H.block(layer).dim
        ref = float(dense.diagonal()[offset: offset + size].sum())
        offset += size
        assert abs(result.value - ref) <= 4 * result.stderr + 1e-9, layer


def test_density_runs_its_steps_and_finds_the_top(case):
    _, _, H, dense, precision = case
    evals = torch.linalg.eigvalsh(dense)
    eps, scale = torch.finfo(precision).eps, float(evals.abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deflation's eigenvalues are not converged
        spectrum = H.density(n_probes=2, n_steps=20, deflate=0)
    assert np.isclose(spectrum.weights.sum(), 1.0)
    assert abs(spectrum.nodes.max() - float(evals.max())) <= 2 * eps * scale


def test_the_advised_float32_copy_converges_to_the_float64_values(case):
    model, data, _, dense, _ = case
    H32 = hl.Hessian(model, cross_entropy, data, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        result = H32.eigenvalues(k=3)
    ref = torch.linalg.eigvalsh(dense).flip(0)[:3]
    assert bool(result.converged.all())
    assert float(((result.values - ref).abs() / ref.abs()).max()) < 1e-4


@pytest.mark.parametrize("precision", HALF, ids=["bfloat16", "float16"])
def test_half_precision_products_are_summed_in_float32(precision):
    """A half-precision model is analysed as it is: products in its dtype, summed over batches
    in float32 (the operator's vectors are float32, its products' precision the model's)."""
    model = _tanh_mlp().to(precision)
    x, y = _data("mlp")
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]  # eight batches to sum
    H = hl.Hessian(model, cross_entropy, batches)
    assert H.dtype == torch.float32 and H.product_eps == torch.finfo(precision).eps
    dense = hl.Hessian(copy.deepcopy(model).double(), cross_entropy, batches).dense()
    V = torch.randn(3, H.dim, generator=torch.Generator().manual_seed(3))
    got = H.hvp(V)
    assert got.dtype == torch.float32
    want = V.double() @ dense
    # each batch's product is rounded to the model's dtype; the sum adds no more error
    err = float((got.double() - want).norm() / want.norm())
    assert err < 8 * torch.finfo(precision).eps, err
    # a float32 sum of half products is closer than a half-precision sum of them would be
    half_sum = sum(hl.Hessian(model, cross_entropy, [b]).hvp(V).to(precision) * (8 / 64)
                   for b in batches)
    assert err <= float((half_sum.double() - want).norm() / want.norm())
