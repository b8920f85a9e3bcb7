import numpy as np
import pytest
import torch

from hesslens.linalg import (
    CountingOperator,
    MatrixOperator,
    block_traces,
    hutchinson,
    hutchpp,
)
from hesslens.linalg.trace import _low_rank_traces

SLICES = {"a": slice(0, 50), "b": slice(50, 250), "c": slice(250, 280), "d": slice(280, 600)}
SCALES = {"a": 3.0, "b": 1.0, "c": 0.3, "d": 0.1}


@pytest.fixture(scope="module")
def layered():
    """An NN-like matrix D A D whose diagonal blocks ("layers") differ in scale."""
    g = np.random.default_rng(11)
    n = 600
    ev = np.concatenate(
        [[80.0, 40, 25, 12, 8, 5, 3, 2], -g.uniform(0.1, 1.0, 6), g.exponential(0.05, n - 14)]
    )
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    d = np.ones(n)
    for name, sl in SLICES.items():
        d[sl] = SCALES[name]
    A = d[:, None] * ((Q * ev) @ Q.T) * d[None, :]
    return torch.tensor((A + A.T) / 2)


def small(n=60, seed=0, outliers=(20.0, 10.0, 5.0)):
    g = np.random.default_rng(seed)
    ev = np.concatenate([outliers, g.normal(0.5, 0.5, n - len(outliers))])
    Q = np.linalg.qr(g.standard_normal((n, n)))[0]
    return torch.tensor((Q * ev) @ Q.T)


# ------------------------------------------------------------------ hutchinson / hutch++


def test_hutchinson_exact_on_diagonal_and_counts():
    A = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
    op = CountingOperator(MatrixOperator(A))
    r = hutchinson(op, n_hvp=37, batch_size=8)
    assert r.value == pytest.approx(45150.0, rel=1e-14)
    assert r.stderr == pytest.approx(0.0, abs=1e-9)
    assert (r.n_hvp, r.n_samples, r.method, op.n_products) == (37, 37, "hutchinson", 37)


@pytest.mark.parametrize("fn", [hutchinson, hutchpp])
def test_exact_when_dim_is_small(fn):
    A = small(30)
    op = CountingOperator(MatrixOperator(A))
    r = fn(op, n_hvp=30)
    assert r.method == "exact" and r.stderr == 0.0 and r.n_hvp == 30 == op.n_products
    assert r.value == pytest.approx(float(torch.trace(A)), abs=1e-12)


@pytest.mark.parametrize(
    ("fn", "n_hvp", "distribution"),
    [(hutchinson, 20, "rademacher"), (hutchinson, 20, "gaussian"), (hutchpp, 30, "rademacher")],
)
def test_unbiased_and_honest_stderr(fn, n_hvp, distribution):
    """Over 200 seeds: the mean error is within noise, the stderr matches the spread of the
    estimates, and the z-scores have standard deviation ~1."""
    A = small(60, outliers=(4.0, 3.0))
    exact = float(torch.trace(A))
    runs = [fn(A, n_hvp=n_hvp, distribution=distribution, seed=s) for s in range(200)]
    assert all(r.n_hvp == n_hvp for r in runs)
    err = np.array([r.value - exact for r in runs])
    se = np.array([r.stderr for r in runs])
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(200)  # unbiased
    assert 0.8 < err.std() / np.sqrt(np.mean(se**2)) < 1.25  # honest stderr
    z = err / se
    assert abs(z.mean()) < 0.3
    assert 0.8 < z.std() < 1.35  # t-distributed: sd sqrt(dof / (dof - 2)) ~ 1.06 - 1.13


