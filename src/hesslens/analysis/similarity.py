"""How much a layer's Hessian spectrum looks like the full network's: distances between
spectral measures, and the ranking of layers by depth.

A spectrum here is a :class:`~hesslens.linalg.Spectrum`: a probability measure with nodes
(eigenvalue locations) and weights. Two distances compare the *measures* (both computed by the
:class:`~hesslens.linalg.Spectrum` methods; this module chooses the normalisation and says
why):

* :func:`wasserstein` -- the Wasserstein-1 (earth mover's) distance between the two measures
  after putting both on a common scale (``normalize``), the primary metric;
* :func:`js_divergence` -- the Jensen-Shannon divergence between the two Gaussian-smoothed
  densities, evaluated on one shared grid with one shared kernel width.

Normalisation (``normalize``):

``"top"`` (default)
    divide each spectrum's eigenvalues by its own largest ``|eigenvalue|``. A layer's block
    has smaller eigenvalues than the whole by construction (Cauchy interlacing), so without
    rescaling the distance mostly measures the difference in magnitude, which the top
    eigenvalue and trace ratios already report; the paper's claim is about *shape* (a bulk at
    zero plus a few outliers). The largest ``|eigenvalue|`` is the best-determined number of
    an SLQ spectrum (with deflation it is an eigenvalue computed to a tight tolerance), so the
    scale is stable, and the distance is in units of the top eigenvalue: it lies in
    ``[0, 2]`` and a scaled copy of a spectrum is at distance 0.
``"range"``
    divide by ``max - min`` of the nodes (no shift, zero stays at zero). It also removes the
    magnitude, but depends on the most negative Ritz value, which a few Lanczos steps place
    poorly and which changes most during training: noisier.
``"none"``
    raw eigenvalues: distances mix scale and shape (a layer whose whole spectrum sits near
    zero looks "close" to the full bulk). Always reported as ``wasserstein_raw``.

How this differs from the authors' script (``LayerHessians/experiments/match_distros.py`` in
github.com/yashkhasbage25/HTR): they evaluate each smoothed density on its own 1024-point grid
over its own range, take the logarithm, min-max scale it to ``[0, 1]``, divide by its sum, and
pass the two 1024-vectors of *density values* to ``scipy.stats.wasserstein_distance`` as if they
were samples. The grid positions (where the eigenvalues lie) never enter: any rearrangement
of the grid -- a mirrored spectrum, a shifted one, outliers moved elsewhere -- leaves that
number unchanged. :func:`authors_distance` reproduces their computation for comparison only
(``authors_distance`` in the results); rankings use :func:`wasserstein`.

Example:
    >>> from hesslens.linalg import Spectrum
    >>> full = Spectrum([0.0, 1.0, 10.0], [0.8, 0.15, 0.05])
    >>> wasserstein(full.scaled(0.1), full)   # same shape, 10x smaller
    0.0
    >>> mirrored = full.scaled(-1.0)
    >>> round(wasserstein(mirrored, full), 3), round(authors_distance(mirrored, full), 6)
    (0.13, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr, wasserstein_distance

from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum
from hesslens.linalg.spectrum import DEFAULT_SIGMA_FRACTION, NORMALIZATIONS, check_normalize

__all__ = [
    "DEFAULT_NORMALIZE",
    "NORMALIZATIONS",
    "authors_distance",
    "compare_spectra",
    "depths",
    "js_divergence",
    "normalize_spectrum",
    "rank_layers",
    "spectrum_similarity",
    "summarize_similarity",
    "wasserstein",
]

#: Default normalisation: by each spectrum's largest |eigenvalue| (see the module docstring).
DEFAULT_NORMALIZE = "top"


def _spectrum(s: Any, what: str) -> Spectrum:
    if isinstance(s, Spectrum):
        return s
    if isinstance(s, Mapping):
        return Spectrum.from_dict(s)
    raise HesslensInputError(f"{what} must be a Spectrum or a {{nodes, weights}} mapping")


def spectrum_scale(spectrum: Spectrum, normalize: str = DEFAULT_NORMALIZE) -> float:
    """The number :func:`normalize_spectrum` divides the eigenvalues by (1.0 for ``"none"``
    and for a spectrum whose scale is 0): :meth:`Spectrum.scale <hesslens.linalg.Spectrum.scale>`.

    >>> spectrum_scale(Spectrum([-3.0, 1.0], [0.5, 0.5]), "top")
    3.0
    """
    return _spectrum(spectrum, "spectrum").scale(normalize)


def normalize_spectrum(spectrum: Spectrum, normalize: str = DEFAULT_NORMALIZE) -> Spectrum:
    """The spectrum with its eigenvalues divided by its own scale (see the module docstring):
    :meth:`Spectrum.normalized <hesslens.linalg.Spectrum.normalized>`.

    >>> normalize_spectrum(Spectrum([0.0, 4.0], [0.5, 0.5])).nodes.tolist()
    [0.0, 1.0]
    """
    return _spectrum(spectrum, "spectrum").normalized(normalize)


def wasserstein(a: Spectrum, b: Spectrum, normalize: str = DEFAULT_NORMALIZE) -> float:
    """Wasserstein-1 distance between two spectral measures (nodes and weights), each first
    divided by its own scale (``normalize``: ``"top"``, ``"range"`` or ``"none"``):
    :meth:`Spectrum.wasserstein <hesslens.linalg.Spectrum.wasserstein>` with this module's
    default normalisation.

    It is ``int |F_a(x) - F_b(x)| dx`` between the two cumulative distribution functions: how
    far, on average, the eigenvalue mass of one spectrum must move to become the other.

    >>> wasserstein(Spectrum([0.0, 1.0], [0.5, 0.5]), Spectrum([0.0], [1.0]), "none")
    0.5
    """
    return _spectrum(a, "a").wasserstein(_spectrum(b, "b"), normalize=normalize)


def js_divergence(
    a: Spectrum,
    b: Spectrum,
    normalize: str = DEFAULT_NORMALIZE,
    n_grid: int = 1024,
    sigma_fraction: float = DEFAULT_SIGMA_FRACTION,
) -> float:
    """Jensen-Shannon divergence (nats, in ``[0, log 2]``) between the Gaussian-smoothed
    densities of the two normalised spectra, on one shared grid:
    :meth:`Spectrum.js_divergence <hesslens.linalg.Spectrum.js_divergence>` with this
    module's default normalisation.

    The grid has ``n_grid`` points over the union of the two supports, padded by 5 % of its
    span on each side; both densities use the same kernel width, ``sigma_fraction`` of that
    span. It complements :func:`wasserstein`: sensitive to where the mass is concentrated
    (the bulk's shape), blind to how far apart non-overlapping pieces are.

    >>> s = Spectrum([0.0, 1.0], [0.9, 0.1])
    >>> js_divergence(s, s.scaled(5.0))
    0.0
    """
    return _spectrum(a, "a").js_divergence(_spectrum(b, "b"), normalize=normalize,
                                           n_grid=n_grid, sigma_fraction=sigma_fraction)


def _authors_density(spectrum: Spectrum, n_points: int, n_steps: int, margin: float):
    """The smoothed density as the authors' ``LanczosLoop`` computes it: nodes mapped from
    the spectrum's own range (widened by ``margin``) to ``[-1, 1]``, Gaussian kernels of width
    ``h / sqrt(8 ln 1.25)`` with ``h = 2 / (n_steps - 1)``, on ``n_points`` grid points."""
    lo, hi = spectrum.support
    width = hi - lo if hi > lo else max(abs(hi), 1.0) * 1e-3
    lo, hi = lo - margin * width, hi + margin * width
    c, d = (lo + hi) / 2, (hi - lo) / 2
    x = np.linspace(-1.0, 1.0, int(n_points))
    sigma = (2.0 / (n_steps - 1)) / math.sqrt(8.0 * math.log(1.25))
    z = (x[:, None] - (spectrum.nodes[None, :] - c) / d) / sigma
    return np.exp(-0.5 * z * z) @ spectrum.weights / (sigma * math.sqrt(2 * math.pi))


def _authors_transform(density: np.ndarray) -> np.ndarray:
    """``density_transform`` of the authors' script: log, min-max scaling, sum to 1."""
    positive = density[density > 0]
    floor = positive.min() if positive.size else 1.0
    p = np.log(np.where(density > 0, density, floor))
    span = p.max() - p.min()
    p = (p - p.min()) / span if span > 0 else np.ones_like(p)
    return p / p.sum()


def authors_distance(
    a: Spectrum, b: Spectrum, n_points: int = 1024, n_steps: int = 128, margin: float = 0.05
) -> float:
    """The authors' layer-vs-full "Wasserstein distance", for comparison only.

    Each spectrum's smoothed density is evaluated on its *own* ``n_points`` grid (its own
    range, widened by ``margin``), log-transformed, min-max scaled and normalised to sum 1
    (their ``density_transform``), and the two vectors of *density values* are handed to
    ``scipy.stats.wasserstein_distance`` as two samples. The eigenvalue locations never enter:
    the result is invariant to any permutation of the grid (mirroring, shifting, moving
    outliers), so it does not measure how alike two spectra are. Use :func:`wasserstein`.

    >>> s = Spectrum([0.0, 1.0], [0.9, 0.1])
    >>> authors_distance(s, s.scaled(-1.0)) < 1e-12   # a mirror image counts as identical
    True
    """
    a, b = _spectrum(a, "a"), _spectrum(b, "b")
    pa = _authors_transform(_authors_density(a, n_points, n_steps, margin))
    pb = _authors_transform(_authors_density(b, n_points, n_steps, margin))
    return float(wasserstein_distance(pa, pb))


def compare_spectra(
    layer: Spectrum, full: Spectrum, normalize: str = DEFAULT_NORMALIZE
) -> dict[str, Any]:
    """All the layer-vs-full numbers, JSON-ready.

    Returns:
        ``{"normalize", "wasserstein", "wasserstein_raw", "js_divergence", "authors_distance",
        "scale": {"layer", "full"}}``: ``wasserstein`` and ``js_divergence`` between the
        normalised measures (the metrics), ``wasserstein_raw`` without normalisation (in
        eigenvalue units), ``authors_distance`` the authors' density-values-as-samples number
        (not a distance between spectra; for comparison), ``scale`` what each spectrum was
        divided by.

    >>> s = Spectrum([0.0, 2.0], [0.5, 0.5])
    >>> d = compare_spectra(s.scaled(0.5), s)
    >>> d["wasserstein"], d["wasserstein_raw"], d["scale"]
    (0.0, 0.5, {'layer': 1.0, 'full': 2.0})
    """
    normalize = check_normalize(normalize)
    layer, full = _spectrum(layer, "layer"), _spectrum(full, "full")
    return {
        "normalize": normalize,
        "wasserstein": wasserstein(layer, full, normalize),
        "wasserstein_raw": wasserstein(layer, full, "none"),
        "js_divergence": js_divergence(layer, full, normalize),
        "authors_distance": authors_distance(layer, full),
        "scale": {"layer": layer.scale(normalize), "full": full.scale(normalize)},
    }


def spectrum_similarity(full: Spectrum, layer: Spectrum) -> dict[str, float]:
    """``{"wasserstein", "js_divergence"}`` of a layer against the full spectrum with the
    default normalisation: the signature the training tracker's similarity hook expects
    (``similarity(full_spectrum, layer_spectrum)``).

    >>> s = Spectrum([0.0, 1.0], [0.5, 0.5])
    >>> spectrum_similarity(s, s)
    {'wasserstein': 0.0, 'js_divergence': 0.0}
    """
    return {"wasserstein": wasserstein(layer, full), "js_divergence": js_divergence(layer, full)}


def depths(n_layers: int) -> list[float]:
    """Normalised depth of each of ``n_layers`` layers in forward order: ``i / (n - 1)``
    (0 for the first, 1 for the last; a single layer gets 0).

    >>> depths(5)
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if n_layers < 1:
        return []
    if n_layers == 1:
        return [0.0]
    return [i / (n_layers - 1) for i in range(n_layers)]


def rank_layers(distances: Mapping[str, float]) -> list[str]:
    """Layer names from most to least similar (smallest distance first; ties keep the order
    given, i.e. forward order).

    >>> rank_layers({"a": 0.3, "b": 0.1, "c": 0.2})
    ['b', 'c', 'a']
    """
    order = list(distances)
    return sorted(order, key=lambda name: (float(distances[name]), order.index(name)))


def summarize_similarity(
    names: Sequence[str],
    distances: Sequence[float],
    metric: str = "wasserstein",
    normalize: str = DEFAULT_NORMALIZE,
    n_most: int | None = None,
) -> dict[str, Any]:
    """Rank layers by their distance to the full spectrum and relate it to depth.

    Args:
        names: layer names in forward order.
        distances: each layer's distance to the full spectrum (smaller = more similar).
        metric, normalize: recorded in the result.
        n_most: how many layers count as "most similar" (default: a third, at least 1).

    Returns:
        ``{"metric", "normalize", "ranking": [{"name", "rank", "depth", "distance"}...],
        "most_similar": [names], "most_similar_depths", "middle_mean", "outer_mean",
        "middle_more_similar", "depth_spearman"}``. Middle layers have normalised depth in
        ``[0.25, 0.75]``. ``depth_spearman`` is Spearman's rank correlation between the
        distance and ``|depth - 1/2|``: positive when layers nearer the middle are more
        similar to the whole (the paper's finding 2); ``None`` with fewer than 3 layers.

    >>> s = summarize_similarity(["a", "b", "c", "d", "e"], [0.5, 0.2, 0.1, 0.3, 0.6])
    >>> s["most_similar"], s["middle_more_similar"], round(s["depth_spearman"], 2)
    (['c'], True, 0.95)
    """
    names = list(names)
    dist = [float(d) for d in distances]
    if len(names) != len(dist):
        raise HesslensInputError(f"{len(names)} layer names but {len(dist)} distances")
    depth = depths(len(names))
    ranked = rank_layers(dict(zip(names, dist)))
    where = {name: i for i, name in enumerate(names)}
    ranking = [
        {"name": name, "rank": r + 1, "depth": depth[where[name]], "distance": dist[where[name]]}
        for r, name in enumerate(ranked)
    ]
    n_most = max(1, len(names) // 3) if n_most is None else max(0, int(n_most))
    most = ranked[:n_most]
    middle = [d for d, x in zip(dist, depth) if 0.25 <= x <= 0.75]
    outer = [d for d, x in zip(dist, depth) if not 0.25 <= x <= 0.75]
    middle_mean = float(np.mean(middle)) if middle else None
    outer_mean = float(np.mean(outer)) if outer else None
    rho = None
    if len(names) >= 3 and len(set(dist)) > 1:
        value = spearmanr(dist, [abs(x - 0.5) for x in depth]).statistic
        rho = None if not np.isfinite(value) else float(value)
    return {
        "metric": metric,
        "normalize": normalize,
        "ranking": ranking,
        "most_similar": most,
        "most_similar_depths": [depth[where[n]] for n in most],
        "middle_mean": middle_mean,
        "outer_mean": outer_mean,
        "middle_more_similar": (None if middle_mean is None or outer_mean is None
                                else bool(middle_mean < outer_mean)),
        "depth_spearman": rho,
    }
