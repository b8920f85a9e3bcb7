import importlib

import numpy as np
import pytest
import torch
from scipy.linalg import eigh_tridiagonal

from hesslens.errors import BudgetWarning
from hesslens.linalg import CountingOperator, MatrixOperator, eigsh, lanczos


def reference(ev: np.ndarray, k: int, which: str) -> np.ndarray:
    """The k wanted eigenvalues, sorted descending."""
    if which == "LA":
        sel = ev[-k:]
    elif which == "SA":
        sel = ev[:k]
    else:
        sel = ev[np.argsort(-np.abs(ev), kind="stable")[:k]]
    return np.sort(sel)[::-1]


# ---------------------------------------------------------------- lanczos


def test_lanczos_basis_orthonormal_and_tridiagonal(make_nn_like):
    A, _ = make_nn_like(300)
    run = lanczos(MatrixOperator(A), 60, seed=1)
    Q = run.basis
    assert Q.shape == (60, 300) and Q.dtype == torch.float64
    eye = torch.eye(60, dtype=torch.float64)
    assert float((Q @ Q.T - eye).abs().max()) < 1e-13
    T = Q @ A @ Q.T
    assert float((T - torch.as_tensor(run.tridiagonal())).abs().max()) < 1e-11
    assert run.n_hvp == 60 and run.num_steps == 60 and not run.invariant
    assert run.alpha.dtype == np.float64 and run.beta.shape == (59,)


def test_lanczos_float32_operator_keeps_float64_basis(make_nn_like):
    A, _ = make_nn_like(200)
    op = CountingOperator(MatrixOperator(A.float()))
    run = lanczos(op, 50)
    assert run.basis.dtype == torch.float64 and op.n_products == 50
    eye = torch.eye(50, dtype=torch.float64)
    assert float((run.basis @ run.basis.T - eye).abs().max()) < 1e-13


def test_lanczos_stops_on_invariant_subspace():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0] * 10, dtype=torch.float64))
    run = lanczos(A, 20)
    assert run.invariant and run.num_steps == 3 and run.residual_norm < 1e-12
    theta, _ = run.ritz()
    np.testing.assert_allclose(theta, [1.0, 2.0, 3.0], atol=1e-12)


def test_lanczos_never_exceeds_dim_and_start_vector():
    A = torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64))
    run = lanczos(A, 50)
    assert run.num_steps == 7 and run.invariant
    np.testing.assert_allclose(np.sort(run.ritz()[0]), np.arange(1.0, 8.0), atol=1e-12)
    start = torch.ones(7, dtype=torch.float64)
    run2 = lanczos(A, 3, start=start)
    torch.testing.assert_close(run2.basis[0], start / start.norm())
    with pytest.raises(ValueError):
        lanczos(A, 3, start=torch.ones(6))
    with pytest.raises(ValueError):
        lanczos(A, 0)


# ---------------------------------------------------------------- eigsh


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_eigsh_matches_eigh(make_nn_like, nn_like_eigh, which, k):
    A, _ = make_nn_like(400, seed=1)
    ev, vecs = nn_like_eigh(400, seed=1)
    op = CountingOperator(MatrixOperator(A))
    res = eigsh(op, k=k, which=which)
    ref = reference(ev, k, which)
    vals = res.values.numpy()
    assert res.values.dtype == torch.float64 and res.values.shape == (k,)
    assert np.all(np.diff(vals) <= 0)
    np.testing.assert_allclose(vals, ref, rtol=1e-5)
    assert bool(res.converged.all())
    assert res.n_hvp == op.n_products == res.n_steps
    assert res.which == which
    # the error bounds hold
    assert np.all(np.abs(vals - ref) <= res.bounds.numpy() + 1e-12)
    # Ritz vectors: unit, their true residual is the reported one
    Y = res.vectors
    assert Y.shape == (k, 400)
    torch.testing.assert_close(Y.norm(dim=1), torch.ones(k, dtype=torch.float64))
    true_resid = (Y @ A - res.values[:, None] * Y).norm(dim=1)
    assert float((true_resid - res.residuals).abs().max()) < 1e-9
    if which != "SA":  # the outliers are well separated: the vectors are accurate
        idx = np.argsort(-ev)[:k]
        cos = np.abs(np.sum(Y.numpy() * vecs[:, idx].T, axis=1))
        assert np.all(cos > 1 - 1e-6)