def test_hutchpp_beats_hutchinson_with_outliers(layered):
    A = layered
    exact = float(torch.trace(A))
    e_h = [hutchinson(A, n_hvp=60, seed=s).value - exact for s in range(20)]
    e_pp = [hutchpp(A, n_hvp=60, seed=s).value - exact for s in range(20)]
    assert np.sqrt(np.mean(np.square(e_pp))) < 0.5 * np.sqrt(np.mean(np.square(e_h)))
    r = hutchpp(A, n_hvp=60)
    assert (r.method, r.n_samples, r.n_hvp) == ("hutch++", 20, 60)


def test_bad_arguments():
    A = small(60)
    with pytest.raises(ValueError):
        hutchinson(A, n_hvp=0)
    with pytest.raises(ValueError, match="rademacher"):
        hutchinson(A, n_hvp=5, distribution="uniform")
    with pytest.raises(ValueError, match="gaussian"):
        hutchpp(A, n_hvp=500, distribution="normal")  # checked before the exact path
    with pytest.raises(ValueError, match="rademacher"):
        block_traces(A, distribution="uniform")
    with pytest.raises(ValueError):
        hutchpp(A, batch_size=0)


# ------------------------------------------------------------------ block_traces


def test_low_rank_formula_against_dense():
    g = torch.Generator().manual_seed(0)
    n = 40
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2
    U = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=torch.float64))[0].T
    P = U.T @ U
    AQ = P @ A + A @ P - P @ A @ P
    segs = [(0, 7), (7, 30), (30, 40), (12, 12)]
    got = _low_rank_traces(U, U @ A, segs)
    want = [float(AQ.diagonal()[a:b].sum()) for a, b in segs]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_block_traces_accuracy(layered):
    A = layered
    op = CountingOperator(MatrixOperator(A))
    used = []
    full, blocks = block_traces(op, SLICES, progress=used.append)
    diag = A.diagonal()
    exact_full = float(diag.sum())
    assert list(blocks) == list(SLICES)
    assert full.value == sum(b.value for b in blocks.values())  # exactly
    assert abs(full.value - exact_full) <= 0.02 * abs(exact_full)
    assert abs(full.value - exact_full) <= 4 * full.stderr
    assert full.stderr <= 0.01 * abs(full.value)
    for name, sl in SLICES.items():
        exact = float(diag[sl].sum())
        est = blocks[name]
        assert abs(est.value - exact) <= 4 * est.stderr, name
        assert abs(est.value - exact) <= 0.05 * abs(exact), name
        assert (est.n_hvp, est.n_samples, est.method) == (full.n_hvp, full.n_samples, "hutch++")
    assert full.n_hvp == op.n_products < 1000
    assert used == sorted(used) and used[-1] == full.n_hvp


def test_block_traces_deflation_beats_hutchinson_at_equal_budget(layered):
    A = layered
    kw = {"rtol": 0.0, "max_hvp": 200}
    full, blocks = block_traces(A, SLICES, **kw)
    full0, blocks0 = block_traces(A, SLICES, sketch_rank=0, **kw)
    assert full.n_hvp == full0.n_hvp == 200
    assert full0.method == "hutchinson" and full0.n_samples == 200 and full.n_samples == 168
    assert full.stderr < 0.3 * full0.stderr
    assert full.stderr < 0.3 * hutchinson(A, n_hvp=200).stderr
    for name in ("a", "b"):  # the blocks that hold the outliers
        assert blocks[name].stderr < 0.5 * blocks0[name].stderr


def test_block_traces_exact_for_low_rank():
    """When the sketch captures the whole range, the low-rank part is everything."""
    g = torch.Generator().manual_seed(1)
    B = torch.randn(300, 8, generator=g, dtype=torch.float64)
    A = B @ torch.diag(torch.linspace(-2.0, 5.0, 8, dtype=torch.float64)) @ B.T
    slices = {"x": slice(0, 100), "y": slice(100, 300)}
    full, blocks = block_traces(A, slices, sketch_rank=16)
    assert full.value == pytest.approx(float(torch.trace(A)), rel=1e-10)
    for name, sl in slices.items():
        assert blocks[name].value == pytest.approx(float(A.diagonal()[sl].sum()), rel=1e-10)
        assert blocks[name].stderr < 1e-8
    # sketch, Z, then min_probes rounded to a batch; A has rank 7 (one of its 8 weights is 0):
    # the sketch basis keeps the 7 directions A S spans, so Z takes 7 products, not 16
    assert full.n_hvp == 16 + 7 + 32


