"""The Lanczos process and top-k eigenvalues from it.

:func:`lanczos` runs ``m`` steps of the symmetric Lanczos process from one start vector,
with full reorthogonalisation (classical Gram-Schmidt applied twice, "DGKS"), and returns the
tridiagonal matrix ``T = Q A Q^T`` and the float64 basis ``Q`` (memory ``8 * m * dim``
bytes: for small problems and tests). :func:`eigsh` gives the extreme eigenvalues of ``A`` as
the Ritz values of a Krylov space in a bounded basis (thick restart beyond ``ncv`` vectors,
memory ``(ncv + 2) * dim`` entries), stopped by an a-posteriori error bound per Ritz value
(conventions of ``scipy.sparse.linalg.eigsh``).

Vectors are cast to ``op.dtype`` only to be multiplied; the small projected problems are
solved in float64.

Example
-------
>>> import torch
>>> from hesslens.linalg import MatrixOperator, eigsh
>>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
>>> res = eigsh(MatrixOperator(A), k=3)
>>> [round(v, 4) for v in res.values.tolist()]
[100.0, 99.0, 98.0]
>>> bool(res.converged.all())
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh as scipy_eigh
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from hesslens.errors import BudgetWarning, HesslensInputError, PrecisionWarning
from hesslens.linalg.budget import BASIS_VECTORS
from hesslens.linalg.operator import SymmetricOperator, as_operator, matmat64, matmat_as
from hesslens.linalg.precision import Precision
from hesslens.linalg.probes import generator, random_probes
from hesslens.linalg.results import EigenResult

__all__ = ["WHICH", "LanczosRun", "eigsh", "lanczos"]

#: The parts of the spectrum :func:`eigsh` can target (as in scipy's eigsh).
WHICH = ("LA", "SA", "LM")

# eigsh(ncv=None) keeps every Lanczos vector (no restart, the fewest products) while that basis
# takes at most this many bytes; beyond, it restarts in a basis of max(2k + 8, 20) vectors.
_AUTO_NCV_BYTES = 2**26

# The relative size of the random vector added to a warm start (see eigsh's v0): enough that
# start vectors which are exact eigenvectors do not make the Krylov space invariant at once
# (whose restart from a random vector costs a cold start), small enough to cost ~nothing.
_WARM_RANDOM = 1e-3


def _tridiag_eig(alpha: np.ndarray, offdiag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix."""
    return eigh_tridiagonal(np.asarray(alpha, dtype=np.float64), np.asarray(offdiag))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the algorithms keep their vectors in: float64 for a float64 operator, else
    float32 (a basis twice reorthogonalised in float32 is as accurate as float32 products)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Column chunk of the float64 reductions of lower-precision vectors (bounds their temporaries
# to about 8 MiB per reduction).
_REDUCE_ENTRIES = 2**20


def _gram64(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B.T`` accumulated in float64 (CPU result), without a float64 copy of ``A``/``B``."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return (A @ B.T).cpu()
    n = A.shape[1]
    step = max(1, _REDUCE_ENTRIES // max(A.shape[0], B.shape[0], 1))
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, n, step):
        out += A[:, c : c + step].to(torch.float64) @ B[:, c : c + step].to(torch.float64).T
    return out.cpu()


def _rowdot(A: Tensor, B: Tensor) -> Tensor:
    """Row-wise dot products ``(A * B).sum(1)`` accumulated in float64 (CPU result)."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return (A * B).sum(dim=1).cpu()
    n = A.shape[1]
    step = max(1, _REDUCE_ENTRIES // max(A.shape[0], 1))
    out = torch.zeros(A.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, n, step):
        out += (A[:, c : c + step].to(torch.float64) * B[:, c : c + step].to(torch.float64)).sum(1)
    return out.cpu()


def _combine_rows_(X: Tensor, C: np.ndarray | Tensor) -> Tensor:
    """``X[:p] <- C @ X[:q]`` in place for ``C`` of shape ``(p, q)``, ``p <= q``: a column chunk
    at a time, so no second copy of ``X`` is made. Returns ``X[:p]``."""
    Ct = torch.as_tensor(C).to(dtype=X.dtype, device=X.device)
    p, q = Ct.shape
    step = max(1, _REDUCE_ENTRIES // max(q, 1))
    for c in range(0, X.shape[1], step):
        X[:p, c : c + step] = Ct @ X[:q, c : c + step]
    return X[:p]


def _orthonormalize_rows_(Y: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows of ``Y``, computed in place (``Y`` is overwritten).

    Two passes of Cholesky-free "eigen-QR": ``G = Y Y^T = V diag(d) V^T`` (float64), rows
    ``diag(d)^-1/2 V^T Y``. The first pass drops directions with ``d_i <= eps * max(d)``
    (``eps`` of ``Y.dtype``: rows that are dependent up to rounding), so the result may have
    fewer rows than ``Y``; the second makes the rows orthonormal to rounding.
    """
    eps = torch.finfo(Y.dtype).eps
    for first in (True, False):
        if Y.shape[0] == 0:
            return Y
        d, V = torch.linalg.eigh(_gram64(Y, Y))
        dmax = float(d.max())
        if dmax <= 0:
            return Y[:0]
        keep = d > eps * dmax if first else d > 0
        d, V = d[keep], V[:, keep]
        C = (V / d.sqrt()).T.flip(0)  # largest directions first
        Y = _combine_rows_(Y, C)
    return Y


def _coef(W: Tensor, Q: Tensor) -> Tensor:
    """Gram-Schmidt coefficients ``W Q^T`` in ``W``'s dtype and device, accumulated in float64
    for lower precisions: long float32 dot products leave float32 bases far from orthogonal
    (``benchmarks/README.md``, linear algebra)."""
    if W.dtype == torch.float64:
        return W @ Q.T
    return _gram64(W, Q).to(dtype=W.dtype, device=W.device)


def _norm64(W: Tensor) -> Tensor:
    """Row norms accumulated in float64 (CPU result), without a float64 copy of ``W``."""
    if W.dtype == torch.float64:
        return torch.linalg.vector_norm(W, dim=1).cpu()
    return _rowdot(W, W).sqrt()


class _BatchLanczos:
    """Independent Lanczos runs advanced together: one ``matmat`` of the active runs a step.

    Every run keeps its own orthonormal float64 basis (``Q[i, :m[i]]``) and is fully
    reorthogonalised against it (and against an optional fixed basis ``deflation``, whose
    span the runs then never leave). A run stops when its residual vanishes relative to the
    operator's norm ("breakdown": its Krylov space is invariant), when its basis fills the
    space ("exhausted"), or after ``max_steps`` steps ("budget"). ``restart`` continues a
    stopped run from a new vector orthogonal to everything so far, starting a new diagonal
    block of ``T`` (used by :func:`eigsh` to find repeated eigenvalues).
    """

    def __init__(
        self,
        op: SymmetricOperator,
        starts: Tensor,
        max_steps: int,
        deflation: Tensor | None = None,
        breakdown_tol: float | None = None,
    ) -> None:
        self.op = op
        self.dim = op.dim
        self.device = op.device
        self.U = deflation
        n_runs = int(starts.shape[0])
        rank = 0 if deflation is None else int(deflation.shape[0])
        self.limit = self.dim - rank
        self.max_steps = min(int(max_steps), self.limit)
        # 10 eps: a residual that small is rounding noise of the products; a larger threshold
        # cut float32 runs short when the largest eigenvalue is ~1e5 times the bulk.
        self.breakdown_tol = (Precision.of(op).breakdown_tol if breakdown_tol is None
                              else float(breakdown_tol))
        if self.max_steps < 1:
            raise HesslensInputError("nothing to do: the deflation basis spans the whole space")

        V = self._deflate(starts.to(dtype=torch.float64, device=self.device))
        V = self._deflate(V)
        norms = V.norm(dim=1)
        if bool((norms == 0).any()):
            raise HesslensInputError("a Lanczos start vector is zero (after deflation)")
        self.Q = torch.zeros(
            n_runs, min(self.max_steps, 32), self.dim, dtype=torch.float64, device=self.device
        )
        self.Q[:, 0] = V / norms[:, None]
        self.alpha: list[list[float]] = [[] for _ in range(n_runs)]
        self.beta: list[list[float]] = [[] for _ in range(n_runs)]
        self.m = [0] * n_runs
        self.status = ["live"] * n_runs
        self.block_starts: list[list[int]] = [[0] for _ in range(n_runs)]
        self.anorm = [0.0] * n_runs
        self.n_hvp = 0

    def _deflate(self, W: Tensor) -> Tensor:
        if self.U is None:
            return W
        return W - (W @ self.U.T) @ self.U

    def _ensure_capacity(self, size: int) -> None:
        cap = self.Q.shape[1]
        if size <= cap:
            return
        new_cap = min(max(2 * cap, size), self.max_steps)
        Q = torch.zeros(self.Q.shape[0], new_cap, self.dim, dtype=torch.float64, device=self.device)
        Q[:, :cap] = self.Q
        self.Q = Q

    @property
    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s == "live"]

    def step(self) -> None:
        """One Lanczos step of every live run (one product per live run)."""
        idx = self.active
        if not idx:
            return
        j = self.m[idx[0]]
        if any(self.m[i] != j for i in idx):  # pragma: no cover - internal invariant
            raise RuntimeError("live Lanczos runs out of step")
        n_runs = self.Q.shape[0]
        q = self.Q[:, j]
        if len(idx) == n_runs:
            w = matmat64(self.op, q)
        else:
            sel = torch.tensor(idx, device=self.device)
            w = torch.zeros_like(q)
            w[sel] = matmat64(self.op, q[sel])
        self.n_hvp += len(idx)
        w = self._deflate(w)
        wnorm = w.norm(dim=1).tolist()
        alpha = (q * w).sum(dim=1)
        w = w - alpha[:, None] * q
        if j > 0:
            beta_prev = torch.zeros(n_runs, dtype=torch.float64)
            for i in idx:
                if j not in self.block_starts[i]:
                    beta_prev[i] = self.beta[i][j - 1]
            w = w - beta_prev.to(self.device)[:, None] * self.Q[:, j - 1]
        Qj = self.Q[:, : j + 1]
        for _ in range(2):  # "twice is enough"
            coef = torch.bmm(Qj, w.unsqueeze(2))
            w = w - torch.bmm(coef.transpose(1, 2), Qj).squeeze(1)
            w = self._deflate(w)
        beta = w.norm(dim=1)
        alpha_l, beta_l = alpha.tolist(), beta.tolist()
        live = []
        for i in idx:
            self.alpha[i].append(alpha_l[i])
            self.beta[i].append(beta_l[i])
            self.m[i] += 1
            self.anorm[i] = max(self.anorm[i], wnorm[i])
            if self.m[i] >= self.limit:
                self.status[i] = "exhausted"
            elif beta_l[i] <= self.breakdown_tol * self.anorm[i]:
                self.status[i] = "breakdown"
            elif self.m[i] >= self.max_steps:
                self.status[i] = "budget"
            else:
                live.append(i)
        if live:
            self._ensure_capacity(j + 2)
            sel = torch.tensor(live, device=self.device)
            self.Q[sel, j + 1] = w[sel] / beta[sel, None]

    def restart(self, i: int, v: Tensor) -> bool:
        """Continue stopped run ``i`` from ``v`` made orthogonal to its basis (new block).

        Returns False (and leaves the run stopped) when no step is left or ``v`` has no
        component outside the basis.
        """
        m = self.m[i]
        if m >= self.max_steps:
            return False
        v = v.to(dtype=torch.float64, device=self.device).reshape(1, -1)
        norm0 = float(v.norm())
        Qi = self.Q[i, :m]
        for _ in range(2):
            v = self._deflate(v - (v @ Qi.T) @ Qi)
        norm = float(v.norm())
        if norm <= 1e-8 * norm0:
            return False
        self._ensure_capacity(m + 1)
        self.Q[i, m] = v[0] / norm
        self.block_starts[i].append(m)
        self.status[i] = "live"
        return True

    def blocks(self, i: int) -> list[tuple[int, int]]:
        """(start, stop) of every diagonal block of run ``i``'s tridiagonal matrix."""
        starts = self.block_starts[i]
        stops = [*starts[1:], self.m[i]]
        return list(zip(starts, stops))


class _Basis:
    """The rows of a restarted Lanczos basis in two allocations: the first ``head`` rows, into
    which the Ritz vectors to return are computed in place at the end, and the rest, dropped
    then. Returning ``k`` vectors thus takes no memory beyond the basis's own rows (one
    allocation would need ``k`` more rows for them while the basis is still held).

    Example:
        >>> B = _Basis(4, 1, 3, torch.float64, torch.device("cpu"))
        >>> B.row(0)[0] = torch.tensor([1.0, 0.0, 0.0]); B.row(2)[0] = torch.tensor([0.0, 1.0, 0.0])
        >>> B.coef(torch.tensor([[2.0, 3.0, 4.0]]), 3).tolist()
        [[2.0, 0.0, 3.0]]
        >>> B.take(np.array([[0.0, 0.0, 1.0]])).tolist()
        [[0.0, 1.0, 0.0]]
    """

    def __init__(self, rows: int, head: int, dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        head = max(0, min(int(head), int(rows)))
        self.head = torch.zeros(head, dim, dtype=dtype, device=device)
        self.tail = torch.zeros(int(rows) - head, dim, dtype=dtype, device=device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.head.shape[0] + self.tail.shape[0], self.head.shape[1])

    def _pieces(self, start: int, stop: int) -> list[Tensor]:
        """Views of the two allocations that make up rows ``start:stop``, in order."""
        h = self.head.shape[0]
        out = []
        if start < min(stop, h):
            out.append(self.head[start : min(stop, h)])
        if stop > max(start, h):
            out.append(self.tail[max(start - h, 0) : stop - h])
        return out

    def row(self, i: int) -> Tensor:
        """Row ``i`` as a ``(1, dim)`` view (writes go to the basis)."""
        h = self.head.shape[0]
        return self.head[i : i + 1] if i < h else self.tail[i - h : i - h + 1]

    def rows(self, start: int, stop: int) -> Tensor:
        """A copy of rows ``start:stop`` (for checks; the algorithm never joins them)."""
        return torch.cat(self._pieces(start, stop))

    def coef(self, W: Tensor, stop: int) -> Tensor:
        """``W @ rows[:stop].T`` (see :func:`_coef`)."""
        return torch.cat([_coef(W, P) for P in self._pieces(0, stop)], dim=1)

    def combine(self, c: Tensor, start: int, stop: int) -> Tensor:
        """``c @ rows[start:stop]``."""
        out, col = None, 0
        for P in self._pieces(start, stop):
            part = c[:, col : col + P.shape[0]]
            out = part @ P if out is None else out.addmm_(part, P)  # no second temporary
            col += P.shape[0]
        if out is None:  # no rows
            out = torch.zeros(c.shape[0], self.shape[1], dtype=self.head.dtype,
                              device=self.head.device)
        return out

    def subtract_combination_(self, W: Tensor, c: Tensor, start: int, stop: int) -> Tensor:
        """``W -= c @ rows[start:stop]`` in place, with no temporary of ``W``'s size."""
        col = 0
        for P in self._pieces(start, stop):
            W.addmm_(c[:, col : col + P.shape[0]], P, alpha=-1)
            col += P.shape[0]
        return W

    def combine_rows_(self, C: np.ndarray | Tensor) -> None:
        """``rows[:p] <- C @ rows[:q]`` in place for ``C`` of shape ``(p, q)``, ``p <= q``, a
        column chunk at a time (see :func:`_combine_rows_`)."""
        Ct = torch.as_tensor(C).to(dtype=self.head.dtype, device=self.head.device)
        p, q = Ct.shape
        step = max(1, _REDUCE_ENTRIES // max(q, 1))
        for c in range(0, self.shape[1], step):
            X = torch.cat([P[:, c : c + step] for P in self._pieces(0, q)])
            Y = Ct @ X
            row = 0
            for P in self._pieces(0, p):
                P[:, c : c + step] = Y[row : row + P.shape[0]]
                row += P.shape[0]

    def take(self, C: np.ndarray | Tensor) -> Tensor:
        """``C @ rows[:q]`` computed in place into the first rows and returned, the other rows
        dropped: the basis is spent."""
        p = int(torch.as_tensor(C).shape[0])
        if p > self.head.shape[0]:  # pragma: no cover - eigsh allocates k head rows
            raise RuntimeError(f"{p} vectors asked of a basis with {self.head.shape[0]} head rows")
        self.combine_rows_(C)
        self.tail = self.tail[:0].clone()
        return self.head[:p]


class _RestartedLanczos:
    """One Lanczos run in a basis of at most ``ncv`` vectors, thick-restarted (Wu and Simon 2000).

    The basis ``Q`` (rows, ``basis_dtype`` on ``basis_device``) holds, in order: *locked*
    vectors (exact eigenvectors kept from invariant blocks, 1 x 1 blocks of ``T``), closed
    blocks (invariant Krylov spaces, tridiagonal) and one open block. ``T = Q A Q^T`` is
    block diagonal; the open block may start with an arrowhead: ``nkeep`` Ritz vectors kept at a
    restart, ``T = diag(theta)`` coupled to the next Lanczos vector by ``beta * s_{m,i}``.
    Every new vector is reorthogonalised twice against the whole basis (classical
    Gram-Schmidt, "DGKS"). When the open block fills the basis, :meth:`compress` keeps the
    wanted Ritz vectors and the residual direction and the process goes on; before that, the
    run is exactly the unrestarted full-reorthogonalisation Lanczos of :class:`_BatchLanczos`.
    Memory: ``(ncv + 1) * dim`` basis entries and one update temporary; each product goes
    straight into the next row where the operator has ``matmat_into`` (one more vector where
    it has not).
    """

    def __init__(
        self,
        op: SymmetricOperator,
        start: Tensor,
        ncv: int,
        max_steps: int,
        dtype: torch.dtype,
        device: torch.device,
        head: int = 0,
        consume_start: bool = False,
    ) -> None:
        self.op = op
        self.dim = op.dim
        self.ncv = int(ncv)
        self.max_steps = int(max_steps)
        self.dtype = dtype
        self.device = device
        self.breakdown_tol = Precision.of(op).restart_tol
        v = start.reshape(1, -1).to(dtype=torch.float64)
        norm = float(v.norm())
        if norm == 0:
            raise HesslensInputError("a Lanczos start vector is zero")
        self.basis = _Basis(self.ncv + 1, head, self.dim, dtype, device)
        # the start normalised as v / norm, in place when the start is this run's own
        self.basis.row(0)[0].copy_(torch.div(v[0], norm, out=v[0] if consume_start else None))
        del v
        self.T = np.zeros((self.ncv + 1, self.ncv + 1))
        self.m = 0  # basis rows in use; row m is the next Lanczos vector (when live)
        self.block_starts = [0]
        self.closed_resid: list[np.ndarray] = []  # residuals of each closed block at closing
        self.arrow: int | None = None  # the open block's arrowhead column, if restarted
        self.status = "live"
        self.anorm = 0.0
        self.beta = 0.0  # residual norm of the open block
        self.n_hvp = 0
        self.n_restarts = 0

    def step(self) -> None:
        """One Lanczos step (one product) of the open block."""
        j, start = self.m, self.block_starts[-1]
        basis = self.basis
        q = basis.row(j)
        # the product goes straight into the next row (free until this step ends), updated
        # there in place into the next Lanczos vector
        w = matmat_as(self.op, q, self.dtype, self.device, out=basis.row(j + 1))
        self.n_hvp += 1
        wnorm = float(_norm64(w)[0])
        if self.dtype == torch.float64:  # the same operations as _BatchLanczos
            alpha = float((q * w).sum())
        else:
            alpha = float(_rowdot(q, w)[0])
        w.sub_(q, alpha=alpha)
        if self.arrow is not None and j == self.arrow:
            coupling = torch.as_tensor(self.T[start:j, j], dtype=self.dtype, device=self.device)
            basis.subtract_combination_(w, coupling[None, :], start, j)
        elif j > start:
            w.sub_(basis.row(j - 1), alpha=float(self.T[j - 1, j]))
        for _ in range(2):  # "twice is enough"
            basis.subtract_combination_(w, basis.coef(w, j + 1), 0, j + 1)
        beta = float(_norm64(w)[0])
        self.T[j, j] = alpha
        self.m = j + 1
        self.beta = beta
        self.anorm = max(self.anorm, wnorm)
        if self.m >= self.dim:
            self.status = "exhausted"
        elif beta <= self.breakdown_tol * self.anorm:
            self.status = "breakdown"
        elif self.n_hvp >= self.max_steps:
            self.status = "budget"
        else:
            self.status = "live"
            torch.div(w[0], beta, out=basis.row(self.m)[0])
            self.T[j, j + 1] = self.T[j + 1, j] = beta

    def blocks(self) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(start, stop, theta, S, r)`` of every diagonal block of ``T``, the open one last."""
        starts = self.block_starts
        stops = [*starts[1:], self.m]
        out = []
        for i, (b0, b1) in enumerate(zip(starts, stops)):
            last = i == len(starts) - 1
            if last and self.arrow is not None:
                theta, S = scipy_eigh(self.T[b0:b1, b0:b1])
            else:
                theta, S = _tridiag_eig(np.diag(self.T)[b0:b1], np.diag(self.T, 1)[b0 : b1 - 1])
            r = np.abs(self.beta * S[-1, :]) if last else self.closed_resid[i]
            out.append((b0, b1, theta, S, r))
        return out

    def _rewrite(self, C: np.ndarray) -> None:
        """``Q[:p] <- C @ Q[:q]`` in place (see :meth:`_Basis.combine_rows_`)."""
        self.basis.combine_rows_(C)

    def compress(self, keep_closed: list[tuple[int, int]], keep_open: list[int]) -> None:
        """Thick restart: keep some Ritz vectors and the residual direction, drop the rest.

        ``keep_closed``: ``(block, local index)`` Ritz pairs of closed blocks, locked as exact
        eigenvectors; ``keep_open``: local indices of Ritz values of the open block, which
        (with the next Lanczos vector, when the block is not invariant) start the new open
        block as an arrowhead.
        """
        blocks = self.blocks()
        live = self.status == "live"
        rows, diag, closed_r = [], [], []
        for b, i in keep_closed:
            b0, b1, theta, S, r = blocks[b]
            c = np.zeros(self.m + 1)
            c[b0:b1] = S[:, i]
            rows.append(c)
            diag.append(theta[i])
            closed_r.append(np.array([r[i]]))
        b0, b1, theta, S, r = blocks[-1]
        arrow = []
        for i in keep_open:
            c = np.zeros(self.m + 1)
            c[b0:b1] = S[:, i]
            rows.append(c)
            diag.append(theta[i])
            arrow.append(self.beta * S[-1, i])
        if live:
            c = np.zeros(self.m + 1)
            c[self.m] = 1.0
            rows.append(c)
        C = np.array(rows).reshape(len(rows), self.m + 1)
        self._rewrite(C)
        n_locked = len(keep_closed)
        p = len(diag)
        self.T[:] = 0.0
        self.T[np.arange(p), np.arange(p)] = diag
        self.block_starts = list(range(n_locked + 1))
        self.closed_resid = closed_r
        self.m = p
        if live:
            col = n_locked + len(keep_open)
            self.T[n_locked:col, col] = self.T[col, n_locked:col] = arrow
            self.arrow = col
        else:  # the open block was invariant: keep its vectors as locked ones
            resid = [*closed_r, *(np.array([r[i]]) for i in keep_open)]
            self.block_starts = list(range(p))
            self.closed_resid = resid[:-1]
            self.beta = float(resid[-1][0])  # the last 1 x 1 block's residual is beta
            self.arrow = None
        self.n_restarts += 1

    def restart(self, v: Tensor) -> bool:
        """Start a new block from ``v`` made orthogonal to the basis (after an invariant
        block). Returns False when no product or slot is left or ``v`` lies in the basis."""
        if self.n_hvp >= self.max_steps or self.m >= self.ncv:
            return False
        m = self.m
        v = v.reshape(1, -1).to(dtype=self.dtype, device=self.device)
        norm0 = float(_norm64(v)[0])
        for _ in range(2):
            v = v - self.basis.combine(self.basis.coef(v, m), 0, m)
        norm = float(_norm64(v)[0])
        if norm <= 1e-8 * norm0 * (1.0 if self.dtype == torch.float64 else 1e4):
            return False
        self.closed_resid.append(self.blocks()[-1][4])
        self.basis.row(m)[0] = v[0] / norm
        self.block_starts.append(m)
        self.arrow = None
        self.beta = 0.0
        self.status = "live"
        return True


@dataclass(frozen=True, eq=False)
class LanczosRun:
    """The outcome of :func:`lanczos`: ``T = Q A Q^T`` tridiagonal, ``Q`` orthonormal.

    Attributes
    ----------
    alpha : numpy.ndarray
        float64 ``(m,)``: the diagonal of ``T``.
    beta : numpy.ndarray
        float64 ``(m - 1,)``: the off-diagonal of ``T`` (so that
        ``scipy.linalg.eigh_tridiagonal(alpha, beta)`` diagonalises it).
    residual_norm : float
        ``beta_m``, the norm of the part of ``A q_m`` outside the basis:
        ``A Q^T = Q^T T + beta_m q_{m+1} e_m^T``.
    basis : Tensor
        float64 ``(m, dim)`` with orthonormal rows ``q_1 .. q_m`` (on the operator's device).
    n_hvp : int
        Products used (``m``).
    invariant : bool
        True when the Krylov space is invariant under ``A`` (early stop, or ``m = dim``):
        the Ritz values are then exact eigenvalues.
    """

    alpha: np.ndarray
    beta: np.ndarray
    residual_norm: float
    basis: Tensor
    n_hvp: int
    invariant: bool

    @property
    def num_steps(self) -> int:
        """Number of steps taken (``m``)."""
        return int(self.alpha.shape[0])

    def tridiagonal(self) -> np.ndarray:
        """The dense ``(m, m)`` tridiagonal matrix ``T``."""
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors of ``T`` (columns)."""
        return _tridiag_eig(self.alpha, self.beta)

    def __repr__(self) -> str:
        return (
            f"LanczosRun(num_steps={self.num_steps}, residual_norm={self.residual_norm:.3g}, "
            f"invariant={self.invariant})"
        )


def _start_vector(
    op: SymmetricOperator, start: Tensor | None, seed: int, gen: torch.Generator | None
) -> Tensor:
    if start is None:
        gen = generator(seed) if gen is None else gen
        return random_probes(1, op.dim, "gaussian", gen, torch.float64, op.device)
    start = torch.as_tensor(start).reshape(-1)
    if start.numel() != op.dim:
        raise HesslensInputError(
            f"start vector has {start.numel()} entries, the operator has dim {op.dim}"
        )
    return start.reshape(1, -1)


def _warm_start(op: SymmetricOperator, v0: Tensor, gen: torch.Generator) -> Tensor:
    """The start vector from ``v0`` (one vector, or the rows of a ``(m, dim)`` block): the sum of
    its unit rows plus a seeded random vector of relative size :data:`_WARM_RANDOM`."""
    if not isinstance(v0, Tensor):
        v0 = torch.as_tensor(np.asarray(v0))
    V = v0.reshape(1, -1) if v0.ndim == 1 else v0
    if V.ndim != 2 or V.shape[1] != op.dim or V.shape[0] == 0 or not V.is_floating_point():
        raise HesslensInputError(
            f"v0 must be a vector of {op.dim} floats or a (m, {op.dim}) block of them, got "
            f"{tuple(v0.shape)} {v0.dtype}")
    V = V.detach().to(dtype=torch.float64, device=op.device)
    norms = V.norm(dim=1)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise HesslensInputError("v0 has a zero or non-finite row: pass the vectors to start "
                                 "from (e.g. the eigenvectors of an earlier result)")
    v = (V / norms[:, None]).sum(dim=0)
    if float(v.norm()) <= 1e-8 * V.shape[0] ** 0.5:
        raise HesslensInputError("the rows of v0 cancel out: pass linearly independent vectors")
    g = random_probes(1, op.dim, "gaussian", gen, torch.float64, op.device)[0]
    v = v / v.norm() + _WARM_RANDOM * g / g.norm()
    return v.reshape(1, -1)


def lanczos(
    op: SymmetricOperator | Tensor,
    num_steps: int,
    start: Tensor | None = None,
    seed: int = 0,
    breakdown_tol: float | None = None,
) -> LanczosRun:
    """Run the Lanczos process with full reorthogonalisation.

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A`` (see :func:`~hesslens.linalg.as_operator`).
    num_steps : int
        Steps to take (products to use); capped at ``op.dim``.
    start : Tensor, optional
        Start vector (normalised internally). Default: a Gaussian vector drawn with ``seed``.
    seed : int
        Seed of the default start vector.
    breakdown_tol : float, optional
        The process stops early, on an invariant subspace, when the new residual norm is at
        most ``breakdown_tol`` times the largest ``||A q_j||`` seen. Default:
        :attr:`~hesslens.linalg.precision.Precision.breakdown_tol` of the products' precision
        (``10 eps``; for bfloat16 or float16 products, whose rounding alone leaves residuals
        that small, ``10 eps`` of float32).

    Returns
    -------
    LanczosRun

    Examples
    --------
    >>> import torch
    >>> from hesslens.linalg import MatrixOperator
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=torch.float64))
    >>> run = lanczos(MatrixOperator(A), 4)
    >>> run.num_steps, run.invariant  # 3 distinct eigenvalues: invariant after 3 steps
    (3, True)
    >>> [round(x, 10) for x in run.ritz()[0].tolist()]
    [1.0, 2.0, 3.0]
    """
    op = as_operator(op)
    if int(num_steps) < 1:
        raise HesslensInputError(f"num_steps must be at least 1, got {num_steps}")
    engine = _BatchLanczos(
        op, _start_vector(op, start, seed, None), int(num_steps), breakdown_tol=breakdown_tol
    )
    while engine.active:
        engine.step()
    m = engine.m[0]
    return LanczosRun(
        alpha=np.array(engine.alpha[0], dtype=np.float64),
        beta=np.array(engine.beta[0][:-1], dtype=np.float64),
        residual_norm=float(engine.beta[0][-1]),
        basis=engine.Q[0, :m].clone(),
        n_hvp=engine.n_hvp,
        invariant=engine.status[0] in ("breakdown", "exhausted"),
    )


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` values ``which`` asks for (best first)."""
    if which == "LA":
        order = np.argsort(-theta, kind="stable")
    elif which == "SA":
        order = np.argsort(theta, kind="stable")
    else:
        order = np.argsort(-np.abs(theta), kind="stable")
    return order[:k]


def _error_bounds(theta: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """``min(r_i, r_i^2 / gap_i)`` for each Ritz pair.

    ``gap_i`` must be the distance from ``theta_i`` to the *rest of the spectrum*, which the other
    Ritz values only locate up to their own residuals: an eigenvalue lies within ``r_j`` of each
    ``theta_j``. So ``gap_i = min_j (|theta_i - theta_j| - r_j)``: a nearby Ritz value that has not
    converged yet (a close eigenvalue not yet resolved) shrinks the gap, and where the gap is no
    larger than ``r_i`` the bound falls back to ``r_i``. Using the bare distance to the nearest
    Ritz value instead declares a value converged while a near-degenerate neighbour still hides
    behind it (``benchmarks/README.md``, linear algebra).
    """
    n = theta.shape[0]
    if n < 2:
        return resid.copy()
    distance = np.abs(theta[:, None] - theta[None, :]) - resid[None, :]
    np.fill_diagonal(distance, np.inf)
    gap = distance.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        quad = np.where(gap > resid, resid**2 / np.where(gap > 0, gap, 1.0), np.inf)
    return np.minimum(resid, quad)


def _convergence(theta: np.ndarray, bounds: np.ndarray, resid: np.ndarray, tol: float,
                 precision: Precision, final: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, settled)`` per Ritz value: ``ok`` converged to ``tol`` (its bound, plus what the
    products' rounding may add, within the accepted error, and its residual ``r <= sqrt(tol)
    |theta|``: the quadratic bound ``r^2 / gap`` is only as good as a gap the Ritz values may
    still overstate); ``settled`` no more steps can make it better (``ok``, or its bound at the
    rounding level of the products, or the search ``final``: its space is invariant). For
    fine products the two are the same."""
    scale = float(np.max(np.abs(theta)))
    floor = precision.floor(scale)
    accepted = (np.maximum(tol * np.abs(theta), floor) if precision.fine
                else tol * np.abs(theta))
    resid_ok = np.maximum(math.sqrt(tol) * np.abs(theta), floor)
    if precision.fine:
        ok = (bounds <= accepted) & (resid <= resid_ok)
        return ok, ok
    ok = (bounds + precision.noise(scale) <= accepted) & (resid <= math.sqrt(tol) * np.abs(theta))
    if final:
        return ok, np.ones_like(ok)
    return ok, (bounds <= floor) & (resid <= resid_ok)


def _warn_unconverged(theta: np.ndarray, bounds: np.ndarray, converged: np.ndarray,
                      settled: np.ndarray, k: int, tol: float, max_steps: int,
                      precision: Precision) -> None:
    """Say why values are not converged: the product budget (BudgetWarning) or the precision
    of the products (PrecisionWarning)."""
    limited = ~converged & settled
    if limited.any():
        warnings.warn(precision.message(
            f"eigsh: {int(limited.sum())} of {k} eigenvalues", f"tol={tol:g}"),
            PrecisionWarning, stacklevel=4)
    short = ~converged & ~settled
    if short.any():
        scale = float(np.max(np.abs(theta))) if theta.size else 0.0
        worst = float(np.max(bounds[short] / np.maximum(np.abs(theta[short]),
                                                         precision.floor(scale))))
        warnings.warn(
            f"eigsh stopped at max_steps={max_steps} products with {int(short.sum())} "
            f"of {k} eigenvalues not converged (relative error bound up to {worst:.2g} > "
            f"tol={tol:g}): raise max_steps or tol",
            BudgetWarning,
            stacklevel=4,
        )


def _better(x: float, ref: float, which: str, margin: float) -> bool:
    """Whether the value ``x`` beats ``ref`` (by more than ``margin``) for ``which``."""
    if which == "LA":
        return x > ref + margin
    if which == "SA":
        return x < ref - margin
    return abs(x) > abs(ref) + margin


def _block_extremes(theta: np.ndarray, which: str) -> list[int]:
    """Local indices of a block's extreme Ritz values in the ``which`` direction."""
    if which == "LA":
        return [int(np.argmax(theta))]
    if which == "SA":
        return [int(np.argmin(theta))]
    return [int(np.argmin(theta)), int(np.argmax(theta))]


def eigsh(
    op: SymmetricOperator | Tensor,
    k: int = 5,
    which: str = "LA",
    tol: float = 1e-6,
    max_steps: int | None = None,
    seed: int = 0,
    return_vectors: bool = True,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    *,
    ncv: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    v0: Tensor | None = None,
) -> EigenResult:
    """Extreme eigenvalues of a symmetric operator by thick-restarted Lanczos.

    The ``k`` wanted eigenvalues are the Ritz values of one growing Krylov space (not power
    iteration with deflation), each stopped on its a-posteriori error bound
    ``e_i = min(r_i, r_i**2 / gap_i)`` (``r_i`` the residual norm, ``gap_i`` the distance to the
    other Ritz values less their own residuals): a value has converged when
    ``e_i <= tol |theta_i|`` and ``r_i <= sqrt(tol) |theta_i|``, or both are at the products'
    rounding level ``100 eps max|theta|`` (:mod:`hesslens.linalg.precision`; bfloat16 and
    float16 products, too coarse for that, converge a value only when ``r_i`` plus their
    rounding is within ``tol |theta_i|``). For ``k > 1`` one more value than asked must
    converge too (a guard against a near-degenerate pair at the ``k``-th place); for ``k = 1``
    it is left out, as it is costly and a value within ``delta`` of the top one moves it by
    about ``delta`` at most: ask ``k=2`` for a guarded top value.

    An invariant Krylov space (few distinct eigenvalues) restarts from a random vector so that
    repeated eigenvalues come with their multiplicity; a full basis of ``ncv`` vectors is
    thick-restarted (Wu and Simon 2000, as ARPACK's ``ncv``), keeping the wanted Ritz vectors.
    Until the basis is full the run is exactly the unrestarted one. The evidence behind these
    choices is in ``benchmarks/README.md`` (linear algebra).

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A``.
    k : int
        Number of eigenvalues, ``1 <= k <= op.dim``.
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest algebraic, or largest magnitude. The values are always
        returned sorted descending.
    tol : float
        Relative tolerance on each eigenvalue (see above).
    max_steps : int, optional
        Most Lanczos steps (= products); default ``max(100, 30 * k)``. At least ``k``. Without
        restarts (``ncv = dim``) never more than ``dim`` are taken.
    seed : int
        Seed of the random start vector (Gaussian, drawn on the CPU).
    return_vectors : bool
        Whether to return the Ritz vectors (``(k, dim)`` in ``op.dtype`` on ``op.device``).
    callback : callable, optional
        ``callback(step, theta, bounds)`` after each convergence check: the wanted Ritz
        values (descending, float64 numpy) and their error bounds; ``step`` counts products.
    ncv : int, optional
        Most basis vectors, ``k + 2 <= ncv`` (capped at ``dim``); ``0`` for ``k = 1``: no
        stored basis, the three-term recurrence in three vectors, as many products as
        without restarts, the vector formed by a second pass when first read
        (:func:`~hesslens.linalg.three_term.top_eigenpair`). Default: ``dim`` (no
        restart) while a basis of ``max_steps + 1`` vectors takes at most 64 MiB, else
        ``max(2 * k + 8, 20)``, lowered (not below ``k + 2``) to ``31 - k``
        (:data:`~hesslens.linalg.budget.BASIS_VECTORS` ``- 1 - k``).
    basis_dtype : torch.dtype, optional
        Dtype of the basis. Default: float64 for a float64 operator, else float32 (the basis is
        reorthogonalised twice, so a float32 basis is as accurate as float32 products; the
        coefficients of ``T`` are accumulated in float64 either way).
    basis_device : torch.device or str, optional
        Device of the basis (default: the operator's). ``basis_device="cpu"`` keeps it off a
        GPU; every product then moves one vector there and back.
    v0 : Tensor, optional
        A warm start: a vector of ``dim`` entries or a ``(m, dim)`` block, e.g. the
        eigenvectors of an earlier result on a nearby operator (the previous record while
        training). The run starts from the sum of its unit rows plus a seeded random vector of
        relative size ``1e-3`` (so that exact eigenvectors do not make the first Krylov space
        invariant). It converges to the same values in fewer products where the operator moved
        little; pass the top ``k`` vectors for ``k = 1`` and ``k + 1`` for ``k > 1`` (the guard
        value starts warm too). A warm start finds the eigenvalues its vectors point to: a new
        top direction nearly orthogonal to them can be missed (no small random part prevents
        it: ``benchmarks/README.md``), so start cold now and then.

    Returns
    -------
    EigenResult
        ``values`` descending, ``residuals`` the ``r_i``, ``bounds`` the ``e_i``,
        ``converged`` per value, ``n_hvp`` every product used, ``n_steps`` the steps taken.

    Notes
    -----
    Memory: ``(ncv + 2) * dim * itemsize(basis_dtype)`` bytes while it runs (the basis with
    the next vector, into which an operator with ``matmat_into`` of the basis's dtype and
    device, as the curvature operators are, writes each product; one update temporary), plus
    what one product itself needs (one vector more, its result, for other operators). The Ritz
    vectors returned are formed in place in the basis's first ``k`` rows and the other rows
    are then freed, so they add nothing to the peak (with ``basis_dtype`` and ``basis_device``
    the operator's; otherwise ``k`` more vectors for the conversion). With the default ``ncv``
    on a large operator: 20 + 2 = 22 vectors for ``k=5``, 21 + 2 = 23 for ``k=10``.

    Raises
    ------
    ValueError
        For ``k`` outside ``[1, dim]``, an unknown ``which``, ``tol <= 0``, ``max_steps < k``
        or ``ncv < k + 2``.
    NonFiniteCurvatureError
        When a product has a NaN or infinite entry.

    Warns
    -----
    BudgetWarning
        When ``max_steps`` products are spent before every wanted value converged (the
        result then has ``converged`` False for those values).
    PrecisionWarning
        When the products' precision (bfloat16, float16) cannot deliver ``tol`` for some
        values (``converged`` False for them).

    Examples
    --------
    >>> import torch
    >>> from hesslens.linalg import MatrixOperator
    >>> A = torch.diag(torch.linspace(-2.0, 1.0, 50, dtype=torch.float64))
    >>> res = eigsh(MatrixOperator(A), k=2, which="SA")
    >>> [round(v, 4) for v in res.values.tolist()]
    [-1.9388, -2.0]
    >>> small = eigsh(MatrixOperator(A), k=2, which="SA", ncv=8)  # restarted, 9 vectors
    >>> [round(v, 4) for v in small.values.tolist()]
    [-1.9388, -2.0]
    >>> top = eigsh(A, k=1)
    >>> again = eigsh(A + 1e-3 * torch.eye(50, dtype=torch.float64), k=1, v0=top.vectors)
    >>> round(float(again.values[0]), 4), again.n_hvp < top.n_hvp
    (1.001, True)
    """
    op = as_operator(op)
    plan = _Plan.of(op, k, which, tol, max_steps, ncv, basis_dtype, basis_device)
    if plan.ncv == 0:  # no stored basis (this module's helpers are its building blocks)
        from hesslens.linalg.three_term import top_eigenpair

        def start() -> Tensor:
            gen = generator(seed)
            return _start_vector(op, None, seed, gen) if v0 is None else _warm_start(op, v0, gen)

        return top_eigenpair(op, plan.which, plan.tol, plan.max_steps, start,
                             return_vectors=return_vectors, callback=callback,
                             dtype=plan.basis_dtype, device=plan.basis_device)
    gen = generator(seed)
    engine = _RestartedLanczos(
        op, _start_vector(op, None, seed, gen) if v0 is None else _warm_start(op, v0, gen),
        plan.ncv, plan.max_steps, plan.basis_dtype, plan.basis_device,
        head=plan.k if return_vectors else 0, consume_start=True,
    )  # the start vector is not kept: the basis holds it
    precision = Precision.of(op)
    while True:
        engine.step()
        if engine.status == "live" and engine.m < plan.k:
            continue
        check = _Check.of(engine, plan, precision)
        if callback is not None:
            order = check.order()
            callback(engine.n_hvp, check.theta[order].copy(), check.bounds[order].copy())
        if engine.status == "live":
            if check.done(plan):
                break
            if engine.m >= plan.ncv:
                _compress(engine, check.blocks, check.theta, plan.which, plan.n_guard)
            continue
        if engine.status == "breakdown" and check.worth_restart(plan, precision) and (
                engine.n_hvp < plan.max_steps):
            if engine.m >= plan.ncv:
                _compress(engine, check.blocks, check.theta, plan.which, plan.n_guard)
            v = random_probes(1, op.dim, "gaussian", gen, torch.float64, op.device)
            if engine.restart(v):
                continue
            check = _Check.of(engine, plan, precision, final=True)  # nothing more to find
        break  # exhausted, budget, or an invariant block with nothing more to find
    return _result(engine, check, plan, precision, return_vectors)


@dataclass(frozen=True)
class _Plan:
    """What :func:`eigsh` was asked for, checked, with the sizes derived from it."""

    k: int
    which: str
    tol: float
    max_steps: int
    ncv: int
    basis_dtype: torch.dtype
    basis_device: torch.device
    n_guard: int  # the values that must converge: the wanted ones and, for k > 1, one more

    @classmethod
    def of(cls, op: SymmetricOperator, k: int, which: str, tol: float, max_steps: int | None,
           ncv: int | None, basis_dtype: torch.dtype | None,
           basis_device: torch.device | str | None) -> _Plan:
        n = op.dim
        if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
            raise HesslensInputError(f"k must be an integer in [1, dim]: got k={k} for dim={n}")
        k = int(k)
        if which not in WHICH:
            raise HesslensInputError(f"which must be one of {WHICH}, got {which!r}")
        if not tol > 0:
            raise HesslensInputError(f"tol must be positive, got {tol}")
        basis_dtype = work_dtype(op.dtype) if basis_dtype is None else basis_dtype
        if not basis_dtype.is_floating_point:
            raise HesslensInputError(f"basis_dtype must be a floating dtype, got {basis_dtype}")
        basis_device = op.device if basis_device is None else torch.device(basis_device)
        ncv = cls._ncv(n, k, max_steps, ncv, basis_dtype)
        if max_steps is None:
            max_steps = max(100, 30 * k) if ncv < n else min(n, max(100, 30 * k))
        elif int(max_steps) < k:
            raise HesslensInputError(f"max_steps={max_steps} is smaller than k={k}")
        max_steps = int(max_steps) if ncv < n else min(int(max_steps), n)
        ncv = min(ncv, max_steps)  # never more rows than steps: the basis is allocated at once
        return cls(k, which, float(tol), max_steps, ncv, basis_dtype, basis_device,
                   min(k + (k > 1), n))

    @staticmethod
    def _ncv(n: int, k: int, max_steps: int | None, ncv: int | None,
             basis_dtype: torch.dtype) -> int:
        """The basis size: every step while that is small, else a bounded basis."""
        steps = min(n, max(100, 30 * k)) if max_steps is None else min(n, int(max_steps))
        itemsize = torch.finfo(basis_dtype).bits // 8
        if ncv is None and (steps + 1) * n * itemsize <= _AUTO_NCV_BYTES:
            return n  # a basis of every step is small: no restart
        if ncv is None:
            # the basis and the k Ritz vectors returned within BASIS_VECTORS (not below k + 2)
            return min(n, max(k + 2, min(max(2 * k + 8, 20), BASIS_VECTORS - 1 - k)))
        if ncv == 0 and not isinstance(ncv, bool):
            if k != 1:
                raise HesslensInputError(
                    f"ncv=0 (no stored basis) finds one eigenvalue, not k={k}: ask k=1, or "
                    f"give ncv >= k + 2 = {k + 2}")
            return 0
        if isinstance(ncv, bool) or int(ncv) != ncv or not min(n, k + 2) <= ncv:
            raise HesslensInputError(
                f"ncv={ncv} is too small: the basis needs at least k + 2 = {k + 2} vectors "
                f"(or dim={n}); raise ncv")
        return min(int(ncv), n)


@dataclass(frozen=True, eq=False)
class _Check:
    """The convergence check after a step: every Ritz value of the basis (closed blocks first,
    the open block last) with its residual, error bound, and whether it has converged (``ok``)
    or cannot get better (``settled``; see :func:`_convergence`)."""

    blocks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]
    n_closed: int
    theta: np.ndarray
    resid: np.ndarray
    bounds: np.ndarray
    ok: np.ndarray
    settled: np.ndarray
    wanted: np.ndarray

    @classmethod
    def of(cls, engine: _RestartedLanczos, plan: _Plan, precision: Precision,
           final: bool = False) -> _Check:
        """``final``: the search is over (its values are what is kept)."""
        blocks = engine.blocks()
        n_closed = sum(b[2].shape[0] for b in blocks[:-1])
        theta = np.concatenate([b[2] for b in blocks])
        resid = np.concatenate([b[4] for b in blocks])
        stopped = engine.status != "live" and engine.status != "budget"
        # an invariant block's values are exact for fine products; coarse ones keep their
        # residual bounds (the block closed on a residual at the products' rounding level)
        exact_open = (final or engine.status in ("breakdown", "exhausted")) and precision.fine
        bounds = _error_bounds(theta, resid) if precision.fine else resid.copy()
        resid_open = resid.copy()
        if precision.fine:  # closed blocks are invariant: exact
            bounds[:n_closed] = resid_open[:n_closed] = 0.0
        if exact_open:
            bounds[n_closed:] = resid_open[n_closed:] = 0.0
        ok, settled = _convergence(theta, bounds, resid_open, plan.tol, precision,
                                   final=final or stopped)
        return cls(blocks, n_closed, theta, resid, bounds, ok, settled,
                   _select(theta, plan.k, plan.which))

    def order(self) -> np.ndarray:
        """The wanted values' indices, by value descending."""
        return self.wanted[np.argsort(-self.theta[self.wanted], kind="stable")]

    def done(self, plan: _Plan) -> bool:
        """Whether a live run may stop: the wanted values and the guard settled, and each
        restarted block's own extreme value too (it may hold a copy of a repeated one)."""
        open_block = self.blocks[-1][2]
        extremes = self.n_closed == 0 or all(
            self.settled[self.n_closed + i] for i in _block_extremes(open_block, plan.which))
        guarded = _select(self.theta, min(plan.n_guard, self.theta.shape[0]), plan.which)
        return bool(self.settled[guarded].all()) and extremes

    def worth_restart(self, plan: _Plan, precision: Precision) -> bool:
        """After an invariant block: restart if there are fewer than ``k`` values yet, or if the
        block brought one better than the ``k``-th of the earlier blocks (it may hide a
        repeated eigenvalue)."""
        prev = self.theta[: self.n_closed]
        if prev.shape[0] < plan.k:
            return True
        kth = float(prev[_select(prev, plan.k, plan.which)[-1]])
        scale = float(np.max(np.abs(self.theta)))
        margin = max(plan.tol * abs(kth), precision.floor(scale))
        open_block = self.blocks[-1][2]
        return any(_better(float(open_block[i]), kth, plan.which, margin)
                   for i in _block_extremes(open_block, plan.which))


def _result(engine: _RestartedLanczos, check: _Check, plan: _Plan, precision: Precision,
            return_vectors: bool) -> EigenResult:
    """The wanted values, their bounds and (in place in the basis) their Ritz vectors."""
    order = check.order()
    vectors = None
    if return_vectors:
        owner = np.concatenate([np.full(b[2].shape[0], j) for j, b in enumerate(check.blocks)])
        local = np.concatenate([np.arange(b[2].shape[0]) for b in check.blocks])
        C = np.zeros((len(order), engine.m))
        for row, g in enumerate(order):
            b0, b1, _, S, _ = check.blocks[owner[g]]
            C[row, b0:b1] = S[:, local[g]]
        op = engine.op
        vectors = engine.basis.take(C).to(dtype=op.dtype, device=op.device)
        for row in range(vectors.shape[0]):
            vectors[row] /= vectors[row].norm()
    converged = check.ok[order]
    _warn_unconverged(check.theta[order], check.bounds[order], converged, check.settled[order],
                      plan.k, plan.tol, plan.max_steps, precision)
    return EigenResult(
        values=torch.as_tensor(check.theta[order], dtype=torch.float64),
        vectors=vectors,
        residuals=torch.as_tensor(check.resid[order], dtype=torch.float64),
        converged=torch.as_tensor(converged, dtype=torch.bool),
        n_hvp=engine.n_hvp,
        n_steps=engine.n_hvp,
        which=plan.which,
        bounds=torch.as_tensor(check.bounds[order], dtype=torch.float64),
    )


def _compress(
    engine: _RestartedLanczos,
    blocks: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]],
    theta: np.ndarray,
    which: str,
    n_guard: int,
) -> None:
    """Thick restart of a full basis: lock the wanted exact values of closed blocks, keep the
    wanted Ritz values of the open block and half of the free space (best first)."""
    owner = np.concatenate([np.full(b[2].shape[0], j) for j, b in enumerate(blocks)])
    local = np.concatenate([np.arange(b[2].shape[0]) for b in blocks])
    last = len(blocks) - 1
    top = _select(theta, min(n_guard, theta.shape[0]), which)
    keep_closed = [(int(owner[g]), int(local[g])) for g in top if owner[g] != last]
    n_open_wanted = sum(1 for g in top if owner[g] == last)
    theta_o = blocks[-1][2]
    space = engine.ncv - len(keep_closed)
    n_keep = n_open_wanted + max(0, space - n_open_wanted) // 2
    live = engine.status == "live"
    n_keep = max(0, min(n_keep, theta_o.shape[0] - 1 if live else theta_o.shape[0], space - 2))
    if not live:
        n_keep = min(n_open_wanted, theta_o.shape[0])
    keep_open = [int(i) for i in _select(theta_o, n_keep, which)]
    engine.compress(keep_closed, keep_open)