@pytest.mark.parametrize(("dim", "seed"), [(300, 0), (1000, 1), (2000, 2)])
def test_eigsh_top5_nn_like_default_settings(make_nn_like, dim, seed):
    A, ev = make_nn_like(dim, seed=seed)
    if dim < 1000:  # else the construction's eigenvalues (exact up to rounding)
        ev = np.linalg.eigvalsh(A.numpy())
    res = eigsh(A)
    rel = np.abs(res.values.numpy() - ev[::-1][:5]) / np.abs(ev[::-1][:5])
    assert rel.max() <= 1e-5
    assert bool(res.converged.all()) and res.n_hvp < 40


def test_eigsh_stops_no_later_than_the_residual_test(make_nn_like):
    """min(r, r^2/gap), with one guard value beyond the k asked for, stops no later than the
    ARPACK test r <= tol |theta| would: no wasted products."""
    A, _ = make_nn_like(1000, seed=1)
    tol = 1e-6
    seen = []
    res = eigsh(A, k=1, tol=tol, callback=lambda step, th, b: seen.append((step, b[0] / th[0])))
    assert [s for s, _ in seen] == list(range(1, res.n_steps + 1))
    assert seen[-1][1] <= tol
    run = lanczos(A, 40, seed=0)  # same start vector as eigsh(seed=0)
    betas = [*run.beta, run.residual_norm]
    for m in range(1, 41):
        theta, S = eigh_tridiagonal(run.alpha[:m], run.beta[: m - 1])
        if abs(betas[m - 1] * S[-1, -1]) <= tol * abs(theta[-1]):
            break
    assert res.n_hvp <= m


def test_eigsh_errors():
    A = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k=7.*dim=6"):
        eigsh(A, k=7)
    with pytest.raises(ValueError, match="k=0"):
        eigsh(A, k=0)
    with pytest.raises(ValueError, match="which"):
        eigsh(A, k=1, which="LR")
    with pytest.raises(ValueError, match="max_steps"):
        eigsh(A, k=3, max_steps=2)
    with pytest.raises(ValueError, match="tol"):
        eigsh(A, k=1, tol=0.0)


@pytest.mark.parametrize("dim", [1, 2, 4, 7])
def test_eigsh_exhausts_tiny_operators_exactly(dim):
    g = torch.Generator().manual_seed(dim)
    B = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2
    op = CountingOperator(MatrixOperator(A))
    res = eigsh(op, k=dim)
    ev = np.linalg.eigvalsh(A.numpy())[::-1]
    np.testing.assert_allclose(res.values.numpy(), ev, rtol=1e-10, atol=1e-12)
    assert res.n_hvp == op.n_products == dim
    assert bool(res.converged.all()) and float(res.bounds.max()) == 0.0


def test_eigsh_repeated_eigenvalues_are_found_with_multiplicity():
    d = torch.tensor([5.0, 5.0, 5.0, 1.0] + [0.0] * 40, dtype=torch.float64)
    res = eigsh(torch.diag(d), k=3)
    np.testing.assert_allclose(res.values.numpy(), [5.0, 5.0, 5.0], rtol=1e-12)
    assert bool(res.converged.all()) and res.n_hvp < 15
    res = eigsh(torch.eye(30, dtype=torch.float64), k=4)
    np.testing.assert_allclose(res.values.numpy(), np.ones(4), rtol=1e-12)
    assert res.n_hvp == 5
    V = res.vectors
    torch.testing.assert_close(V @ V.T, torch.eye(4, dtype=torch.float64))
    zero = eigsh(torch.zeros(10, 10, dtype=torch.float64), k=2)
    assert float(zero.values.abs().max()) == 0.0 and bool(zero.converged.all())