def test_block_traces_exact_path_for_tiny_operators():
    A = small(40)
    op = CountingOperator(MatrixOperator(A))
    full, blocks = block_traces(op, {"p": slice(0, 10), "q": slice(10, 40)})
    assert full.method == "exact" and full.stderr == 0.0 and full.n_hvp == 40
    assert op.n_products == 40
    assert full.value == pytest.approx(float(torch.trace(A)), abs=1e-12)
    assert blocks["p"].value == pytest.approx(float(A.diagonal()[:10].sum()), abs=1e-12)
    assert full.value == blocks["p"].value + blocks["q"].value


def test_block_traces_partial_cover_counts_everything(layered):
    A = layered
    slices = {"first": slice(0, 50), "last": slice(280, None), "empty": slice(10, 10)}
    full, blocks = block_traces(A, slices)
    exact = float(A.diagonal().sum())
    assert abs(full.value - exact) <= 4 * full.stderr
    assert blocks["empty"].value == 0.0 and blocks["empty"].stderr == 0.0
    assert abs(blocks["first"].value - float(A.diagonal()[:50].sum())) <= 4 * blocks["first"].stderr
    assert blocks["first"].value + blocks["last"].value != pytest.approx(full.value, rel=0.05)
    full_only, none = block_traces(A)
    assert none == {} and abs(full_only.value - exact) <= 4 * full_only.stderr


def test_block_traces_reproducible(layered):
    a = block_traces(layered, SLICES, seed=3)
    b = block_traces(layered, SLICES, seed=3)
    assert a[0] == b[0] and a[1] == b[1]


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        ({"a": slice(0, 10), "b": slice(5, 20)}, "overlap"),
        ({"a": slice(0, 700)}, "inside"),
        ({"a": slice(-5, None)}, "inside"),
        ({"a": slice(0, 10, 2)}, "step"),
        ({"a": (0, 10)}, "slice"),
    ],
)
def test_block_traces_rejects_bad_slices(layered, slices, match):
    with pytest.raises(ValueError, match=match):
        block_traces(layered, slices)


def test_block_traces_rejects_small_budget(layered):
    with pytest.raises(ValueError, match="max_hvp"):
        block_traces(layered, max_hvp=50)
    with pytest.raises(ValueError, match="min_probes"):
        block_traces(layered, min_probes=1)


# ------------------------------------------------------------------ precision and memory


def test_float32_operator_agrees_with_float64_to_rounding(layered):
    """A float32 operator's estimates (float32 probes and sketch: half the memory, float64
    sums) agree with the float64 ones from the same probes to float32 rounding."""
    A = layered
    f32, b32 = block_traces(MatrixOperator(A.float()), SLICES, rtol=0.0, max_hvp=200)
    f64, b64 = block_traces(A, SLICES, rtol=0.0, max_hvp=200)
    assert f32.value == pytest.approx(f64.value, rel=1e-5)
    assert f32.stderr == pytest.approx(f64.stderr, rel=1e-3)
    for name in SLICES:
        assert b32[name].value == pytest.approx(b64[name].value, rel=1e-4, abs=1e-4)
    for fn, n_hvp in ((hutchinson, 50), (hutchpp, 60)):
        r32, r64 = fn(MatrixOperator(A.float()), n_hvp=n_hvp), fn(A, n_hvp=n_hvp)
        assert r32.value == pytest.approx(r64.value, rel=1e-5)


