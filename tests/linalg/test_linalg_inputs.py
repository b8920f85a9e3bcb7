"""Bad input to the estimators gets an error that names it: seeds out of every library's range,
and operators below their dtype's normal range (subnormal curvature)."""

import numpy as np
import pytest
import torch

from hesslens.errors import CurvatureUnderflowError, HesslensInputError
from hesslens.linalg import (
    MatrixOperator,
    block_traces,
    eigsh,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
)
from hesslens.linalg.probes import generator


def spd(n=80, seed=0, dtype=torch.float64):
    g = np.random.default_rng(seed)
    ev = np.concatenate([[9.0, 5.0, 3.0], g.uniform(0.1, 1.0, n - 3)])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    return torch.tensor((Q * ev) @ Q.T, dtype=dtype)


ESTIMATORS = {
    "eigsh": lambda op, seed=0: eigsh(op, k=2, seed=seed),
    "lanczos": lambda op, seed=0: lanczos(op, 10, seed=seed),
    "hutchinson": lambda op, seed=0: hutchinson(op, n_hvp=20, seed=seed),
    "hutchinson-exact": lambda op, seed=0: hutchinson(op, n_hvp=500, seed=seed),
    "hutchpp": lambda op, seed=0: hutchpp(op, n_hvp=30, seed=seed),
    "block_traces": lambda op, seed=0: block_traces(op, {"a": slice(0, 40)}, seed=seed,
                                                    rtol=0.1, max_hvp=100, sketch_rank=4),
    "block_traces-exact": lambda op, seed=0: block_traces(op, seed=seed, min_probes=100,
                                                          max_hvp=200),
    "slq": lambda op, seed=0: slq(op, n_probes=2, n_steps=10, seed=seed),
    "slq-none": lambda op, seed=0: slq(op, n_probes=2, n_steps=10, seed=seed, reorth="none"),
}


@pytest.mark.parametrize("seed", [2**70, 2**32, -1, 1.5, True, "0"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_seed_outside_every_library_s_range_is_refused_by_name(name, seed):
    with pytest.raises(HesslensInputError, match=r"seed must be an integer in \[0, 4294967295\]"):
        ESTIMATORS[name](MatrixOperator(spd()), seed=seed)


def test_the_largest_seed_is_accepted_and_differs_from_zero():
    A = MatrixOperator(spd())
    assert generator(2**32 - 1).initial_seed() == 2**32 - 1
    assert hutchinson(A, n_hvp=20, seed=2**32 - 1).value != hutchinson(A, n_hvp=20).value


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_curvature_below_float32_s_normal_range_is_named(name):
    tiny = MatrixOperator((spd() * 1e-40).float())  # float32 subnormals
    with pytest.raises(CurvatureUnderflowError, match=r"below the normal range of float32.*"
                                                      r"scale the loss up.*float64"):
        ESTIMATORS[name](tiny)


def test_the_same_curvature_in_float64_gives_the_right_result():
    A = spd() * 1e-40  # normal in float64
    res = eigsh(A, k=2)
    np.testing.assert_allclose(res.values.numpy(), [9e-40, 5e-40], rtol=1e-8)
    assert hutchinson(A, n_hvp=500).value == pytest.approx(float(torch.trace(A)), rel=1e-12)


def test_a_zero_operator_is_not_an_underflow():
    zero = MatrixOperator(torch.zeros(50, 50))
    assert eigsh(zero, k=1).values.tolist() == [0.0]
    assert block_traces(zero, rtol=0.1)[0].value == 0.0


def test_small_products_of_a_normal_operator_are_not_an_underflow():
    # float16's smallest normal number is 6e-5: products along the small eigenvalues of an
    # operator of normal size are below it, which is rounding, not an underflow
    ev = torch.cat([torch.tensor([1.0]), torch.full((63,), 1e-3)])
    Q = torch.linalg.qr(torch.randn(64, 64, generator=generator(0), dtype=torch.float64))[0]
    A = MatrixOperator(((Q * ev) @ Q.T).half())
    top = eigsh(A, k=1, tol=1e-2)
    spectrum, _ = slq(A, n_probes=2, n_steps=8, deflate=top)  # the bulk alone: small products
    assert abs(spectrum.nodes.max() - 1.0) < 1e-2
    with pytest.raises(CurvatureUnderflowError, match="float16"):
        eigsh(MatrixOperator(((Q * ev) @ Q.T * 1e-5).half()), k=1)
