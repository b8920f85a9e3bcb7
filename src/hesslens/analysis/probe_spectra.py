"""Spectra one probe at a time, so that every number drawn from them comes with its spread
over probes: the distance of each block's spectrum to the full one, the share of the
spectrum near zero (the bulk), the count of eigenvalues outside it, and how unlike one
another the blocks are (heterogeneity).

For the full operator and each block, :func:`probe_spectra` computes the top-``k``
eigenpairs once and then one deflated SLQ measure per probe seed; probe ``j`` of every entry
uses the seed ``seed + 1 + j``. The statistics are free functions of those measures, the same
for a CNN's layers and a transformer's blocks:

* :func:`bulk_mass` -- the spectral mass within ``width`` x ``|top eigenvalue|`` of zero;
* :func:`outlier_count` -- ``dim`` x the mass outside that band: how many eigenvalues lie
  beyond the bulk (deflated ones count exactly 1 each);
* :func:`heterogeneity` -- the mean Wasserstein-1 distance between every pair of blocks'
  spectra, each divided by its own largest ``|eigenvalue|`` (0 when all blocks have one
  shape; a measure of how different the blocks' spectra are, comparable across networks
  because it is in units of each block's own top eigenvalue);
* :func:`log_spread` -- the standard deviation of ``log10`` of positive values (e.g. the
  blocks' top eigenvalues): how many decades their scales spread over.

Example:
    >>> import torch, hesslens as hl
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
    ...                             torch.nn.Linear(8, 3))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy,
    ...                (torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> ps = probe_spectra(H, k=2, n_probes=3, n_steps=10)
    >>> ps.names, ps.distances().shape
    (['0', '2'], (3, 2))
    >>> 0.0 <= heterogeneity({n: ps.spectra[n][0] for n in ps.names})
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hesslens.analysis.similarity import DEFAULT_NORMALIZE, wasserstein
from hesslens.analysis.spectra import measure_spectrum, top_eigenpairs
from hesslens.checks import check_positive_int
from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum

__all__ = ["BULK_WIDTH", "ProbeSpectra", "bulk_mass", "heterogeneity", "log_spread",
           "outlier_count", "probe_spectra"]

#: |eigenvalue| <= BULK_WIDTH x |top eigenvalue| counts as "near zero" (the bulk).
BULK_WIDTH = 0.05


def _spectrum(s: Any) -> Spectrum:
    return s if isinstance(s, Spectrum) else Spectrum.from_dict(s)


def bulk_mass(spectrum: Any, top: float | None = None, width: float = BULK_WIDTH) -> float:
    """The spectral mass with ``|lambda| <= width * |top|`` (``top``: the largest
    ``|eigenvalue|`` of the spectrum itself by default).

    >>> bulk_mass(Spectrum([0.0, 0.01, 1.0], [0.5, 0.3, 0.2]))
    0.8
    """
    s = _spectrum(spectrum)
    scale = abs(top) if top is not None else max(abs(s.support[0]), abs(s.support[1]))
    return float(s.weights[np.abs(s.nodes) <= width * scale].sum())


def outlier_count(spectrum: Any, dim: int, top: float | None = None,
                  width: float = BULK_WIDTH) -> float:
    """``dim * (1 - bulk_mass)``: the number of eigenvalues outside the bulk, as the measure
    estimates it (a spectrum over ``dim`` eigenvalues).

    >>> outlier_count(Spectrum.from_eigenvalues([0.0, 0.0, 0.01, 5.0]), dim=4)
    1.0
    """
    return float(dim) * (1.0 - bulk_mass(spectrum, top, width))


def heterogeneity(spectra: Mapping[str, Any], normalize: str = DEFAULT_NORMALIZE) -> float:
    """Mean Wasserstein-1 distance over all pairs of the blocks' spectra, each normalised by
    ``normalize`` (default: its own largest ``|eigenvalue|``).

    >>> s = Spectrum([0.0, 1.0], [0.9, 0.1])
    >>> heterogeneity({"a": s, "b": s.scaled(3.0)})
    0.0
    >>> round(heterogeneity({"a": s, "b": s.scaled(-1.0)}), 12)   # mirrored: 0.1 moves by 2
    0.2
    """
    items = [_spectrum(s) for s in spectra.values()]
    if len(items) < 2:
        raise HesslensInputError("heterogeneity needs the spectra of at least two blocks")
    pairs = [wasserstein(a, b, normalize) for a, b in itertools.combinations(items, 2)]
    return float(np.mean(pairs))


def log_spread(values: Sequence[float]) -> float:
    """Standard deviation (``ddof=0``) of ``log10`` of the positive ``values``: 0 when all are
    equal, 1 when they spread over about two decades; NaN with fewer than two positive ones.

    >>> log_spread([1.0, 100.0])
    1.0
    """
    v = np.asarray([float(x) for x in values if float(x) > 0], dtype=float)
    return float(np.log10(v).std()) if v.size >= 2 else math.nan


@dataclass(eq=False)
class ProbeSpectra:
    """One deflated SLQ measure per probe for the full operator and every block.

    Attributes:
        names: the blocks, forward order.
        dims: ``{"full" and each block: dimension}``.
        top: ``{entry: top eigenvalues (descending)}``.
        spectra: ``{entry: [Spectrum of probe 0, probe 1, ...]}``.
        settings: k, probes, steps, tolerance, seed.
        n_hvp: products used in all.
    """

    names: list[str]
    dims: dict[str, int]
    top: dict[str, list[float]]
    spectra: dict[str, list[Spectrum]]
    settings: dict[str, Any]
    n_hvp: int = 0

    @property
    def n_probes(self) -> int:
        return len(self.spectra["full"])

    def distances(self, normalize: str = DEFAULT_NORMALIZE) -> np.ndarray:
        """``(n_probes, n_blocks)``: W1 between block ``b``'s and the full spectrum of probe
        ``p`` (each normalised by ``normalize``)."""
        return np.array([[wasserstein(self.spectra[n][p], self.spectra["full"][p], normalize)
                          for n in self.names] for p in range(self.n_probes)])

    def bulk_masses(self, width: float = BULK_WIDTH) -> dict[str, list[float]]:
        """``{entry: [bulk mass of each probe]}``, the band set by the entry's top
        eigenvalue."""
        return {e: [bulk_mass(s, self.top[e][0], width) for s in specs]
                for e, specs in self.spectra.items()}

    def outlier_counts(self, width: float = BULK_WIDTH) -> dict[str, list[float]]:
        """``{entry: [outlier count of each probe]}``."""
        return {e: [outlier_count(s, self.dims[e], self.top[e][0], width) for s in specs]
                for e, specs in self.spectra.items()}

    def heterogeneity(self, normalize: str = DEFAULT_NORMALIZE) -> list[float]:
        """:func:`heterogeneity` of the blocks, one value per probe."""
        return [heterogeneity({n: self.spectra[n][p] for n in self.names}, normalize)
                for p in range(self.n_probes)]

    def traces(self) -> dict[str, list[float]]:
        """``{entry: [dim x mean of each probe's measure]}``: SLQ trace estimates."""
        return {e: [self.dims[e] * s.mean for s in specs] for e, specs in self.spectra.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON layout (spectra as ``{"nodes", "weights"}``)."""
        return {"names": list(self.names), "dims": dict(self.dims),
                "top": {k: list(v) for k, v in self.top.items()},
                "spectra": {k: [s.to_dict() for s in v] for k, v in self.spectra.items()},
                "settings": dict(self.settings), "n_hvp": int(self.n_hvp)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeSpectra:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(list(d["names"]), {k: int(v) for k, v in d["dims"].items()},
                       {k: [float(x) for x in v] for k, v in d["top"].items()},
                       {k: [Spectrum.from_dict(s) for s in v] for k, v in d["spectra"].items()},
                       dict(d.get("settings", {})), int(d.get("n_hvp", 0)))
        except KeyError as err:
            raise HesslensInputError(f"probe spectra lack {err}") from None


def probe_spectra(op: Any, *, layers: Sequence[str] | None = None, k: int = 3,
                  n_probes: int = 3, n_steps: int = 40, tol: float = 1e-6,
                  seed: int = 0) -> ProbeSpectra:
    """Top-``k`` eigenpairs and ``n_probes`` deflated one-probe SLQ measures of ``op`` and of
    each of its blocks (``layers``: all of ``op.layers`` by default).

    Args:
        op: a curvature operator (:class:`hesslens.Hessian` or a relative) with ``block``.
        layers: block names (forward order).
        k: eigenpairs per entry (deflated from each probe's measure).
        n_probes, n_steps: probes per entry and Lanczos steps per probe.
        tol: relative tolerance of the eigenvalues.
        seed: the eigensolver's seed; probe ``j`` uses ``seed + 1 + j``.
    """
    check_positive_int(n_probes, "n_probes")
    names = list(op.layers if layers is None else layers)
    entries = {"full": op, **{n: op.block(n) for n in names}}
    dims, tops, spectra, n_hvp = {}, {}, {}, 0
    for name, entry in entries.items():
        top = top_eigenpairs(entry, k, tol=tol, seed=seed)
        n_hvp += int(top.n_hvp)
        per_probe = []
        for j in range(n_probes):
            est = measure_spectrum(entry, k=k, n_probes=1, n_steps=n_steps, tol=tol,
                                   seed=seed + 1 + j, top=top)
            n_hvp += est.n_hvp - int(top.n_hvp)
            per_probe.append(est.density)
        dims[name] = int(entry.dim)
        tops[name] = [float(v) for v in top.values]
        spectra[name] = per_probe
    settings = {"k": k, "n_probes": n_probes, "n_steps": n_steps, "tol": tol, "seed": seed,
                "probe_seeds": [seed + 1 + j for j in range(n_probes)]}
    return ProbeSpectra(names, dims, tops, spectra, settings, n_hvp)