def test_eigsh_zero_eigenvalue_converges():
    """SA on a PSD matrix with an eigenvalue 0: the absolute floor lets it converge."""
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))[0]
    lam = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(1.0, 10.0, 149)])
    A = (V * lam) @ V.T
    res = eigsh(A, k=2, which="SA")
    np.testing.assert_allclose(res.values.numpy(), [1.0, 0.0], atol=1e-9)
    assert bool(res.converged.all())
    lm = eigsh(A, k=2, which="LM")
    np.testing.assert_allclose(lm.values.numpy(), [10.0, lam[-2].item()], rtol=1e-6)


def test_eigsh_multiplicity_limit_of_a_single_krylov_space():
    """A repeated eigenvalue inside a space that is not invariant is found once (as by any
    single-vector method): documented, and the result is still a set of true eigenvalues."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(200, 20, generator=g, dtype=torch.float64)
    A = B @ B.T  # 180 zero eigenvalues
    res = eigsh(A, k=3, which="SA")
    ev = np.linalg.eigvalsh(A.numpy())
    assert abs(res.values[-1].item()) < 1e-9
    for v in res.values.tolist():
        assert np.min(np.abs(ev - v)) <= 1e-6 * abs(ev).max()


def test_eigsh_reproducible_and_seed_independent(make_nn_like):
    A, _ = make_nn_like(300)
    a, b = eigsh(A, k=4, seed=7), eigsh(A, k=4, seed=7)
    assert torch.equal(a.values, b.values) and a.n_hvp == b.n_hvp
    assert torch.equal(a.vectors, b.vectors)
    c = eigsh(A, k=4, seed=8)
    torch.testing.assert_close(a.values, c.values, rtol=1e-5, atol=0)


def test_eigsh_float32_operator(make_nn_like):
    A, ev = make_nn_like(500, seed=4)
    res = eigsh(MatrixOperator(A.float()), k=5, return_vectors=True)
    np.testing.assert_allclose(res.values.numpy(), ev[::-1][:5], rtol=1e-5)
    assert res.vectors.dtype == torch.float32
    assert eigsh(A, k=2, return_vectors=False).vectors is None


def test_eigsh_max_steps_budget(make_nn_like):
    A, _ = make_nn_like(300)
    with pytest.warns(BudgetWarning, match="max_steps=6"):
        res = eigsh(A, k=5, max_steps=6, tol=1e-12)
    assert res.n_hvp == 6 and not bool(res.converged.all())
    assert res.values.shape == (5,)


def test_eigsh_near_degenerate_top_pair():
    """Top eigenvalues 1 and 1 - 2e-5 above a bulk in [0, 0.9]. k=2 has a guard value and
    resolves the pair to tol; k=1 (no guard, by design) may stop on a value inside the pair,
    but never further off than the pair's spacing."""
    rng = np.random.default_rng(4)
    n = 200
    ev = np.concatenate([[1.0, 1.0 - 2e-5], np.linspace(0.0, 0.9, n - 2)])
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = torch.tensor((Q * ev) @ Q.T)
    A = (A + A.T) / 2
    for seed in range(5):
        pair = eigsh(A, k=2, tol=1e-7, seed=seed)
        assert bool(pair.converged.all())
        np.testing.assert_allclose(pair.values.numpy(), ev[:2], rtol=0, atol=1e-6)
        top = eigsh(A, k=1, tol=1e-7, seed=seed)
        assert 1.0 - 2.5e-5 <= float(top.values[0]) <= 1.0 + 1e-12


def test_eigsh_float32_smallest_below_a_large_outlier():
    """float32, one eigenvalue 1e3 above an N(0, 1) bulk, smallest wanted: the outlier's huge
    gap must not make an unconverged bulk value look converged (it did after 2 steps)."""
    rng = np.random.default_rng(0)
    n = 400
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.concatenate([[1e3], rng.normal(0, 1.0, n - 1)])
    A = torch.tensor(((Q * ev) @ Q.T + ((Q * ev) @ Q.T).T) / 2, dtype=torch.float32)
    res = eigsh(MatrixOperator(A), k=1, which="SA")
    assert bool(res.converged.all())
    assert abs(float(res.values[0]) - ev.min()) <= 1e-3 * abs(ev.min())


