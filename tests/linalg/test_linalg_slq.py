import numpy as np
import pytest
import torch

from hesslens.linalg import CountingOperator, MatrixOperator, Spectrum, eigsh, random_probes, slq


def random_sym(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (B + B.T) / 2


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_full_steps_reproduce_every_moment(distribution):
    """With n_steps >= dim the quadrature is exact: nodes are the eigenvalues and the
    measure's moments are the probes' v^T A^p v / v^T v."""
    n, n_probes = 40, 5
    A = random_sym(n)
    ev = np.linalg.eigvalsh(A.numpy())
    op = CountingOperator(MatrixOperator(A))
    spec, n_hvp = slq(op, n_probes=n_probes, n_steps=100, seed=3, distribution=distribution)
    assert n_hvp == op.n_products == n_probes * n
    assert len(spec) == n_probes * n
    for run_nodes in spec.nodes.reshape(n, n_probes).T:  # every eigenvalue, n_probes times
        np.testing.assert_allclose(np.unique(np.round(run_nodes, 9)).size, n)
    np.testing.assert_allclose(spec.nodes[::n_probes], ev, atol=1e-10)
    V = random_probes(n_probes, n, distribution, torch.Generator().manual_seed(3), torch.float64)
    V = V / V.norm(dim=1, keepdim=True)
    Ap = torch.eye(n, dtype=torch.float64)
    for p in range(1, 9):
        Ap = Ap @ A
        want = float(torch.einsum("ij,jk,ik->i", V, Ap, V).mean())
        assert spec.moment(p) == pytest.approx(want, rel=1e-9, abs=1e-9 * 3.0**p)


def test_batched_equals_one_probe_at_a_time(make_nn_like):
    A, _ = make_nn_like(300)
    calls = []

    class Recorder(MatrixOperator):
        def matmat(self, V):
            calls.append(V.shape[0])
            return super().matmat(V)

    s1, n1 = slq(Recorder(A), n_probes=6, n_steps=25, seed=2)
    assert calls == [6] * 25  # one batched product per step
    s2, n2 = slq(A, n_probes=6, n_steps=25, seed=2, batch_size=1)
    assert n1 == n2 == 150
    np.testing.assert_allclose(s1.nodes, s2.nodes, rtol=1e-10, atol=1e-12)
    # nodes of different runs that agree to rounding may swap places: compare the measures
    np.testing.assert_allclose(np.sort(s1.weights), np.sort(s2.weights), rtol=1e-8, atol=1e-14)
    for p in range(1, 7):
        assert s1.moment(p) == pytest.approx(s2.moment(p), rel=1e-10)
    assert s1.wasserstein(s2) < 1e-12


def test_nn_like_top_node_mean_and_distance(make_nn_like):
    A, ev = make_nn_like(1000, seed=1)
    exact = Spectrum.from_eigenvalues(ev)
    spec, n_hvp = slq(A)
    assert n_hvp == 8 * 80
    assert spec.support[1] == pytest.approx(ev[-1], rel=1e-6)
    assert spec.support[0] == pytest.approx(ev[0], rel=1e-3)
    w_exact = spec.wasserstein(exact)
    assert w_exact < 0.1 * exact.wasserstein(Spectrum([0.0], [1.0]))
    top = eigsh(A, k=10)
    deflated, n2 = slq(A, deflate=top)
    assert n2 == 640
    assert deflated.mean == pytest.approx(ev.mean(), rel=0.05)
    assert deflated.wasserstein(exact) < w_exact
    # the deflated eigenvalues carry exactly their weight 1 / dim
    for lam in top.values.tolist():
        i = np.argmin(np.abs(deflated.nodes - lam))
        assert deflated.weights[i] == pytest.approx(1e-3, rel=1e-9)
    assert deflated.support[1] == pytest.approx(ev[-1], rel=1e-9)


def test_runs_stop_on_invariant_subspaces():
    d = torch.tensor([1.0, 2.0, 4.0] * 20, dtype=torch.float64)
    spec, n_hvp = slq(torch.diag(d), n_probes=4, n_steps=30, seed=0, distribution="gaussian")
    assert n_hvp == 4 * 3
    assert np.unique(np.round(spec.nodes, 10)).tolist() == [1.0, 2.0, 4.0]
    assert spec.mean == pytest.approx(7.0 / 3.0, rel=0.2)


def test_deflating_everything_and_errors():
    A = random_sym(6, 1)
    top = eigsh(A, k=6)
    spec, n_hvp = slq(A, deflate=top)
    assert n_hvp == 0
    np.testing.assert_allclose(spec.nodes, np.linalg.eigvalsh(A.numpy()), atol=1e-10)
    no_vectors = eigsh(A, k=2, return_vectors=False)
    with pytest.raises(ValueError, match="vectors"):
        slq(A, deflate=no_vectors)
    with pytest.raises(ValueError):
        slq(A, n_probes=0)
    with pytest.raises(ValueError):
        slq(A, n_steps=0)


def test_deflated_with_full_steps_is_exact_on_the_complement():
    n = 30
    A = random_sym(n, 2)
    ev = np.linalg.eigvalsh(A.numpy())
    top = eigsh(A, k=3, tol=1e-12)
    spec, n_hvp = slq(A, n_probes=3, n_steps=n, deflate=top)
    assert n_hvp == 3 * (n - 3)
    assert len(spec) == 3 + 3 * (n - 3)
    dist = np.abs(spec.nodes[:, None] - ev[None, :])
    assert dist.min(axis=1).max() < 1e-8  # every node is an eigenvalue
    assert dist.min(axis=0).max() < 1e-8  # every eigenvalue is a node
    assert spec.weights.sum() == pytest.approx(1.0)


def test_progress_and_reproducibility(make_nn_like):
    A, _ = make_nn_like(300)
    seen = []
    s1, _ = slq(A, n_probes=3, n_steps=10, progress=seen.append)
    assert seen == list(range(3, 31, 3))
    s2, _ = slq(A, n_probes=3, n_steps=10)
    np.testing.assert_array_equal(s1.nodes, s2.nodes)
    s3, _ = slq(A, n_probes=3, n_steps=10, seed=1)
    assert not np.array_equal(s1.nodes, s3.nodes)


# ------------------------------------------------------- no basis: the three-term recurrence


def probe_moments(A, n_probes, seed, p_max, distribution="rademacher"):
    """The average of v^T A^p v over the unit probes slq draws (dense reference)."""
    n = A.shape[0]
    V = random_probes(n_probes, n, distribution, torch.Generator().manual_seed(seed),
                      torch.float64)
    V = V / V.norm(dim=1, keepdim=True)
    W, out = V.clone(), []
    for _ in range(p_max):
        W = W @ A
        out.append(float((V * W).sum(dim=1).mean()))
    return out


def test_no_reorth_has_ghosts_but_exact_moments(make_nn_like):
    """Without reorthogonalisation the runs repeat converged Ritz values (ghosts), yet the
    quadrature's moments are those of the probes' measures to rounding (against dense
    powers), and the distance to the exact spectrum is as small as with full
    reorthogonalisation."""
    A, ev = make_nn_like(1000, seed=1)
    exact = Spectrum.from_eigenvalues(ev)
    full, n_full = slq(A, reorth="full")
    none, n_none = slq(A, reorth="none")
    assert n_full == n_none == 8 * 80
    near_top = [int(np.sum(np.abs(s.nodes - ev[-1]) < 1e-8)) for s in (full, none)]
    assert near_top[0] == 8 and near_top[1] > 16  # one per run vs ghosts
    scale = np.abs(ev).max()
    for p, want in enumerate(probe_moments(A, 8, 0, 10), start=1):
        assert abs(none.moment(p) - want) <= 1e-12 * scale**p, p
        assert abs(full.moment(p) - want) <= 1e-12 * scale**p, p
    assert none.wasserstein(exact) <= 1.25 * full.wasserstein(exact)
    assert none.wasserstein(exact) < 0.1 * exact.wasserstein(Spectrum([0.0], [1.0]))


def test_no_reorth_deflation_keeps_the_outliers_out(make_nn_like):
    A, ev = make_nn_like(1000, seed=1)
    exact = Spectrum.from_eigenvalues(ev)
    top = eigsh(A, k=10)
    deflated, n_hvp = slq(A, deflate=top, reorth="none")
    plain, _ = slq(A, reorth="none")
    assert n_hvp == 640
    # the ten deflated values are the only nodes above the 11th eigenvalue, weight 1/n each
    above = deflated.nodes > ev[-11] * (1 + 1e-6)
    assert above.sum() == 10
    np.testing.assert_allclose(deflated.weights[above], 1e-3, rtol=1e-9)
    assert deflated.mean == pytest.approx(ev.mean(), rel=0.05)
    assert deflated.wasserstein(exact) < plain.wasserstein(exact)


def test_probe_chunks_do_not_change_the_result(make_nn_like):
    A, _ = make_nn_like(300)
    calls = []

    class Recorder(MatrixOperator):
        def matmat(self, V):
            calls.append(V.shape[0])
            return super().matmat(V)

    a, n_a = slq(Recorder(A), n_probes=7, n_steps=20, reorth="none", probe_chunk=3)
    assert calls == [3] * 20 + [3] * 20 + [1] * 20 and n_a == 140
    b, n_b = slq(A, n_probes=7, n_steps=20, reorth="none")
    c, _ = slq(A, n_probes=7, n_steps=20, reorth="full", probe_chunk=2)
    assert n_b == 140
    for p in range(1, 8):
        assert a.moment(p) == pytest.approx(b.moment(p), rel=1e-10)
        assert a.moment(p) == pytest.approx(c.moment(p), rel=1e-9)
    # the nodes themselves may differ: without reorthogonalisation the rounding of the batched
    # product decides where ghosts appear; the measures stay close
    assert a.wasserstein(b) < 0.05 * b.wasserstein(Spectrum([0.0], [1.0]))


def test_no_reorth_float32_operator_and_early_stop():
    n = 400
    A = random_sym(n, 4)
    ev = np.linalg.eigvalsh(A.numpy())
    spec, _ = slq(MatrixOperator(A.float()), n_probes=6, n_steps=60, reorth="none")
    want = probe_moments(A, 6, 0, 4)
    scale = np.abs(ev).max()
    for p in range(1, 5):  # float32 products and vectors: rounding of float32
        assert abs(spec.moment(p) - want[p - 1]) <= 1e-5 * scale**p
    # a run on an operator with 3 distinct eigenvalues stops at its invariant space
    d = torch.tensor([1.0, 2.0, 4.0] * 20, dtype=torch.float64)
    spec, n_hvp = slq(torch.diag(d), n_probes=4, n_steps=30, reorth="none")
    assert n_hvp == 4 * 3
    assert np.unique(np.round(spec.nodes, 10)).tolist() == [1.0, 2.0, 4.0]


def test_auto_is_full_for_small_problems_and_bad_arguments():
    A = random_sym(50, 5)
    auto, _ = slq(A, n_probes=3, n_steps=50)
    full, _ = slq(A, n_probes=3, n_steps=50, reorth="full")
    np.testing.assert_array_equal(auto.nodes, full.nodes)
    with pytest.raises(ValueError, match="reorth"):
        slq(A, reorth="partial")
    with pytest.raises(ValueError, match="probe_chunk"):
        slq(A, probe_chunk=0)


@pytest.mark.parametrize("reorth", ["none", "full"])
def test_deflation_vectors_off_orthonormal_are_fixed_in_a_copy_or_in_place(make_nn_like, reorth):
    """Deflation vectors 1e-4 from orthonormal (float32 Ritz vectors can be) are made
    orthonormal: in a copy by default (the caller's tensor untouched), in place with
    overwrite_deflate=True (no copy of r vectors); the span, hence the result, is the same."""
    from hesslens.linalg import EigenResult
    from hesslens.linalg.lanczos import _gram64

    A, _ = make_nn_like(1000, seed=1)
    top = eigsh(A, k=6)
    g = torch.Generator().manual_seed(0)
    skew = top.vectors + 1e-4 * torch.randn(top.vectors.shape, generator=g, dtype=torch.float64)

    def result(vectors):
        return EigenResult(values=top.values, vectors=vectors, residuals=top.residuals,
                           converged=top.converged, n_hvp=0, n_steps=0, which="LA",
                           bounds=top.bounds)

    kept = skew.clone()
    copied, _ = slq(A, deflate=result(kept), reorth=reorth, n_steps=40)
    assert torch.equal(kept, skew)
    in_place, _ = slq(A, deflate=result(kept), reorth=reorth, n_steps=40, overwrite_deflate=True)
    assert not torch.equal(kept, skew)
    eye = torch.eye(6, dtype=torch.float64)
    assert float((_gram64(kept, kept) - eye).abs().max()) < 1e-12
    np.testing.assert_allclose(in_place.nodes, copied.nodes, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(in_place.weights, copied.weights, rtol=1e-9, atol=1e-14)
