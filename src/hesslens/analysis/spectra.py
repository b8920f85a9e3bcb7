"""What the layer study measures on one curvature operator: its top eigenvalues and its
eigenvalue density (deflated with those same eigenpairs), as one record.

Example:
    >>> import torch, hesslens as hl
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy,
    ...                (torch.randn(32, 4), torch.randint(0, 3, (32,))))
    >>> s = measure_spectrum(H, k=3, n_probes=2, n_steps=20)
    >>> len(s.top_eigenvalues), round(float(s.density.weights.sum()), 12)
    (3, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hesslens.linalg import EigenResult, Spectrum, TraceResult, slq

__all__ = ["SpectrumEstimate", "measure_spectrum", "top_eigenpairs"]


@dataclass(eq=False)
class SpectrumEstimate:
    """One operator's top eigenvalues, trace and density.

    Attributes:
        top: the Lanczos result (values descending for ``which="LA"``; vectors kept for
            reuse, e.g. deflation).
        density: the SLQ spectral measure, deflated with ``top``'s eigenpairs.
        trace: the trace estimate, where one was made.
        dim: the operator's size.
        tol: the eigenvalue tolerance used.
        n_hvp: operator products for the eigenvalues and the density.
    """

    top: EigenResult
    density: Spectrum
    trace: TraceResult | None
    dim: int
    tol: float
    n_hvp: int = 0

    @property
    def top_eigenvalues(self) -> list[float]:
        """The top eigenvalues as plain floats, in the result's order."""
        return [float(v) for v in self.top.values]

    def eigensolver_dict(self) -> dict[str, Any]:
        """How accurate the eigenvalues are: residuals, error bounds, convergence, cost."""
        info = self.top.to_dict()
        info.pop("values")
        info["tol"] = self.tol
        return info

    def to_dict(self) -> dict[str, Any]:
        """``{"dim", "top_eigenvalues", "eigensolver", "trace", "density"}`` (JSON-ready)."""
        return {
            "dim": int(self.dim),
            "top_eigenvalues": self.top_eigenvalues,
            "eigensolver": self.eigensolver_dict(),
            "trace": None if self.trace is None else self.trace.to_dict(),
            "density": self.density.to_dict(),
        }


def top_eigenpairs(op: Any, k: int, *, tol: float, seed: int, which: str = "LA") -> EigenResult:
    """``op.eigenvalues`` with ``k`` capped at the operator's size, vectors included."""
    return op.eigenvalues(k=max(1, min(int(k), op.dim)), which=which, tol=tol, seed=seed,
                          return_vectors=True)


def measure_spectrum(
    op: Any,
    *,
    k: int = 5,
    n_probes: int = 2,
    n_steps: int = 80,
    tol: float = 1e-8,
    which: str = "LA",
    seed: int = 0,
    trace: TraceResult | None = None,
    top: EigenResult | None = None,
) -> SpectrumEstimate:
    """Top-``k`` eigenpairs, then the SLQ density deflated with exactly those eigenpairs (each
    product computed once: the density reuses the eigenvectors instead of recomputing them).

    Args:
        op: a curvature operator (or any :mod:`hesslens.linalg` operator with ``eigenvalues``).
        k: eigenpairs to compute and deflate.
        n_probes, n_steps: SLQ probes and Lanczos steps per probe (capped at the size).
        tol: relative tolerance of the eigenvalues (a-posteriori error bound).
        which: ``"LA"`` (largest) or ``"LM"`` (largest magnitude, for indefinite parts).
        seed: seed of the Lanczos start vector and of the probes.
        trace: a trace estimate made elsewhere (shared probes), stored alongside.
        top: eigenpairs already computed (skips the eigenvalue step).
    """
    if top is None:
        top = top_eigenpairs(op, k, tol=tol, seed=seed, which=which)
    rank = len(top)
    if rank >= op.dim:
        density, n_hvp = Spectrum.from_eigenvalues(top.values), 0
    else:
        steps = max(1, min(int(n_steps), op.dim - rank))
        density, n_hvp = slq(op, n_probes=n_probes, n_steps=steps, seed=seed, deflate=top)
    return SpectrumEstimate(top=top, density=density, trace=trace, dim=int(op.dim), tol=tol,
                            n_hvp=int(top.n_hvp) + int(n_hvp))
