"""Spectral-measure comparisons: Wasserstein-1 on a common scale, Jensen-Shannon on a shared
grid, the authors' density-values-as-samples number, ranking by depth."""

from __future__ import annotations

import numpy as np
import pytest

from hesslens.analysis import similarity as sim
from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum


def _bulk_and_outliers(seed=0, n_out=4, spread=0.05):
    rng = np.random.default_rng(seed)
    bulk = rng.normal(0.0, spread, 300)
    outliers = np.linspace(0.5, 1.0, n_out)
    return Spectrum.from_eigenvalues(np.concatenate([bulk, outliers]))


def test_identical_spectra_are_at_distance_zero():
    s = _bulk_and_outliers()
    for how in sim.NORMALIZATIONS:
        assert sim.wasserstein(s, s, how) == 0.0
        assert sim.js_divergence(s, s, how) == pytest.approx(0.0, abs=1e-12)


def test_scaled_copy_is_at_distance_zero_under_top_normalisation():
    s = _bulk_and_outliers()
    small = s.scaled(0.01)
    assert sim.wasserstein(small, s, "top") == pytest.approx(0.0, abs=1e-12)
    assert sim.wasserstein(small, s, "range") == pytest.approx(0.0, abs=1e-12)
    assert sim.js_divergence(small, s, "top") == pytest.approx(0.0, abs=1e-12)
    assert sim.wasserstein(small, s, "none") > 0.03  # raw: the scale dominates


def test_a_different_shape_is_farther():
    s = _bulk_and_outliers()
    scaled = s.scaled(3.0)
    wide_bulk = _bulk_and_outliers(spread=0.3)  # same outliers, a much wider bulk
    many_outliers = _bulk_and_outliers(n_out=60)
    for other in (wide_bulk, many_outliers):
        assert sim.wasserstein(other, s) > 10 * max(sim.wasserstein(scaled, s), 1e-6)
        assert sim.js_divergence(other, s) > 0.01


def test_wasserstein_is_between_measures_not_samples():
    # weights matter: 90 % of the mass at 0 vs 90 % at 1 -> 0.8 of the mass moves by 1
    a = Spectrum([0.0, 1.0], [0.9, 0.1])
    b = Spectrum([0.0, 1.0], [0.1, 0.9])
    assert sim.wasserstein(a, b, "none") == pytest.approx(0.8)
    # against the integral of |F_a - F_b| on a fine grid, for SLQ-like measures
    x = np.linspace(-1.5, 1.5, 300001)
    p, q = _bulk_and_outliers(1), _bulk_and_outliers(2, spread=0.1)

    def cdf(s):
        return np.array([s.weights[s.nodes <= t].sum() for t in x[::100]])

    integral = np.abs(cdf(p) - cdf(q)).sum() * (x[100] - x[0])
    assert sim.wasserstein(p, q, "none") == pytest.approx(integral, rel=1e-3)


def test_authors_method_misleads_where_ours_does_not():
    full = _bulk_and_outliers(0)
    mirrored = full.scaled(-1.0)                  # outliers on the negative side instead
    near_copy = _bulk_and_outliers(5)             # another draw of the same shape
    # their number: a mirror image is "identical" (density values are the same multiset),
    # and it ranks the mirror image as more similar than a genuine near copy
    assert sim.authors_distance(mirrored, full) < 1e-12
    assert sim.authors_distance(mirrored, full) < sim.authors_distance(near_copy, full)
    # ours sees where the eigenvalues lie
    assert sim.wasserstein(mirrored, full) > 5 * sim.wasserstein(near_copy, full)
    assert sim.rank_layers({"mirror": sim.wasserstein(mirrored, full),
                            "copy": sim.wasserstein(near_copy, full)}) == ["copy", "mirror"]
    # shifting every eigenvalue by a constant is invisible to theirs too
    shifted = Spectrum(full.nodes + 0.7, full.weights)
    assert sim.authors_distance(shifted, full) < 1e-12
    assert sim.wasserstein(shifted, full, "none") == pytest.approx(0.7)


def test_compare_spectra_reports_everything():
    s = _bulk_and_outliers()
    d = sim.compare_spectra(s.scaled(0.5), s)
    assert d["normalize"] == "top"
    assert d["wasserstein"] == pytest.approx(0.0, abs=1e-12)
    assert d["wasserstein_raw"] > 0
    assert d["scale"]["full"] == pytest.approx(2 * d["scale"]["layer"])
    assert d["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert sim.compare_spectra(s, s.to_dict())["wasserstein"] == 0.0


def test_depths_and_ranking():
    assert sim.depths(1) == [0.0]
    assert sim.depths(3) == [0.0, 0.5, 1.0]
    s = sim.summarize_similarity(["a", "b", "c", "d", "e", "f"],
                                 [0.9, 0.3, 0.1, 0.2, 0.5, 0.8])
    assert [r["name"] for r in s["ranking"]] == ["c", "d", "b", "e", "f", "a"]
    assert s["ranking"][0]["rank"] == 1 and s["ranking"][0]["depth"] == pytest.approx(0.4)
    assert s["most_similar"] == ["c", "d"]
    assert s["middle_more_similar"] is True
    assert s["depth_spearman"] > 0.5
    two = sim.summarize_similarity(["a", "b"], [0.2, 0.1])
    assert two["most_similar"] == ["b"] and two["depth_spearman"] is None


def test_bad_input():
    s = _bulk_and_outliers()
    with pytest.raises(HesslensInputError, match="normalisation"):
        sim.wasserstein(s, s, "median")
    with pytest.raises(HesslensInputError):
        sim.summarize_similarity(["a"], [0.1, 0.2])
    with pytest.raises(HesslensInputError):
        sim.wasserstein(s, [1.0, 2.0])


@pytest.mark.parametrize("normalize", ["top", "range", "none", None])
def test_the_similarity_distances_are_the_spectrum_methods(normalize):
    """One implementation: the layer study's numbers are the Spectrum's, bit for bit."""
    rng = np.random.default_rng(3)
    a = Spectrum(rng.normal(size=30) * 4.0, rng.uniform(size=30))
    b = Spectrum(rng.normal(size=20) + 1.0, rng.uniform(size=20))
    assert sim.wasserstein(a, b, normalize) == a.wasserstein(b, normalize=normalize)
    assert sim.js_divergence(a, b, normalize) == a.js_divergence(b, normalize=normalize)
    assert sim.js_divergence(a, b, normalize, n_grid=300, sigma_fraction=0.05) == \
        a.js_divergence(b, normalize=normalize, n_grid=300, sigma_fraction=0.05)
    # against the definition: W1 of the normalised measures from their CDFs on a fine grid
    na, nb = a.normalized(normalize), b.normalized(normalize)
    x = np.linspace(min(na.support[0], nb.support[0]), max(na.support[1], nb.support[1]),
                    200_001)
    cdf = lambda s: np.searchsorted(s.nodes, x, side="right")  # noqa: E731
    Fa = np.concatenate([[0.0], np.cumsum(na.weights)])[cdf(na)]
    Fb = np.concatenate([[0.0], np.cumsum(nb.weights)])[cdf(nb)]
    assert sim.wasserstein(a, b, normalize) == pytest.approx(
        float(np.sum(np.abs(Fa - Fb)[:-1] * np.diff(x))), rel=1e-3)
