import json

import numpy as np
import pytest
import scipy.stats
from scipy.integrate import trapezoid

from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum


def test_normalises_and_sorts():
    s = Spectrum(np.array([3.0, -1.0, 2.0]), np.array([2.0, 1.0, 1.0]))
    np.testing.assert_array_equal(s.nodes, [-1.0, 2.0, 3.0])
    np.testing.assert_array_equal(s.weights, [0.25, 0.25, 0.5])
    assert s.nodes.dtype == np.float64 and s.weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert len(s) == 3 and s.support == (-1.0, 3.0)
    with pytest.raises(ValueError):
        s.nodes[0] = 5.0  # read-only
    with pytest.raises(AttributeError):
        s.nodes = np.zeros(3)  # frozen


@pytest.mark.parametrize(
    ("nodes", "weights"),
    [
        ([], []),
        ([1.0, 2.0], [1.0]),
        ([1.0, np.nan], [1.0, 1.0]),
        ([1.0, 2.0], [1.0, np.inf]),
        ([1.0, 2.0], [1.0, -0.5]),
        ([1.0, 2.0], [0.0, 0.0]),
        ([[1.0, 2.0]], [[1.0, 1.0]]),
    ],
)
def test_rejects_bad_input(nodes, weights):
    with pytest.raises(ValueError):
        Spectrum(nodes, weights)


def test_moments_match_numpy():
    ev = np.random.default_rng(0).normal(size=200) ** 3
    s = Spectrum.from_eigenvalues(ev)
    for p in range(1, 5):
        assert s.moment(p) == pytest.approx(np.mean(ev**p), rel=1e-12)
    assert s.mean == pytest.approx(ev.mean(), rel=1e-12)
    assert s.variance == pytest.approx(ev.var(), rel=1e-12)
    assert s.moment(0) == pytest.approx(1.0)


def test_pdf_integrates_to_one_and_matches_kernel():
    s = Spectrum.from_eigenvalues([-0.5, 0.0, 0.01, 0.02, 3.0, 10.0])
    x = s.default_grid()
    assert x.shape == (1024,) and x[0] < -0.5 and x[-1] > 10.0
    assert trapezoid(s.pdf(x), x) == pytest.approx(1.0, abs=1e-4)
    assert s.default_sigma() == pytest.approx(0.105)
    one = Spectrum([2.0], [1.0])
    grid = np.array([2.0, 3.0])
    expected = np.exp(-0.5 * np.array([0.0, 4.0])) / (0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(one.pdf(grid, sigma=0.5), expected, rtol=1e-12)
    xs = one.default_grid()  # a single node still gets a sensible grid and width
    assert trapezoid(one.pdf(xs), xs) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError):
        s.pdf(x, sigma=0.0)


def test_wasserstein_hand_computed_and_symmetric():
    a = Spectrum([0.0, 1.0], [0.5, 0.5])
    b = Spectrum([0.5], [1.0])
    assert a.wasserstein(b) == pytest.approx(0.5)
    c = Spectrum([0.0, 2.0], [0.75, 0.25])  # CDFs differ by 0.25 on [0, 1) and 0.25 on [1, 2)
    assert a.wasserstein(c) == pytest.approx(0.5)
    assert c.wasserstein(a) == pytest.approx(a.wasserstein(c))
    assert a.wasserstein(a) == 0.0
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=50), rng.normal(1.0, 2.0, size=70)
    ref = scipy.stats.wasserstein_distance(u, v)
    assert Spectrum.from_eigenvalues(u).wasserstein(Spectrum.from_eigenvalues(v)) == (
        pytest.approx(ref, rel=1e-12)
    )


def test_wasserstein_normalize():
    a = Spectrum([-1.0, 0.0, 4.0], [0.2, 0.5, 0.3])
    assert a.wasserstein(a.scaled(7.0), normalize="top") == pytest.approx(0.0, abs=1e-15)
    assert a.wasserstein(a.scaled(0.1), normalize="range") == pytest.approx(0.0, abs=1e-15)
    assert a.wasserstein(a.scaled(7.0)) > 1.0
    # "top" divides by max |node| = 4, "range" by max - min = 5; no shift
    b = Spectrum([0.0], [1.0])
    assert a.wasserstein(b, normalize="top") == pytest.approx((0.2 * 1 + 0.3 * 4) / 4)
    assert a.wasserstein(b, normalize="range") == pytest.approx((0.2 * 1 + 0.3 * 4) / 5)
    with pytest.raises(ValueError, match="normalize"):
        a.wasserstein(b, normalize="max")


def test_divergences():
    a = Spectrum.from_eigenvalues([0.0, 0.1, 0.2, 5.0])
    b = Spectrum.from_eigenvalues([0.0, 0.1, 0.2, 8.0])
    far = Spectrum([100.0], [1.0])
    assert a.js_divergence(a) == 0.0 and a.kl_divergence(a) == 0.0
    js = a.js_divergence(b)
    assert js > 0 and js == pytest.approx(b.js_divergence(a), rel=1e-12)
    assert 0 < a.js_divergence(far) <= np.log(2) + 1e-12
    assert a.js_divergence(far) == pytest.approx(np.log(2), rel=1e-3)
    kl = a.kl_divergence(far)
    assert np.isfinite(kl) and kl > 1.0
    assert a.kl_divergence(b) > 0
    grid = np.linspace(-1, 9, 300)
    assert a.js_divergence(b, grid=grid, sigma=0.3) > 0


def test_dict_round_trip_and_scaled():
    s = Spectrum([0.5, -2.0, 3.0], [1.0, 2.0, 1.0])
    d = json.loads(json.dumps(s.to_dict()))
    t = Spectrum.from_dict(d)
    np.testing.assert_array_equal(t.nodes, s.nodes)
    np.testing.assert_array_equal(t.weights, s.weights)
    with pytest.raises(ValueError, match="nodes"):
        Spectrum.from_dict({"weights": [1.0]})
    neg = s.scaled(-2.0)
    np.testing.assert_array_equal(neg.nodes, [-6.0, -1.0, 4.0])
    np.testing.assert_array_equal(neg.weights, [0.25, 0.25, 0.5])
    assert "n_nodes=3" in repr(s)


def test_accepts_torch_tensors():
    import torch

    s = Spectrum.from_eigenvalues(torch.tensor([1.0, 3.0]))
    assert s.mean == 2.0


def test_normalized_measures_compare_shapes():
    a = Spectrum([-1.0, 0.0, 2.0, 5.0], [0.1, 0.6, 0.2, 0.1])
    assert a.scale("top") == 5.0 and a.scale("range") == 6.0 and a.scale(None) == 1.0
    assert a.scale("none") == 1.0 and Spectrum([0.0], [1.0]).scale("top") == 1.0
    assert a.normalized("top").nodes.tolist() == pytest.approx([-0.2, 0.0, 0.4, 1.0])
    assert a.normalized(None) is a
    assert a.js_divergence(a.scaled(9.0), normalize="range") == pytest.approx(0.0, abs=1e-12)
    assert a.js_divergence(a.scaled(9.0)) > 0.1
    with pytest.raises(HesslensInputError, match="unknown normalisation normalize='max'"):
        a.js_divergence(a, normalize="max")
