"""Spectral measures: nodes and weights, their densities and distances between them.

A :class:`Spectrum` is a discrete probability measure ``sum_i w_i delta(x - x_i)`` on the
real line: the exact spectral measure of a matrix (weight ``1/n`` on each eigenvalue) or a
stochastic Lanczos quadrature estimate of it. Distances compare the measures themselves
(Wasserstein-1 on nodes and weights), or their Gaussian-smoothed densities on a shared grid
(Jensen-Shannon, Kullback-Leibler), optionally after dividing each measure by its own scale
(``normalize``). This is the one implementation of these distances; the layer study's
similarity (:mod:`hesslens.analysis.similarity`) calls it.

Example
-------
>>> s = Spectrum.from_eigenvalues([0.0, 0.0, 1.0, 3.0])
>>> s.mean, s.support
(1.0, (0.0, 3.0))
>>> s.wasserstein(Spectrum.from_eigenvalues([0.0, 0.0, 1.0, 4.0]))
0.25
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import rel_entr

from hesslens.errors import HesslensInputError

__all__ = ["DEFAULT_SIGMA_FRACTION", "NORMALIZATIONS", "Spectrum", "check_normalize"]

#: Default kernel width of :meth:`Spectrum.pdf`, as a fraction of the width of the support.
DEFAULT_SIGMA_FRACTION = 0.01
#: The ways to put a measure on its own scale before comparing it with another
#: (:meth:`Spectrum.normalized`): by its largest ``|node|``, by its range, or not at all.
NORMALIZATIONS = ("top", "range", "none")


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise HesslensInputError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _width(lo: float, hi: float) -> float:
    """Width of ``[lo, hi]``, or a positive stand-in for a single point."""
    w = hi - lo
    if w > 0:
        return w
    return max(abs(lo), abs(hi), 1.0) * 1e-3 if max(abs(lo), abs(hi)) > 0 else 1e-3


def check_normalize(normalize: str | None) -> str:
    """``normalize`` as one of :data:`NORMALIZATIONS` (``None`` is ``"none"``), else raise.

    >>> check_normalize(None), check_normalize("top")
    ('none', 'top')
    """
    normalize = "none" if normalize is None else normalize
    if normalize not in NORMALIZATIONS:
        raise HesslensInputError(
            f"unknown normalisation normalize={normalize!r}; choose one of: "
            f"{', '.join(NORMALIZATIONS)} (or None)")
    return normalize


@dataclass(frozen=True, eq=False)
class Spectrum:
    """A discrete spectral measure with ``nodes`` (ascending) and ``weights`` (sum 1).

    Parameters
    ----------
    nodes : array_like
        Finite real nodes (sorted on construction; weights follow).
    weights : array_like
        Finite nonnegative weights of the same length with a positive sum; normalised to 1.

    Raises
    ------
    ValueError
        For empty, non-1-D, mismatched, non-finite or negative input, or zero total weight.

    Examples
    --------
    >>> s = Spectrum([2.0, -1.0], [3.0, 1.0])
    >>> s.nodes.tolist(), s.weights.tolist()
    ([-1.0, 2.0], [0.25, 0.75])
    >>> len(s), s.moment(2)
    (2, 3.25)
    """

    nodes: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        nodes = _as_1d(self.nodes, "nodes")
        weights = _as_1d(self.weights, "weights")
        if nodes.shape != weights.shape:
            raise HesslensInputError(
                f"nodes and weights differ in length: {nodes.shape[0]} and {weights.shape[0]}"
            )
        if nodes.shape[0] == 0:
            raise HesslensInputError("a Spectrum needs at least one node")
        if not (np.isfinite(nodes).all() and np.isfinite(weights).all()):
            raise HesslensInputError("nodes and weights must be finite")
        if (weights < 0).any():
            raise HesslensInputError("weights must be nonnegative")
        total = weights.sum()
        if not total > 0:
            raise HesslensInputError("weights must have a positive sum")
        order = np.argsort(nodes, kind="stable")
        nodes, weights = nodes[order], weights[order] / total
        nodes.setflags(write=False)
        weights.setflags(write=False)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "weights", weights)

    # construction -----------------------------------------------------------------------
    @classmethod
    def from_eigenvalues(cls, values: Any) -> Spectrum:
        """The exact spectral measure of a matrix: weight ``1/n`` on each eigenvalue.

        >>> Spectrum.from_eigenvalues([1.0, 2.0]).weights.tolist()
        [0.5, 0.5]
        """
        values = _as_1d(values, "values")
        return cls(values, np.ones_like(values))

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> Spectrum:
        """Inverse of :meth:`to_dict`.

        >>> s = Spectrum([0.0, 1.0], [1.0, 3.0])
        >>> Spectrum.from_dict(s.to_dict()).weights.tolist()
        [0.25, 0.75]
        """
        try:
            return cls(data["nodes"], data["weights"])
        except KeyError as err:
            raise HesslensInputError(f"spectrum dictionary lacks {err}") from None

    def to_dict(self) -> dict[str, list[float]]:
        """``{"nodes": [...], "weights": [...]}`` with plain floats (JSON-ready)."""
        return {"nodes": self.nodes.tolist(), "weights": self.weights.tolist()}

    def scaled(self, c: float) -> Spectrum:
        """The measure of ``c A``: nodes multiplied by ``c``.

        >>> Spectrum([1.0, 2.0], [1.0, 1.0]).scaled(2.0).nodes.tolist()
        [2.0, 4.0]
        """
        return Spectrum(self.nodes * float(c), self.weights)

    # summaries --------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.nodes.shape[0])

    def moment(self, p: int) -> float:
        """The raw moment ``sum_i w_i x_i**p`` (``tr(A^p) / n`` for a matrix's measure)."""
        return float(np.sum(self.weights * self.nodes**p))

    @property
    def mean(self) -> float:
        """First moment (``tr(A) / n``)."""
        return self.moment(1)

    @property
    def variance(self) -> float:
        """Central second moment."""
        return float(np.sum(self.weights * (self.nodes - self.mean) ** 2))

    @property
    def support(self) -> tuple[float, float]:
        """Smallest and largest node."""
        return float(self.nodes[0]), float(self.nodes[-1])

    # densities --------------------------------------------------------------------------
    def default_sigma(self) -> float:
        """Default kernel width: ``DEFAULT_SIGMA_FRACTION`` (1 %) of the support's width."""
        lo, hi = self.support
        return DEFAULT_SIGMA_FRACTION * _width(lo, hi)

    def default_grid(self, n: int = 1024, pad: float = 0.05) -> np.ndarray:
        """``n`` points over the support widened by ``pad`` times its width on each side.

        With the default ``pad`` and kernel width the grid holds 5 kernel widths of margin,
        so :meth:`pdf` on it integrates to 1 within about 1e-6.
        """
        lo, hi = self.support
        w = _width(lo, hi)
        return np.linspace(lo - pad * w, hi + pad * w, int(n))

    def pdf(self, grid: Any = None, sigma: float | None = None) -> np.ndarray:
        """Gaussian-kernel density ``sum_i w_i N(x; x_i, sigma^2)`` on ``grid``.

        Parameters
        ----------
        grid : array_like, optional
            Points to evaluate at (default :meth:`default_grid`).
        sigma : float, optional
            Kernel width (default :meth:`default_sigma`).

        Returns
        -------
        numpy.ndarray
            The density at each grid point (integrates to ~1 over a grid that covers the
            support with a few ``sigma`` of margin).

        Examples
        --------
        >>> s = Spectrum.from_eigenvalues([0.0, 1.0, 5.0])
        >>> x = s.default_grid()
        >>> round(float(s.pdf(x).sum() * (x[1] - x[0])), 4)
        1.0
        """
        x = self.default_grid() if grid is None else _as_1d(grid, "grid")
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise HesslensInputError(f"sigma must be positive, got {sigma}")
        out = np.zeros_like(x)
        step = max(1, (1 << 22) // max(1, x.shape[0]))
        for s in range(0, len(self), step):
            z = (x[:, None] - self.nodes[None, s : s + step]) / sigma
            out += np.exp(-0.5 * z * z) @ self.weights[s : s + step]
        return out / (sigma * np.sqrt(2.0 * np.pi))

    # normalisation ----------------------------------------------------------------------
    def scale(self, normalize: str | None) -> float:
        """The number :meth:`normalized` divides the nodes by: the largest ``|node|``
        (``"top"``), ``max - min`` of the nodes (``"range"``), or 1.0 (``None`` or
        ``"none"``, and for a measure whose scale is 0).

        >>> Spectrum([-3.0, 1.0], [0.5, 0.5]).scale("top")
        3.0
        """
        normalize = check_normalize(normalize)
        if normalize == "none":
            return 1.0
        lo, hi = self.support
        scale = max(abs(lo), abs(hi)) if normalize == "top" else hi - lo
        return float(scale) if scale > 0 else 1.0

    def normalized(self, normalize: str | None) -> Spectrum:
        """The measure with its nodes divided by its own :meth:`scale` (no shift: zero stays at
        zero), to compare the shapes of spectra of different magnitude (a layer against the
        whole network).

        >>> Spectrum([0.0, 4.0], [0.5, 0.5]).normalized("top").nodes.tolist()
        [0.0, 1.0]
        """
        scale = self.scale(normalize)
        return self if scale == 1.0 else self.scaled(1.0 / scale)

    # distances --------------------------------------------------------------------------
    def wasserstein(self, other: Spectrum, normalize: str | None = None) -> float:
        """Wasserstein-1 distance between the two measures.

        Parameters
        ----------
        other : Spectrum
        normalize : {None, "none", "top", "range"}
            Rescale each measure by its own scale before comparing (:meth:`normalized`):
            ``"top"`` divides its nodes by its largest ``|node|``, ``"range"`` by ``max - min``
            of its nodes. A measure whose scale is 0 is left as it is.

        Returns
        -------
        float
            ``int |F(x) - G(x)| dx`` between the cumulative distribution functions
            (``scipy.stats.wasserstein_distance`` on nodes and weights).

        Examples
        --------
        >>> a = Spectrum([0.0, 1.0], [0.5, 0.5])
        >>> a.wasserstein(Spectrum([0.0], [1.0]))
        0.5
        >>> a.wasserstein(Spectrum([0.0, 4.0], [0.5, 0.5]), normalize="top")
        0.0
        """
        a, b = self.normalized(normalize), other.normalized(normalize)
        # scipy.stats on first use: importing it takes most of a second of every start-up
        from scipy.stats import wasserstein_distance

        return float(wasserstein_distance(a.nodes, b.nodes, a.weights, b.weights))

    def _shared_densities(
        self, other: Spectrum, grid: Any, sigma: float | None, n_grid: int = 1024,
        sigma_fraction: float = DEFAULT_SIGMA_FRACTION,
    ) -> tuple[np.ndarray, np.ndarray]:
        lo = min(self.support[0], other.support[0])
        hi = max(self.support[1], other.support[1])
        w = _width(lo, hi)
        if sigma is None:
            sigma = sigma_fraction * w
        if grid is None:
            grid = np.linspace(lo - 0.05 * w, hi + 0.05 * w, int(n_grid))
        p, q = self.pdf(grid, sigma), other.pdf(grid, sigma)
        if not (p.sum() > 0 and q.sum() > 0):
            raise HesslensInputError("a density vanishes on the grid: widen the grid or sigma")
        return p / p.sum(), q / q.sum()

    def kl_divergence(
        self, other: Spectrum, grid: Any = None, sigma: float | None = None, eps: float = 1e-12
    ) -> float:
        """Kullback-Leibler divergence ``KL(self || other)`` of the smoothed densities (nats).

        Both densities are evaluated on a shared grid (default: 1024 points over the union of
        the supports, padded by 5 % of its width) with a shared kernel width (default: 1 % of
        that width) and normalised to probability vectors on the grid. ``other`` is floored at
        ``eps`` times its maximum so that the result stays finite where its density
        underflows. Not symmetric; prefer :meth:`js_divergence`.

        Examples
        --------
        >>> s = Spectrum.from_eigenvalues([0.0, 1.0, 2.0])
        >>> s.kl_divergence(s)
        0.0
        """
        p, q = self._shared_densities(other, grid, sigma)
        q = np.maximum(q, eps * q.max())
        return float(max(0.0, np.sum(rel_entr(p, q))))

    def js_divergence(
        self, other: Spectrum, grid: Any = None, sigma: float | None = None, *,
        normalize: str | None = None, n_grid: int = 1024,
        sigma_fraction: float = DEFAULT_SIGMA_FRACTION,
    ) -> float:
        """Jensen-Shannon divergence of the smoothed densities (nats, in ``[0, log 2]``).

        ``JS = KL(p || m) / 2 + KL(q || m) / 2`` with ``m = (p + q) / 2``, on a shared grid
        with a shared kernel width as in :meth:`kl_divergence` (default: ``n_grid`` points,
        kernel width ``sigma_fraction`` of the grid's unpadded span): symmetric and always
        finite. ``normalize`` rescales both measures first, as in :meth:`wasserstein`; the
        default grid then spans the normalised supports.

        Examples
        --------
        >>> a = Spectrum.from_eigenvalues([0.0, 1.0])
        >>> a.js_divergence(a), a.js_divergence(a.scaled(3.0)) > 0
        (0.0, True)
        >>> a.js_divergence(a.scaled(3.0), normalize="top")
        0.0
        """
        a, b = self.normalized(normalize), other.normalized(normalize)
        p, q = a._shared_densities(b, grid, sigma, n_grid, sigma_fraction)
        m = 0.5 * (p + q)
        js = 0.5 * np.sum(rel_entr(p, m)) + 0.5 * np.sum(rel_entr(q, m))
        return float(min(max(0.0, js), np.log(2.0)))

    def __repr__(self) -> str:
        lo, hi = self.support
        return f"Spectrum(n_nodes={len(self)}, support=({lo:.4g}, {hi:.4g}), mean={self.mean:.4g})"