# ---------------------------------------------------------------- eigsh, restarted


@pytest.mark.parametrize(("which", "k"), [("LA", 1), ("LA", 5), ("LM", 3), ("SA", 1), ("SA", 3)])
def test_restarted_eigsh_matches_eigh(make_nn_like, which, k):
    """A basis of 12 vectors (thick restarts) finds what the unrestarted run finds."""
    A, _ = make_nn_like(1000, seed=1)
    ev = np.linalg.eigvalsh(A.numpy())
    op = CountingOperator(MatrixOperator(A))
    res = eigsh(op, k=k, which=which, ncv=12, max_steps=600)
    ref = reference(ev, k, which)
    np.testing.assert_allclose(res.values.numpy(), ref, rtol=1e-5)
    assert bool(res.converged.all()) and res.n_hvp == op.n_products
    assert np.all(np.abs(res.values.numpy() - ref) <= res.bounds.numpy() + 1e-12)
    Y = res.vectors
    torch.testing.assert_close(Y.norm(dim=1), torch.ones(k, dtype=torch.float64))
    true_resid = (Y @ A - res.values[:, None] * Y).norm(dim=1)
    assert float((true_resid - res.residuals).abs().max()) < 1e-8
    if which == "SA":
        assert res.n_hvp > 12  # it did restart


@pytest.mark.parametrize("head", [0, 4])
def test_restart_keeps_an_orthonormal_basis_and_the_projection(head):
    """After a thick restart Q stays orthonormal and Q A Q^T is the arrowhead-tridiagonal T the
    engine keeps (the identity the Ritz values and residuals rest on); also with the basis in
    two allocations (``head`` rows for the Ritz vectors returned, the rest)."""
    from hesslens.linalg.lanczos import _compress, _RestartedLanczos

    g = torch.Generator().manual_seed(3)
    B = torch.randn(200, 200, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2
    start = torch.randn(1, 200, generator=g, dtype=torch.float64)
    eng = _RestartedLanczos(MatrixOperator(A), start, 10, 100, torch.float64, A.device,
                            head=head)
    for _ in range(3):  # three restarts
        while eng.m < 10:
            eng.step()
        blocks = eng.blocks()
        _compress(eng, blocks, np.concatenate([b[2] for b in blocks]), "LA", 4)
        assert eng.basis.shape == (11, 200)
        eng.step()
        eng.step()
        m = eng.m
        Q = eng.basis.rows(0, m)
        torch.testing.assert_close(Q @ Q.T, torch.eye(m, dtype=torch.float64), atol=1e-12,
                                   rtol=0)
        T = (Q @ A @ Q.T).numpy()
        np.testing.assert_allclose(T, eng.T[:m, :m], atol=1e-10)


def test_restarted_eigsh_counts_equal_unrestarted_while_the_basis_suffices(make_nn_like):
    A, _ = make_nn_like(2000, seed=2)
    a = eigsh(A, k=5, ncv=2000)
    b = eigsh(A, k=5, ncv=a.n_hvp)  # the basis fills exactly when it converges
    c = eigsh(A, k=5)  # default: a 2000 x 151 float64 basis is under 64 MiB: no restart
    assert a.n_hvp == b.n_hvp == c.n_hvp
    np.testing.assert_allclose(a.values.numpy(), b.values.numpy(), rtol=1e-12)


def test_restarted_eigsh_repeated_eigenvalues_and_float32_basis(make_nn_like):
    d = torch.tensor([5.0, 5.0, 5.0, 1.0] + [0.0] * 40, dtype=torch.float64)
    res = eigsh(torch.diag(d), k=3, ncv=5)
    np.testing.assert_allclose(res.values.numpy(), [5.0, 5.0, 5.0], rtol=1e-12)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.vectors @ res.vectors.T, torch.eye(3, dtype=torch.float64))
    A, ev = make_nn_like(500, seed=4)
    op = MatrixOperator(A.float())
    f32 = eigsh(op, k=5, ncv=12)  # default basis: float32 for a float32 operator
    f64 = eigsh(op, k=5, ncv=12, basis_dtype=torch.float64, basis_device="cpu")
    np.testing.assert_allclose(f32.values.numpy(), ev[::-1][:5], rtol=1e-5)
    np.testing.assert_allclose(f64.values.numpy(), ev[::-1][:5], rtol=1e-5)
    assert f32.vectors.dtype == torch.float32 and bool(f32.converged.all())


