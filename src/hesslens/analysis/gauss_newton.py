"""The Gauss-Newton split of a Hessian (block): ``Hess = G + H`` with
``G = J^T (d2 loss / d outputs2) J`` (positive semi-definite for convex losses such as
cross-entropy) and the residual ``H = Hess - G`` (the part from the curvature of the network
itself, ``sum_c (d loss / d f_c) d2 f_c / d theta2``).

For each entry (the full network or one layer's block) :func:`gauss_newton_split` measures the
top eigenvalues and the density of ``G`` and of the residual. The residual is indefinite, so
its "top" eigenvalues are those of largest magnitude (``which="LM"``). Traces come from the
study (shared probes over all layers); the residual's is ``tr(Hess) - tr(G)``.

Example:
    >>> import torch, hesslens as hl
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy,
    ...                (torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> split = gauss_newton_split(H, k=2, n_probes=2, n_steps=20)
    >>> sorted(split.to_dict())[:3]
    ['gn', 'gn_top_ratio', 'residual']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hesslens.analysis.similarity import DEFAULT_NORMALIZE, js_divergence, wasserstein
from hesslens.analysis.spectra import SpectrumEstimate, measure_spectrum
from hesslens.linalg import Spectrum, TraceResult

__all__ = ["GaussNewtonSplit", "gauss_newton_split", "residual_trace"]


def residual_trace(hessian: TraceResult | None, gn: TraceResult | None) -> TraceResult | None:
    """``tr(Hess) - tr(G)`` from the two estimates; the standard error adds in quadrature
    (the estimates share probe seeds, so this overstates it when they are correlated)."""
    if hessian is None or gn is None:
        return None
    return TraceResult(
        value=float(hessian.value) - float(gn.value),
        stderr=math.hypot(float(hessian.stderr), float(gn.stderr)),
        n_hvp=int(hessian.n_hvp) + int(gn.n_hvp),
        method="difference",
        n_samples=min(int(hessian.n_samples), int(gn.n_samples)),
    )


@dataclass(eq=False)
class GaussNewtonSplit:
    """``G`` and the residual of one entry.

    Attributes:
        gn: top eigenvalues (``"LA"``), density and trace of ``G``.
        residual: top eigenvalues by magnitude (``"LM"``), density and trace of ``Hess - G``.
        hessian_top: the entry's top Hessian eigenvalue (for the ratios), if known.
        similarity: ``{"normalize", "wasserstein", "js_divergence"}`` between the spectrum of
            ``G`` and the entry's Hessian spectrum (the paper's finding 4), if known.
    """

    gn: SpectrumEstimate
    residual: SpectrumEstimate
    hessian_top: float | None = None
    similarity: dict[str, Any] | None = None

    @property
    def residual_ratio(self) -> float | None:
        """``max |eig(residual)| / max eig(G)``: how large the residual is next to ``G``."""
        g = self.gn.top_eigenvalues[0]
        r = max(abs(v) for v in self.residual.top_eigenvalues)
        return r / g if g > 0 else None

    @property
    def gn_top_ratio(self) -> float | None:
        """``max eig(G) / max eig(Hess)``."""
        if self.hessian_top is None or self.hessian_top == 0:
            return None
        return self.gn.top_eigenvalues[0] / self.hessian_top

    def to_dict(self) -> dict[str, Any]:
        """``{"gn": {...}, "residual": {...}, "gn_top_ratio", "residual_ratio",
        "similarity_to_hessian"}``; ``gn`` and ``residual`` as
        :meth:`SpectrumEstimate.to_dict`."""
        return {
            "gn": self.gn.to_dict(),
            "residual": self.residual.to_dict(),
            "gn_top_ratio": self.gn_top_ratio,
            "residual_ratio": self.residual_ratio,
            "similarity_to_hessian": self.similarity,
        }


def gauss_newton_split(
    op: Any,
    *,
    k: int = 5,
    n_probes: int = 2,
    n_steps: int = 80,
    tol: float = 1e-6,
    seed: int = 0,
    gn_trace: TraceResult | None = None,
    hessian_trace: TraceResult | None = None,
    hessian_top: float | None = None,
    hessian_density: Spectrum | None = None,
    normalize: str = DEFAULT_NORMALIZE,
) -> GaussNewtonSplit:
    """Measure ``G`` and the residual of the Hessian (block) operator ``op``.

    Args:
        op: a :class:`hesslens.Hessian` or one of its blocks (``op.gauss_newton()`` and
            ``op.residual()`` give the two parts on the same parameters).
        k, n_probes, n_steps, tol, seed: as in :func:`~hesslens.analysis.spectra.measure_spectrum`.
        gn_trace, hessian_trace: trace estimates of ``G`` and of the Hessian for this entry
            (made elsewhere from shared probes); the residual's trace is their difference.
        hessian_top, hessian_density: the entry's Hessian top eigenvalue and spectrum, for the
            ratio and for the ``G``-vs-Hessian similarity.
        normalize: normalisation of that similarity.
    """
    gn = measure_spectrum(op.gauss_newton(), k=k, n_probes=n_probes, n_steps=n_steps, tol=tol,
                          seed=seed, trace=gn_trace)
    res = measure_spectrum(op.residual(), k=k, n_probes=n_probes, n_steps=n_steps, tol=tol,
                           which="LM", seed=seed, trace=residual_trace(hessian_trace, gn_trace))
    similarity = None
    if hessian_density is not None:
        similarity = {
            "normalize": normalize,
            "wasserstein": wasserstein(gn.density, hessian_density, normalize),
            "js_divergence": js_divergence(gn.density, hessian_density, normalize),
        }
    return GaussNewtonSplit(gn=gn, residual=res, hessian_top=hessian_top, similarity=similarity)
