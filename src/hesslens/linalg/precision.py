"""The precision the products are computed in, and the stopping rules derived from it.

An estimate is only as accurate as its products. :func:`~hesslens.linalg.operator.product_eps`
says how accurate they are (``op.product_eps`` where an operator declares it, e.g. a bfloat16
network multiplied with float32 vectors, else the machine epsilon of ``op.dtype``), and
:class:`Precision` turns that one number into every threshold of the estimators:

* *fine* products (float32, float64: ``eps <= 1e-6``): their rounding is far below any tolerance
  asked of a curvature estimate. An eigenvalue whose error bound is at their rounding level
  (``floor = 100 eps scale``, ``scale`` the largest ``|Ritz value|``) counts as converged, as
  scipy counts machine precision; a Lanczos residual below ``10 eps`` of the operator's norm is
  an invariant subspace, whose Ritz values are exact.
* *coarse* products (bfloat16, float16): rounding moves an eigenvalue by up to ``noise = 2 eps
  scale`` (three times the largest product error measured, 0.62 eps scale, on an MLP, an
  attention block, a CNN and a deep tanh network in both dtypes) and a trace by
  ``2 eps ||A||_F``. An eigenvalue converges only when its residual
  bound *plus* that noise is within ``tol |theta|``; the Lanczos run always refines its values
  to the products' rounding level (``eps scale``: at the loose tolerances half precision allows,
  a young Krylov space misses eigenvalues) and restarts on a residual at that level, never
  calling its values exact; a trace's standard error includes the rounding term. Values that
  cannot reach the tolerance are reported ``converged=False`` with a
  :class:`~hesslens.errors.PrecisionWarning` that names the fix.

The measurements behind these constants are in ``benchmarks/README.md``.

Example
-------
>>> import torch
>>> from hesslens.linalg import MatrixOperator
>>> p = Precision.of(MatrixOperator(torch.eye(3, dtype=torch.bfloat16)))
>>> p.name, p.fine, p.noise(1.0)
('bfloat16', False, 0.015625)
>>> Precision.of(MatrixOperator(torch.eye(3))).fine
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hesslens.linalg.operator import product_eps

__all__ = ["FINE_EPS", "Precision", "precision_advice"]

#: Product precisions at or below this epsilon are *fine* (float32 and float64).
FINE_EPS = 1e-6

# Multiples of eps (see the module docstring).
_FLOOR_EPS = 100.0  # fine: the rounding level accepted as converged
_NOISE_EPS = 2.0  # coarse: what rounding may move an eigenvalue by, times scale
_SETTLE_EPS = 1.0  # coarse: a bound below this is as refined as the products allow
_BREAKDOWN_EPS = 10.0

_NAMED = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def precision_advice() -> str:
    """The fix every precision message gives."""
    return ("analyse a float32 or float64 copy (e.g. hl.Hessian(model, loss_fn, data, "
            "dtype=torch.float32))")


@dataclass(frozen=True)
class Precision:
    """The thresholds of one product precision ``eps`` (see the module docstring)."""

    eps: float
    dtype: torch.dtype | None = None  # the dtype named in messages (None: eps only)

    @classmethod
    def of(cls, op: object) -> Precision:
        """The precision of ``op``'s products (:func:`product_eps`)."""
        eps = product_eps(op)
        named = [d for d in (getattr(op, "dtype", None), *_NAMED)
                 if isinstance(d, torch.dtype) and d.is_floating_point
                 and torch.finfo(d).eps == eps]
        return cls(eps, named[0] if named else None)

    @property
    def fine(self) -> bool:
        """Whether rounding is negligible beside any tolerance asked (float32, float64)."""
        return self.eps <= FINE_EPS

    @property
    def name(self) -> str:
        """The dtype whose precision the products have, for messages."""
        if self.dtype is None:
            return f"precision eps={self.eps:.2g}"
        return str(self.dtype).removeprefix("torch.")

    def floor(self, scale: float) -> float:
        """Absolute error bound below which a Ritz value is not refined further."""
        return (_FLOOR_EPS if self.fine else _SETTLE_EPS) * self.eps * scale

    def noise(self, scale: float) -> float:
        """What rounding of the products may move an eigenvalue by (0 when fine: it is then
        inside the floor, which counts as converged)."""
        return 0.0 if self.fine else _NOISE_EPS * self.eps * scale

    def accepted(self, tol: float, theta: float, scale: float) -> float:
        """The largest error a value ``theta`` may have to count as converged."""
        target = tol * abs(theta)
        return max(target, self.floor(scale)) if self.fine else target

    @property
    def breakdown_tol(self) -> float:
        """Relative residual taken as an invariant Krylov space (whose Ritz values are exact):
        ``10 eps``, and for coarse products ``10 eps`` of float32 (their rounding alone leaves
        larger residuals, so only a space invariant to the working vectors' rounding counts)."""
        eps = self.eps if self.fine else torch.finfo(torch.float32).eps
        return _BREAKDOWN_EPS * eps

    @property
    def restart_tol(self) -> float:
        """Relative residual below which :func:`~hesslens.linalg.eigsh` stops extending a
        Krylov space and restarts from a random vector (to find repeated eigenvalues): the
        invariance of :attr:`breakdown_tol` for fine products; for coarse ones a residual at
        their own rounding level (``eps``), where the next Lanczos vector would be noise. The
        values of such a block keep their residual bounds: they are not exact."""
        return self.breakdown_tol if self.fine else _SETTLE_EPS * self.eps

    def rounding_stderr(self, sum_sq_products: float) -> float:
        """The error rounding adds to a trace estimate whose products have squared norms
        summing to ``sum_sq_products`` (an estimate of ``||A||_F^2``): ``2 eps ||A||_F``, twice
        the typical size of ``tr(E)`` for a rounding error ``E`` of the products (0 when
        fine)."""
        return 0.0 if self.fine else _NOISE_EPS * self.eps * math.sqrt(max(sum_sq_products, 0.0))

    def message(self, what: str, asked: str) -> str:
        """A warning that ``what`` could not reach ``asked`` in this precision, and the fix."""
        return (f"{what} cannot reach {asked}: the products are computed in {self.name} "
                f"(relative precision {self.eps:.1e}), whose rounding alone limits the accuracy; "
                f"the values are as good as {self.name} allows and are marked converged=False. "
                f"To get the accuracy asked for, {precision_advice()}, or loosen the tolerance")