def test_eigsh_ncv_errors():
    A = torch.eye(30, dtype=torch.float64)
    with pytest.raises(ValueError, match="ncv"):
        eigsh(A, k=5, ncv=6)
    with pytest.raises(ValueError, match="basis_dtype"):
        eigsh(A, k=1, basis_dtype=torch.int64)


def test_float32_basis_is_accurate_on_a_long_operator():
    """A float32 basis over 2e5 entries: the Gram-Schmidt coefficients accumulate in float64.
    With float32 dot products the Ritz values came out 1.3e-5 off (49.99937 for 50) while
    their vectors were right."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    top = torch.tensor([50.0, 31.0, 22.0, 15.0, 11.0, 8.5])
    d = torch.cat([top, torch.rand(n - 6, generator=g) * 0.5 - 0.05])[torch.randperm(n,
                                                                                   generator=g)]

    class Diagonal:
        dim, dtype, device = n, torch.float32, torch.device("cpu")

        def matmat(self, V):
            return V * d

    res = eigsh(Diagonal(), k=5, ncv=20)
    assert res.vectors.dtype == torch.float32 and bool(res.converged.all())
    np.testing.assert_allclose(res.values.numpy(), top[:5].numpy(), rtol=2e-7)
    rayleigh = ((res.vectors.double() ** 2) * d.double()).sum(dim=1)
    np.testing.assert_allclose(rayleigh.numpy(), top[:5].numpy(), rtol=2e-7)


def test_basis_rows_never_exceed_the_steps(monkeypatch):
    """ncv=dim (no restart) on a long operator allocates max_steps + 1 rows, not dim + 1."""
    lz = importlib.import_module("hesslens.linalg.lanczos")
    shapes = []
    init = lz._RestartedLanczos.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        shapes.append(tuple(self.basis.shape))

    monkeypatch.setattr(lz._RestartedLanczos, "__init__", spy)
    n = 50_000
    d = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    A = type("Diagonal", (), {"dim": n, "dtype": torch.float64, "device": torch.device("cpu"),
                              "matmat": lambda self, V: V * d})()
    with pytest.warns(BudgetWarning):
        eigsh(A, k=1, ncv=n, max_steps=10, tol=1e-3)
    eigsh(A, k=1, tol=1e-3)  # default: 101 x 5e4 float64 = 40 MB, no restart
    assert shapes == [(11, n), (101, n)]


def test_ritz_vectors_are_formed_in_the_basis_without_another_allocation(monkeypatch):
    """The k vectors returned are the basis's first rows, formed in place, and the other rows
    are freed: returning them adds no k vectors to the peak (a large operator, restarted)."""
    lz = importlib.import_module("hesslens.linalg.lanczos")
    made = []
    init = lz._Basis.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(lz._Basis, "__init__", spy)
    g = torch.Generator().manual_seed(0)
    n = 3000
    d = torch.rand(n, generator=g, dtype=torch.float64)
    d[:4] = torch.tensor([9.0, 7.0, 5.0, 4.5], dtype=torch.float64)
    A = type("Diagonal", (), {"dim": n, "dtype": torch.float64, "device": torch.device("cpu"),
                              "matmat": lambda self, V: V * d})()
    res = eigsh(A, k=4, ncv=8, tol=1e-10)
    assert res.n_hvp > 8  # it restarted
    (basis,) = made
    assert res.vectors.data_ptr() == basis.head.data_ptr() and basis.tail.numel() == 0
    np.testing.assert_allclose(res.values.numpy(), [9.0, 7.0, 5.0, 4.5], rtol=1e-10)
    exact = torch.eye(n, dtype=torch.float64)[:4]
    overlap = (res.vectors @ exact.T).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
