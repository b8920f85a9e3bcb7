"""Result records of the eigenvalue and trace estimators.

Example
-------
>>> TraceResult(value=12.5, stderr=0.25, n_hvp=100, method="hutchinson", n_samples=100)
TraceResult(value=12.5 ± 0.25, method='hutchinson', n_hvp=100, n_samples=100)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["EigenResult", "TraceResult"]


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenvalues (and eigenvectors) of a symmetric operator, with their accuracy.

    Attributes
    ----------
    values : Tensor
        1-D float64 tensor (CPU) of the ``k`` eigenvalue estimates, sorted descending.
    vectors : Tensor or None
        ``(k, dim)`` tensor; row ``i`` is the unit eigenvector estimate of ``values[i]``.
    residuals : Tensor
        float64 ``(k,)``: the residual norms ``||A y_i - theta_i y_i||`` of the estimates.
    converged : Tensor
        bool ``(k,)``: whether each value met the requested tolerance.
    n_hvp : int
        Number of operator products used (every vector counts).
    n_steps : int
        Number of iterations (Lanczos steps) taken.
    which : str
        The part of the spectrum asked for: ``"LA"``, ``"SA"`` or ``"LM"``.
    bounds : Tensor or None
        float64 ``(k,)``: a-posteriori error bounds ``|theta_i - lambda| <= bounds[i]`` used
        for the convergence test (``None`` where the producer has none).

    Examples
    --------
    >>> import torch
    >>> r = EigenResult(torch.tensor([3.0, 1.0], dtype=torch.float64), None,
    ...                 torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.bool),
    ...                 n_hvp=4, n_steps=4, which="LA")
    >>> r
    EigenResult(which='LA', values=[3, 1], converged=2/2, max_residual=0, n_hvp=4)
    >>> len(r)
    2
    """

    values: Tensor
    vectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    n_hvp: int
    n_steps: int
    which: str
    bounds: Tensor | None = None

    def __len__(self) -> int:
        return int(self.values.numel())

    @property
    def k(self) -> int:
        """Number of eigenvalues in the result."""
        return len(self)

    @property
    def all_converged(self) -> bool:
        """True when every value met the tolerance."""
        return bool(self.converged.all())

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready summary (the vectors are left out)."""
        return {
            "values": [float(v) for v in self.values],
            "residuals": [float(v) for v in self.residuals],
            "converged": [bool(c) for c in self.converged],
            "bounds": None if self.bounds is None else [float(b) for b in self.bounds],
            "n_hvp": int(self.n_hvp),
            "n_steps": int(self.n_steps),
            "which": self.which,
        }

    def __repr__(self) -> str:
        vals = ", ".join(_fmt(float(v)) for v in self.values[:8])
        if len(self) > 8:
            vals += ", ..."
        res = _fmt(float(self.residuals.max())) if len(self) else "nan"
        return (
            f"EigenResult(which={self.which!r}, values=[{vals}], "
            f"converged={int(self.converged.sum())}/{len(self)}, max_residual={res}, "
            f"n_hvp={self.n_hvp})"
        )


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its standard error.

    Attributes
    ----------
    value : float
        The estimate.
    stderr : float
        Its standard error (sample standard deviation over ``sqrt(n_samples)``); 0 for an
        exact computation.
    n_hvp : int
        Operator products used. Estimates that share probes report the shared total.
    method : str
        ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
    n_samples : int
        Number of random samples behind ``stderr`` (0 for ``"exact"``).
    converged : bool or None
        For an estimate run to a target relative standard error (``rtol``): whether it got
        there before its product budget ran out; ``None`` for a fixed budget.
    """

    value: float
    stderr: float
    n_hvp: int
    method: str
    n_samples: int
    converged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dictionary."""
        return {
            "value": float(self.value),
            "stderr": float(self.stderr),
            "n_hvp": int(self.n_hvp),
            "method": self.method,
            "n_samples": int(self.n_samples),
            "converged": self.converged,
        }

    def __repr__(self) -> str:
        flag = "" if self.converged is None else f", converged={self.converged}"
        return (
            f"TraceResult(value={_fmt(self.value)} ± {_fmt(self.stderr)}, "
            f"method={self.method!r}, n_hvp={self.n_hvp}, n_samples={self.n_samples}{flag})"
        )
