"""Top eigenpairs started from the previous measurement's eigenvectors.

During training the top eigenvectors of the Hessian move little between two measurements a
few steps apart, so a Lanczos run started from the last ones converges in a few products where
a random start needs several times more. :func:`warm_eigsh` is the one place the monitor asks
for a warm-started :func:`hesslens.linalg.eigsh`.

Until ``eigsh`` takes a start, the warm start is exact through a reflection: ``eigsh`` draws its
start ``g`` from ``seed``; with the Householder reflection ``R`` that maps ``g`` to the wanted
start ``x``, ``eigsh`` on ``R A R`` (similar to ``A``: the same eigenvalues, Ritz values and error
bounds) builds the Krylov space of ``A`` from ``x``, and ``R y`` are the Ritz vectors of ``A``.
Each product costs two rank-one updates more than ``A``'s.

Example:
    >>> import torch
    >>> from hesslens.linalg import MatrixOperator
    >>> A = MatrixOperator(torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64)))
    >>> cold = warm_eigsh(A, k=1, tol=1e-8)
    >>> start = cold.vectors + 1e-3 * torch.randn(1, 200, dtype=torch.float64)
    >>> warm = warm_eigsh(A, k=1, tol=1e-8, start=start)
    >>> round(float(warm.values[0]), 8), warm.n_hvp < cold.n_hvp
    (1.0, True)
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import Tensor

from hesslens.linalg import EigenResult, eigsh
from hesslens.linalg.operator import SymmetricOperator
from hesslens.linalg.probes import random_probes

__all__ = ["warm_eigsh"]

# Whether hesslens.linalg.eigsh takes a start itself (then it is given the block of vectors).
_EIGSH_TAKES_START = "v0" in inspect.signature(eigsh).parameters


class _Reflected:
    """``R A R`` for the Householder reflection ``R`` that maps ``g`` to ``x`` (unit vectors)."""

    def __init__(self, op: SymmetricOperator, g: Tensor, x: Tensor) -> None:
        self.op, self.dim, self.dtype, self.device = op, op.dim, op.dtype, op.device
        w = g - x
        norm = float(w.norm())
        self.w = None if norm < 1e-14 else (w / norm).to(device=op.device)

    def reflect(self, V: Tensor) -> Tensor:
        if self.w is None:
            return V
        w = self.w.to(V.dtype)
        return V - 2.0 * (V @ w)[:, None] * w[None, :]

    def matmat(self, V: Tensor) -> Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        return self.reflect(self.op.matmat(self.reflect(V)))


def warm_eigsh(op: SymmetricOperator, k: int, tol: float, seed: int = 0,
               start: Tensor | None = None, max_steps: int | None = None) -> EigenResult:
    """``eigsh(op, k, tol=tol, seed=seed)`` (largest eigenvalues, vectors returned), started
    from ``start`` (a vector, or a ``(m, dim)`` block of earlier eigenvectors whose normalised
    sum is the start) instead of a random vector when given."""
    if start is None:
        return eigsh(op, k=k, tol=tol, seed=seed, max_steps=max_steps)
    block = start.reshape(-1, op.dim).to(torch.float64)
    if _EIGSH_TAKES_START:  # pragma: no cover - the linear algebra's own warm start
        return eigsh(op, k=k, tol=tol, seed=seed, max_steps=max_steps, v0=block)
    rows = block / block.norm(dim=1, keepdim=True).clamp_min(1e-300)
    x = rows.sum(0)
    if not bool(torch.isfinite(x).all()) or float(x.norm()) == 0.0:
        return eigsh(op, k=k, tol=tol, seed=seed, max_steps=max_steps)
    x = (x / x.norm()).cpu()
    # the start eigsh draws from seed (hesslens.linalg.lanczos: a float64 Gaussian, CPU)
    g = random_probes(1, op.dim, "gaussian", torch.Generator().manual_seed(seed),
                      torch.float64, "cpu")[0]
    g = g / g.norm()
    reflected = _Reflected(op, g, x)
    res = eigsh(reflected, k=k, tol=tol, seed=seed, max_steps=max_steps)
    vectors = None if res.vectors is None else reflected.reflect(res.vectors)
    return dataclasses.replace(res, vectors=vectors)