def test_batches_change_calls_not_the_estimate(layered):
    A = layered
    for fn, n_hvp in ((hutchinson, 37), (hutchpp, 61)):
        a, b = fn(A, n_hvp=n_hvp, batch_size=16), fn(A, n_hvp=n_hvp, batch_size=5)
        assert a.n_hvp == b.n_hvp == n_hvp
        assert a.value == pytest.approx(b.value, rel=1e-12)
        assert a.stderr == pytest.approx(b.stderr, rel=1e-10)


def test_sketch_basis_is_orthonormal_and_spans_the_range():
    from hesslens.linalg.lanczos import _orthonormalize_rows_

    g = torch.Generator().manual_seed(2)
    B = torch.randn(5, 300, generator=g, dtype=torch.float64)
    Y = torch.cat([B, B[:2] * 3.0 - B[2:4]])  # 7 rows of rank 5
    P_ref = torch.linalg.qr(B.T)[0]
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        U = _orthonormalize_rows_(Y.to(dtype).clone())
        assert U.shape == (5, 300)
        U = U.double()
        torch.testing.assert_close(U @ U.T, torch.eye(5, dtype=torch.float64), atol=tol, rtol=0)
        torch.testing.assert_close(U.T @ U, P_ref @ P_ref.T, atol=tol, rtol=0)


def test_block_traces_continue_the_probe_sequence_of_an_earlier_run(layered):
    # a run that stops on the full trace alone, then one with the per-block rule continuing
    # from its state: the same result as one fresh run with the per-block rule, for only the
    # products the first run did not spend
    from hesslens.linalg import TraceState

    state = TraceState()
    first_op = CountingOperator(MatrixOperator(layered))
    full_only, _ = block_traces(first_op, SLICES, rtol=0.005, max_hvp=2000, seed=5,
                                block_floor=1e300, state=state)
    assert state.basis is not None  # small: the sketch basis is kept
    later_op = CountingOperator(MatrixOperator(layered))
    full, blocks = block_traces(later_op, SLICES, rtol=0.005, max_hvp=2000, seed=5, state=state)
    fresh_full, fresh_blocks = block_traces(MatrixOperator(layered), SLICES, rtol=0.005,
                                            max_hvp=2000, seed=5)
    assert full_only.n_hvp < fresh_full.n_hvp  # the blocks needed more probes
    assert (full.value, full.stderr, full.n_hvp) == (
        fresh_full.value, fresh_full.stderr, fresh_full.n_hvp)
    for name, r in fresh_blocks.items():
        assert (blocks[name].value, blocks[name].stderr) == (r.value, r.stderr)
    assert later_op.n_products == fresh_full.n_hvp - full_only.n_hvp


def test_block_traces_resumed_without_a_kept_basis_draw_the_same_sketch(layered, monkeypatch):
    # a large sketch basis is not kept: the resumed run draws the same sketch again
    import hesslens.linalg.trace as trace_module
    from hesslens.linalg import TraceState

    monkeypatch.setattr(trace_module, "WORK_BYTES", 1)
    state = TraceState()
    full_only, _ = block_traces(layered, SLICES, rtol=0.005, max_hvp=2000, seed=5,
                                block_floor=1e300, state=state)
    assert state.basis is None
    later_op = CountingOperator(MatrixOperator(layered))
    full, blocks = block_traces(later_op, SLICES, rtol=0.005, max_hvp=2000, seed=5, state=state)
    monkeypatch.undo()
    fresh_full, fresh_blocks = block_traces(layered, SLICES, rtol=0.005, max_hvp=2000, seed=5,
                                            batch_size=1)
    # WORK_BYTES=1 also made the batches single probes: compare with a fresh batch_size=1 run
    np.testing.assert_allclose(full.value, fresh_full.value, rtol=1e-12)
    for name, r in fresh_blocks.items():
        np.testing.assert_allclose(blocks[name].value, r.value, rtol=1e-12, atol=1e-12)
    assert later_op.n_products == fresh_full.n_hvp - full_only.n_hvp + 16
