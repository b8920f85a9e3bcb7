"""Stochastic trace estimators: Hutchinson, Hutch++ and shared-probe block traces.

* :func:`hutchinson` -- ``tr(A) ~ mean_i g_i^T A g_i`` over random probes with
  ``E[g g^T] = I`` (Hutchinson 1989).
* :func:`hutchpp` -- Hutch++ (Meyer, Musco, Musco, Woodruff 2021): a third of the budget
  sketches the range of ``A``, whose trace is then computed exactly; the rest is Hutchinson
  on the deflated remainder, whose variance no longer carries the large eigenvalues.
* :func:`block_traces` -- the full trace and the trace of every diagonal block (e.g. every
  layer of a Hessian) from one shared set of probes, with Hutch++ deflation and adaptive
  stopping on the standard errors.

All three compute the trace exactly, from ``dim`` products with unit vectors, when that costs
no more than the estimate would (tiny operators). Probes are drawn on the CPU from
``seed`` (see :func:`~hesslens.linalg.random_probes`); arithmetic is in float64.

Example
-------
>>> import torch
>>> from hesslens.linalg import MatrixOperator
>>> A = torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64))
>>> est = hutchinson(MatrixOperator(A), n_hvp=100)
>>> est.method, abs(est.value - 20100.0) < 1e-9   # Rademacher: exact for a diagonal matrix
('hutchinson', True)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from hesslens.checks import check_nonnegative_int, check_positive_int
from hesslens.errors import BudgetWarning, HesslensInputError, PrecisionWarning
from hesslens.linalg.budget import WORK_BYTES, vectors_within
from hesslens.linalg.lanczos import _gram64, _orthonormalize_rows_, _rowdot, work_dtype
from hesslens.linalg.operator import SymmetricOperator, as_operator, matmat64, matmat_as
from hesslens.linalg.precision import Precision
from hesslens.linalg.probes import check_distribution, generator, random_probes
from hesslens.linalg.results import TraceResult

__all__ = ["BlockTraceEstimator", "TraceState", "block_traces", "hutchinson", "hutchpp"]

ProgressFn = Callable[[int], None]


def _apply(
    op: SymmetricOperator,
    V: Tensor,
    batch_size: int,
    used: list[int],
    progress: ProgressFn | None,
) -> Tensor:
    """``A V^T`` (rows) in batches of ``batch_size``, counting products in ``used[0]``."""
    out = []
    for s in range(0, V.shape[0], batch_size):
        out.append(matmat64(op, V[s : s + batch_size]))
        used[0] += out[-1].shape[0]
        if progress is not None:
            progress(used[0])
    if not out:
        return V.new_zeros(V.shape)
    return torch.cat(out)


def _segment_sq(W: Tensor, segs: list[tuple[int, int]]) -> Tensor:
    """Squared norms of each segment of each row of ``W`` (float64 CPU, ``(rows, segments)``)."""
    return torch.stack([_rowdot(W[:, a:b], W[:, a:b]) for a, b in segs], dim=1)


def _exact_diagonal(
    op: SymmetricOperator, batch_size: int, progress: ProgressFn | None = None,
    sq: list[Tensor] | None = None,
) -> Tensor:
    """The diagonal of ``A`` from ``dim`` products with unit vectors (float64, CPU); with a
    list ``sq``, the squared norms ``||A e_i||^2`` are appended to it (coarse products)."""
    n = op.dim
    diag = torch.empty(n, dtype=torch.float64)
    used = [0]
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        rows = torch.arange(e - s)
        E = torch.zeros(e - s, n, dtype=torch.float64)
        E[rows, rows + s] = 1.0
        AE = _apply(op, E.to(op.device), batch_size, used, progress).cpu()
        diag[s:e] = AE[rows, rows + s]
        if sq is not None:
            sq.append(_rowdot(AE, AE))
    return diag


def _exact(op: SymmetricOperator, batch_size: int) -> TraceResult:
    precision = Precision.of(op)
    sq: list[Tensor] | None = None if precision.fine else []
    value = float(_exact_diagonal(op, batch_size, sq=sq).sum())
    stderr = 0.0 if sq is None else precision.rounding_stderr(float(torch.cat(sq).sum()))
    return TraceResult(value=value, stderr=stderr, n_hvp=op.dim, method="exact", n_samples=0,
                       converged=True)


def _with_rounding(stderr: float, rounding: float) -> float:
    """A statistical standard error combined with the rounding error of coarse products."""
    return stderr if rounding == 0.0 else math.hypot(stderr, rounding)


def _rounding_parts(precision: Precision, low_sq: list[Tensor], sq: list[Tensor] | None,
                    n_segments: int) -> tuple[list[float], float]:
    """The rounding error of each segment's estimate and of the full one (zeros for fine
    products): :meth:`Precision.rounding_stderr` of ``||A_l||_F^2``, estimated as twice the
    sketch's ``||Z_l||^2`` plus the mean ``||w_l||^2`` of the residual products."""
    if precision.fine or not sq:
        return [0.0] * n_segments, 0.0
    inner = torch.cat(sq).mean(dim=0)
    if low_sq:
        inner = inner + 2.0 * torch.stack(low_sq).sum(dim=0)
    parts = [precision.rounding_stderr(float(x)) for x in inner]
    return parts, precision.rounding_stderr(float(inner.sum()))


def _mean_stderr(x: Tensor) -> tuple[float, float]:
    n = x.shape[0]
    mean = float(x.mean())
    if n < 2:
        return mean, math.inf
    return mean, float(x.std(correction=1)) / math.sqrt(n)


def _batch(batch_size: int, op: SymmetricOperator, dtype: torch.dtype) -> int:
    """``batch_size``, lowered for huge operators so that a batch of probes and its products
    (2 vectors a probe) fit in :data:`~hesslens.linalg.budget.WORK_BYTES`."""
    return vectors_within(WORK_BYTES, op.dim, dtype, per=2, at_most=batch_size)


def _sketch(
    op: SymmetricOperator,
    n_sketch: int,
    distribution: str,
    gen: torch.Generator,
    dtype: torch.dtype,
    batch_size: int,
    used: list[int],
    progress: ProgressFn | None,
) -> Tensor:
    """``U``: orthonormal rows spanning ``A S`` for ``n_sketch`` random probes ``S`` (the
    products written straight into one ``(n_sketch, dim)`` buffer, orthonormalised in place;
    fewer rows when ``A S`` has a lower rank)."""
    Y = torch.empty(n_sketch, op.dim, dtype=dtype, device=op.device)
    for s in range(0, n_sketch, batch_size):
        c = min(batch_size, n_sketch - s)
        S = random_probes(c, op.dim, distribution, gen, dtype, op.device)
        Y[s : s + c] = matmat_as(op, S, dtype)
        del S
        used[0] += c
        if progress is not None:
            progress(used[0])
    return _orthonormalize_rows_(Y)


def _low_rank_parts(
    op: SymmetricOperator,
    U: Tensor,
    segs: list[tuple[int, int]],
    batch_size: int,
    used: list[int],
    progress: ProgressFn | None,
    sq: list[Tensor] | None = None,
) -> list[float]:
    """:func:`_low_rank_traces` with ``Z = U A`` taken a batch of rows at a time (never
    stored): ``<U_l, Z_l>`` and ``M = Z U^T`` are accumulated per batch (and, with a list
    ``sq``, each batch's squared segment norms of ``Z`` summed over its rows)."""
    r = U.shape[0]
    M = torch.zeros(r, r, dtype=torch.float64)
    uz = [0.0] * len(segs)
    for s in range(0, r, batch_size):
        Ub = U[s : s + batch_size]
        Zb = matmat_as(op, Ub, U.dtype)
        used[0] += Ub.shape[0]
        if progress is not None:
            progress(used[0])
        M[s : s + Ub.shape[0]] = _gram64(Zb, U)
        for i, (a, b) in enumerate(segs):
            uz[i] += float(_rowdot(Ub[:, a:b], Zb[:, a:b]).sum())
        if sq is not None:
            sq.append(_segment_sq(Zb, segs).sum(dim=0))
        del Zb
    M = (M + M.T) / 2
    return [2.0 * uz[i] - float((M * _gram64(U[:, a:b], U[:, a:b])).sum())
            for i, (a, b) in enumerate(segs)]


def _residual_samples(
    op: SymmetricOperator, G: Tensor, U: Tensor | None, segs: list[tuple[int, int]],
    sq: list[Tensor] | None = None,
) -> Tensor:
    """Samples ``<g_l, ((I - P) A (I - P) g)_l>`` per segment ``l`` (float64 CPU,
    ``(batch, n_segments)``), ``P = U^T U`` (none when ``U`` is None). With a list ``sq``,
    the squared segment norms of the products ``(I - P) A (I - P) g`` are appended to it.

    ``(I - P) g`` is formed in ``G``'s own storage and undone after the product, so a batch
    costs two buffers (``G`` and ``A (I - P) G``)."""
    if U is not None:
        C = _gram64(G, U).to(dtype=G.dtype, device=G.device)
        G.addmm_(C, U, alpha=-1.0)
    W = matmat_as(op, G, G.dtype)
    if U is not None:
        W.addmm_(_gram64(W, U).to(dtype=W.dtype, device=W.device), U, alpha=-1.0)
        G.addmm_(C, U)
    if sq is not None:
        sq.append(_segment_sq(W, segs))
    return torch.stack([_rowdot(G[:, a:b], W[:, a:b]) for a, b in segs], dim=1)


def hutchinson(
    op: SymmetricOperator | Tensor,
    n_hvp: int = 100,
    distribution: str = "rademacher",
    seed: int = 0,
    batch_size: int = 16,
) -> TraceResult:
    """Hutchinson's trace estimator.

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A``.
    n_hvp : int
        Number of probes (= products). When ``n_hvp >= dim`` the trace is computed exactly
        from ``dim`` unit-vector products instead (``method="exact"``, ``stderr=0``).
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    seed : int
        Seed of the probes.
    batch_size : int
        Probes multiplied per ``matmat`` call (lowered for huge operators so that a batch and
        its products take at most 256 MiB).

    Returns
    -------
    TraceResult
        ``value`` the sample mean of ``g^T A g``, ``stderr`` its sample standard deviation
        over ``sqrt(n_hvp)`` (``inf`` for a single probe).

    Notes
    -----
    Memory: ``2 * batch_size * dim * itemsize`` bytes (a batch of probes and its products),
    plus one product; vectors are kept in float64 for a float64 operator, else float32, and
    every dot product is accumulated in float64.

    Raises
    ------
    NonFiniteCurvatureError
        When a product has a NaN or infinite entry.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> B = torch.randn(300, 300, generator=g, dtype=torch.float64)
    >>> r = hutchinson(B @ B.T, n_hvp=200, seed=1)
    >>> abs(r.value - float(torch.trace(B @ B.T))) < 4 * r.stderr
    True
    """
    op = as_operator(op)
    check_positive_int(n_hvp, "n_hvp")
    check_positive_int(batch_size, "batch_size")
    check_distribution(distribution)
    gen = generator(seed)
    if op.dim <= n_hvp:
        return _exact(op, batch_size)
    dtype = work_dtype(op.dtype)
    batch_size = _batch(batch_size, op, dtype)
    precision = Precision.of(op)
    sq: list[Tensor] | None = None if precision.fine else []
    samples = []
    for s in range(0, n_hvp, batch_size):
        G = random_probes(min(batch_size, n_hvp - s), op.dim, distribution, gen, dtype, op.device)
        samples.append(_residual_samples(op, G, None, [(0, op.dim)], sq)[:, 0])
        del G
    value, stderr = _mean_stderr(torch.cat(samples))
    stderr = _with_rounding(stderr, _rounding_parts(precision, [], sq, 1)[1])
    return TraceResult(
        value=value, stderr=stderr, n_hvp=n_hvp, method="hutchinson", n_samples=n_hvp
    )


def hutchpp(
    op: SymmetricOperator | Tensor,
    n_hvp: int = 99,
    distribution: str = "rademacher",
    seed: int = 0,
    batch_size: int = 16,
) -> TraceResult:
    """Hutch++ trace estimator (Meyer, Musco, Musco and Woodruff, 2021).

    With ``s = n_hvp // 3``: ``S`` = ``s`` random probes, ``U`` = orthonormal basis of
    ``A S`` (QR), ``tr(U A U^T)`` exactly from ``s`` more products, and Hutchinson with the
    remaining ``n_hvp - 2 s`` probes on ``(I - P) A (I - P)``, ``P = U^T U``. The estimate
    is unbiased; ``stderr`` is that of the Hutchinson part (the sketched part is exact given
    ``S``).

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A``.
    n_hvp : int
        Total products. With fewer than 3 this is plain Hutchinson; with ``n_hvp >= dim``
        the trace is computed exactly.
    distribution : {"rademacher", "gaussian"}
        Probe distribution (sketch and Hutchinson probes).
    seed : int
        Seed of the probes.
    batch_size : int
        Vectors multiplied per ``matmat`` call (lowered for huge operators, as in
        :func:`hutchinson`).

    Returns
    -------
    TraceResult
        ``method="hutch++"``, ``n_samples`` the Hutchinson probes.

    Notes
    -----
    Memory: ``(n_hvp // 3 + 2 * batch_size) * dim * itemsize`` bytes: the sketch basis
    ``U`` (orthonormalised in place in the buffer that received ``A S``), and one batch of
    probes with its products; ``U A`` is never stored. Float64 for a float64 operator, else
    float32. A sketch of lower rank than ``n_hvp // 3`` keeps only its rank's directions (and
    spends that many products on ``U A``).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> V = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))[0]
    >>> lam = torch.cat([torch.tensor([100.0, 50.0, 20.0]), torch.rand(397, generator=g)])
    >>> A = (V * lam.double()) @ V.T
    >>> r = hutchpp(A, n_hvp=60)
    >>> abs(r.value - float(lam.sum())) < 4 * r.stderr
    True
    """
    op = as_operator(op)
    check_positive_int(n_hvp, "n_hvp")
    check_positive_int(batch_size, "batch_size")
    check_distribution(distribution)
    gen = generator(seed)
    if op.dim <= n_hvp:
        return _exact(op, batch_size)
    n_sketch = n_hvp // 3
    if n_sketch == 0:
        return hutchinson(op, n_hvp, distribution, seed, batch_size)
    n_probe = n_hvp - 2 * n_sketch
    dtype = work_dtype(op.dtype)
    batch_size = _batch(batch_size, op, dtype)
    precision = Precision.of(op)
    low_sq: list[Tensor] = []
    sq: list[Tensor] | None = None if precision.fine else []
    used = [0]
    U = _sketch(op, n_sketch, distribution, gen, dtype, batch_size, used, None)
    low_rank = _low_rank_parts(op, U, [(0, op.dim)], batch_size, used, None,
                               None if sq is None else low_sq)[0]
    samples = []
    for s in range(0, n_probe, batch_size):
        G = random_probes(min(batch_size, n_probe - s), op.dim, distribution, gen, dtype,
                          op.device)
        # tr((I-P) A (I-P)) by probes g: <g, (I-P) A (I-P) g> = <(I-P) g, A (I-P) g>
        samples.append(_residual_samples(op, G, U, [(0, op.dim)], sq)[:, 0])
        used[0] += G.shape[0]
        del G
    mean, stderr = _mean_stderr(torch.cat(samples))
    stderr = _with_rounding(stderr, _rounding_parts(precision, low_sq, sq, 1)[1])
    return TraceResult(
        value=low_rank + mean, stderr=stderr, n_hvp=used[0], method="hutch++", n_samples=n_probe
    )


def _low_rank_traces(U: Tensor, Z: Tensor, segs: list[tuple[int, int]]) -> list[float]:
    """Block traces of ``A_Q = P A + A P - P A P`` (``P = U^T U``) from ``U`` and ``Z = U A``.

    For the columns ``l = a:b`` of a block: ``tr((P A)_ll) = tr((A P)_ll) = <U_l, Z_l>`` and
    ``tr((P A P)_ll) = <M, U_l U_l^T>`` with ``M = U A U^T = Z U^T``.
    """
    M = Z @ U.T
    M = (M + M.T) / 2
    out = []
    for a, b in segs:
        Ul, Zl = U[:, a:b], Z[:, a:b]
        out.append(float(2.0 * (Ul * Zl).sum() - (M * (Ul @ Ul.T)).sum()))
    return out


def _check_slices(slices: Mapping[str, slice] | None, dim: int) -> dict[str, tuple[int, int]]:
    """Validate disjoint unit-step slices inside ``[0, dim)``; return name -> (start, stop)."""
    out: dict[str, tuple[int, int]] = {}
    if slices is None:
        return out
    for name, sl in slices.items():
        if not isinstance(sl, slice):
            raise HesslensInputError(f"block {name!r}: expected a slice, got {type(sl).__name__}")
        if sl.step not in (None, 1):
            raise HesslensInputError(f"block {name!r}: slices must have step 1, got {sl}")
        start = 0 if sl.start is None else int(sl.start)
        stop = dim if sl.stop is None else int(sl.stop)
        if not 0 <= start <= stop <= dim:
            raise HesslensInputError(f"block {name!r}: slice {sl} is not a range inside [0, {dim})")
        out[str(name)] = (start, stop)
    spans = sorted((a, b, name) for name, (a, b) in out.items() if b > a)
    for (_, b0, n0), (a1, _, n1) in itertools.pairwise(spans):
        if a1 < b0:
            raise HesslensInputError(f"blocks {n0!r} and {n1!r} overlap")
    return out


def _segments(blocks: dict[str, tuple[int, int]], dim: int) -> list[tuple[int, int]]:
    """The named blocks, in order, followed by the gaps they leave in ``[0, dim)``."""
    segs = list(blocks.values())
    pos = 0
    for a, b in sorted(s for s in segs if s[1] > s[0]):
        if a > pos:
            segs.append((pos, a))
        pos = max(pos, b)
    if pos < dim:
        segs.append((pos, dim))
    return segs


class BlockTraceEstimator:
    """The trace of ``A`` and of each diagonal block, from one shared set of probes that grows
    on demand: :meth:`run` draws probes until a stopping rule holds or a product budget is
    spent, and a later :meth:`run` with a stricter rule or a larger budget continues the same
    probe sequence (testing the samples it has first), so the result is that of one run with
    the later arguments, for only the products not spent yet.

    The method is Hutch++ with adaptive Hutchinson on the remainder (Meyer, Musco, Musco and
    Woodruff 2021), every estimate read off the same products:

    1. *Sketch.* ``S`` = ``sketch_rank`` random probes, ``U`` (``(s, dim)``, orthonormal rows)
       a basis of ``A S``, ``Z = U A`` (``s`` more products), ``P = U^T U``.
    2. *Exact low-rank part.* ``A = A_Q + A_R`` with ``A_Q = P A + A P - P A P`` and
       ``A_R = (I - P) A (I - P)``. With ``U_l, Z_l`` the columns of block ``l`` and
       ``M = U A U^T = Z U^T``: ``tr((A_Q)_ll) = 2 <U_l, Z_l> - <M, U_l U_l^T>``.
    3. *Residual part.* For probes ``g``: ``w = (I - P) A (I - P) g = A_R g`` and the samples
       ``x_l = <g_l, w_l>``, unbiased for ``tr((A_R)_ll)`` because ``E[g g^T] = I``.
    4. ``value_l`` = low-rank part + sample mean, ``stderr_l`` = sample std / ``sqrt(n)`` (with
       the products' rounding error added for bfloat16/float16 products).

    The traces are computed exactly from ``dim`` unit-vector products when that costs no more
    than the estimate could (``dim <= 2 sketch_rank + min_probes``), or once the standard errors
    show that reaching the targets would take more than ``dim`` further products and the budget
    allows ``dim`` (small indefinite operators, where Hutchinson's variance is largest).

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A``.
    blocks : mapping of str to slice, optional
        Disjoint unit-step blocks of ``[0, dim)``; the full trace counts every coordinate.
    sketch_rank : int
        Size of the Hutch++ sketch; 0 gives plain Hutchinson (``method="hutchinson"``).
    min_probes : int
        Fewest residual probes before a stopping rule is tested (at least 2).
    distribution : {"rademacher", "gaussian"}
        Probe distribution.
    seed : int
        Seed of the probes (``0 <= seed < 2**32``).
    batch_size : int
        Vectors multiplied per ``matmat`` call (lowered for huge operators so that a batch and
        its products take at most 256 MiB).
    progress : callable, optional
        ``progress(n_hvp)`` after every batch of products.

    Attributes
    ----------
    n_hvp : int
        Products the estimate rests on so far (sketch, ``Z`` and probes).
    n_products : int
        Products actually multiplied by this object (a sketch drawn again counts here only).

    Notes
    -----
    Memory: ``(sketch_rank + 2 * batch_size) * dim * itemsize`` bytes while it runs (the sketch
    basis, one batch of probes and its products; ``Z = U A`` is never stored), float64 for a
    float64 operator, else float32. Between runs it keeps the samples (``n_samples x blocks``
    floats) and the sketch basis while that takes at most 256 MiB; a larger one is dropped and
    drawn again on the next run (``sketch_rank`` products, not counted in ``n_hvp``).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(0.0, 2.0, 300, dtype=torch.float64))
    >>> est = BlockTraceEstimator(A, {"a": slice(0, 10)})
    >>> full, _ = est.run(rtol=0.2, block_floor=None)   # the full trace alone
    >>> first = est.n_hvp
    >>> full, blocks = est.run(rtol=0.2)                 # every block too: goes on from there
    >>> fresh, _ = BlockTraceEstimator(A, {"a": slice(0, 10)}).run(rtol=0.2)
    >>> full.value == fresh.value, est.n_hvp == fresh.n_hvp, est.n_products == est.n_hvp
    (True, True, True)
    """

    def __init__(
        self,
        op: SymmetricOperator | Tensor,
        blocks: Mapping[str, slice] | None = None,
        *,
        sketch_rank: int = 16,
        min_probes: int = 30,
        distribution: str = "rademacher",
        seed: int = 0,
        batch_size: int = 16,
        progress: ProgressFn | None = None,
    ) -> None:
        self.op = as_operator(op)
        check_positive_int(min_probes, "min_probes")
        check_positive_int(batch_size, "batch_size")
        check_distribution(distribution)
        check_nonnegative_int(sketch_rank, "sketch_rank")
        if min_probes < 2:
            raise HesslensInputError(f"min_probes must be at least 2, got {min_probes}")
        n = self.op.dim
        self.seed, self.distribution = seed, distribution
        self.sketch_rank, self.min_probes = int(sketch_rank), int(min_probes)
        self._gen = generator(seed)
        spans = _check_slices(blocks, n)
        self.names = list(spans)
        self._segs = _segments(spans, n)
        self.precision = Precision.of(self.op)
        self._dtype = work_dtype(self.op.dtype)
        self._batch_asked = batch_size
        self._batch = _batch(batch_size, self.op, self._dtype)
        self.progress = progress
        self.n_hvp = 0
        self.n_products = 0
        self._started = False
        self._basis: Tensor | None = None  # the sketch U, kept between runs while small
        self._low = [0.0] * len(self._segs)
        self._chunks: list[Tensor] = []  # (batch, n_segments) residual samples
        self._low_sq: list[Tensor] = []  # coarse products: inputs of the rounding error
        self._sq: list[Tensor] | None = None if self.precision.fine else []
        self._exact: tuple[list[float], list[float], int] | None = None
        self._stacklevel = 4  # where warnings point: the caller of run()

    # ------------------------------------------------------------------ the public step
    def run(
        self, rtol: float = 0.01, max_hvp: int = 1000, block_floor: float | None = 0.01
    ) -> tuple[TraceResult, dict[str, TraceResult]]:
        """Draw probes until the stopping rule holds or ``n_hvp`` reaches ``max_hvp``; return
        ``(full, {block: result})``.

        The rule, once ``min_probes`` samples are in: ``stderr_full <= rtol |full|`` and, unless
        ``block_floor`` is None (the full trace alone), for every block
        ``stderr_l <= rtol max(|value_l|, block_floor |full|)``: a block whose trace is below
        ``block_floor`` of the full one is measured to that share of the full trace, so a block
        with trace ~0 does not run forever. With ``block_floor=None`` the blocks' ``converged``
        is None. Warns :class:`~hesslens.errors.BudgetWarning` when ``max_hvp`` stops it first
        (not for ``rtol=0``, which asks for ``max_hvp`` products) and
        :class:`~hesslens.errors.PrecisionWarning` when the products' precision does.
        """
        if not rtol >= 0:
            raise HesslensInputError(f"rtol must be nonnegative, got {rtol}")
        check_positive_int(max_hvp, "max_hvp")
        fewest = 2 * self.sketch_rank + self.min_probes
        if max_hvp < fewest:
            raise HesslensInputError(
                f"max_hvp={max_hvp} is below 2 * sketch_rank + min_probes = {fewest}: raise "
                "max_hvp or lower sketch_rank / min_probes")
        rule = _Rule(rtol, block_floor)
        if self._exact is None and self.op.dim <= fewest:
            self._go_exact()
        if self._exact is not None:
            return self._exact_results(rule, max_hvp)
        resumed = self._started
        self._start()
        while self.n_hvp < max_hvp or resumed:
            if not resumed:
                self._draw(min(self._batch, max_hvp - self.n_hvp))
            resumed = False  # a resumed run first tests the samples it already has
            if self._n_samples() < self.min_probes:
                continue
            goals = self._goals(rule)
            if all(se <= goal for se, goal in goals):
                break
            if self._exact_is_cheaper(goals, max_hvp):
                self._go_exact()
                return self._exact_results(rule, max_hvp)
        self._release_basis()
        return self._results(rule, max_hvp)

    @property
    def kept_basis(self) -> Tensor | None:
        """The sketch basis ``U`` kept between runs (None before the first run, or when it was
        too large to keep)."""
        return self._basis

    # ------------------------------------------------------------------ the steps
    def _start(self) -> None:
        """Sketch and exact low-rank parts on the first run; on a later one, the sketch basis
        again if it was not kept (the same probes give the same basis)."""
        if self._started:
            if self._basis is None and self.sketch_rank > 0:
                used = [0]
                self._basis = _sketch(self.op, self.sketch_rank, self.distribution,
                                      generator(self.seed), self._dtype, self._batch, used, None)
                self.n_products += used[0]
            return
        self._started = True
        if self.sketch_rank == 0:
            return
        used = [self.n_hvp]
        self._basis = _sketch(self.op, self.sketch_rank, self.distribution, self._gen,
                              self._dtype, self._batch, used, self.progress)
        self._low = _low_rank_parts(self.op, self._basis, self._segs, self._batch, used,
                                    self.progress, None if self._sq is None else self._low_sq)
        self.n_products += used[0] - self.n_hvp
        self.n_hvp = used[0]

    def _draw(self, nb: int) -> None:
        """One batch of ``nb`` residual probes and their samples."""
        G = random_probes(nb, self.op.dim, self.distribution, self._gen, self._dtype,
                          self.op.device)
        self._chunks.append(_residual_samples(self.op, G, self._basis, self._segs, self._sq))
        del G
        self.n_hvp += nb
        self.n_products += nb
        if self.progress is not None:
            self.progress(self.n_hvp)

    def _n_samples(self) -> int:
        return sum(int(c.shape[0]) for c in self._chunks)

    def _estimates(self) -> _Estimates:
        """Values, statistical standard errors and rounding errors of the full trace and every
        segment, from the samples so far."""
        X = torch.cat(self._chunks)
        stats = [_mean_stderr(X[:, i]) for i in range(len(self._segs))]
        values = [lo + mu for lo, (mu, _) in zip(self._low, stats)]
        rounding, full_rounding = _rounding_parts(self.precision, self._low_sq, self._sq,
                                                  len(self._segs))
        return _Estimates(values=values, stderrs=[se for _, se in stats],
                          full_value=sum(values), full_stderr=_mean_stderr(X.sum(dim=1))[1],
                          rounding=rounding, full_rounding=full_rounding, n_samples=X.shape[0])

    def _goals(self, rule: _Rule) -> list[tuple[float, float]]:
        """``(statistical stderr, what it must reach)`` for the full trace and each block the
        rule covers (see :func:`_goal`)."""
        est = self._estimates()
        goals = [(est.full_stderr, _goal(rule.full_target(est.full_value), est.full_rounding))]
        if rule.block_floor is None:
            return goals
        return goals + [
            (est.stderrs[i], _goal(rule.block_target(est.values[i], est.full_value),
                                   est.rounding[i]))
            for i in range(len(self.names))]

    def _exact_is_cheaper(self, goals: list[tuple[float, float]], max_hvp: int) -> bool:
        """The stderr falls as 1/sqrt(samples): whether reaching the goals would take more
        products than the exact trace (``dim`` unit vectors), with the budget allowing that."""
        n_samples = self._n_samples()
        needed = max(n_samples * (se / goal) ** 2 if goal > 0 else math.inf
                     for se, goal in goals)
        n = self.op.dim
        return needed - n_samples >= n and self.n_hvp + n <= max_hvp

    def _go_exact(self) -> None:
        """The traces from ``dim`` unit-vector products, kept for every later run."""
        colsq: list[Tensor] | None = None if self.precision.fine else []
        diag = _exact_diagonal(self.op, self._batch_asked, self.progress, colsq)
        self.n_products += self.op.dim
        values = [float(diag[a:b].sum()) for a, b in self._segs]
        errors = [0.0] * len(self._segs)
        if colsq is not None:
            c = torch.cat(colsq)
            errors = [self.precision.rounding_stderr(float(c[a:b].sum())) for a, b in self._segs]
        self._exact = (values, errors, self.n_hvp + self.op.dim)
        self._basis, self._chunks = None, []

    def _exact_results(self, rule: _Rule, max_hvp: int
                       ) -> tuple[TraceResult, dict[str, TraceResult]]:
        values, errors, n_hvp = self._exact
        self.n_hvp = n_hvp
        full_value = sum(values)
        full_error = math.sqrt(sum(e * e for e in errors))

        def exact(value: float, error: float, target: float | None) -> TraceResult:
            return TraceResult(value=value, stderr=error, n_hvp=n_hvp, method="exact",
                               n_samples=0,
                               converged=None if target is None else bool(error <= target))

        full = exact(full_value, full_error, rule.full_target(full_value))
        parts = {nm: exact(values[i], errors[i], rule.block_target(values[i], full_value))
                 for i, nm in enumerate(self.names)}
        _warn_trace(full, parts, rule.rtol, max_hvp, self.precision, True, self._stacklevel)
        return full, parts

    def _release_basis(self) -> None:
        """Keep the sketch basis between runs only while it is small (else drawn again)."""
        itemsize = torch.finfo(self._dtype).bits // 8
        if self._basis is not None and self._basis.numel() * itemsize > WORK_BYTES:
            self._basis = None

    def _results(self, rule: _Rule, max_hvp: int) -> tuple[TraceResult, dict[str, TraceResult]]:
        est = self._estimates()
        method = "hutch++" if self.sketch_rank > 0 else "hutchinson"

        def result(value: float, stderr: float, rounding: float,
                   target: float | None) -> TraceResult:
            stderr = _with_rounding(stderr, rounding)
            return TraceResult(
                value=value, stderr=stderr, n_hvp=self.n_hvp, method=method,
                n_samples=int(est.n_samples),
                converged=None if target is None else bool(stderr <= target))

        full = result(est.full_value, est.full_stderr, est.full_rounding,
                      rule.full_target(est.full_value))
        parts = {nm: result(est.values[i], est.stderrs[i], est.rounding[i],
                            rule.block_target(est.values[i], est.full_value))
                 for i, nm in enumerate(self.names)}
        limited = all(se <= goal for se, goal in self._goals(rule))
        _warn_trace(full, parts, rule.rtol, max_hvp, self.precision, limited, self._stacklevel)
        return full, parts


@dataclass(frozen=True)
class _Rule:
    """A stopping rule of :meth:`BlockTraceEstimator.run`."""

    rtol: float
    block_floor: float | None

    def full_target(self, full_value: float) -> float:
        return self.rtol * abs(full_value)

    def block_target(self, value: float, full_value: float) -> float | None:
        if self.block_floor is None:
            return None
        return self.rtol * max(abs(value), self.block_floor * abs(full_value))


@dataclass(frozen=True)
class _Estimates:
    """What the samples so far say (see :meth:`BlockTraceEstimator._estimates`)."""

    values: list[float]
    stderrs: list[float]
    full_value: float
    full_stderr: float
    rounding: list[float]
    full_rounding: float
    n_samples: int


def _goal(target: float, rounding: float) -> float:
    """What the statistical standard error must reach for the total (with the rounding error
    of coarse products) to meet ``target``; where rounding alone exceeds it, the rounding
    error itself (more probes could not help)."""
    if rounding == 0.0:
        return target
    return max(math.sqrt(max(target * target - rounding * rounding, 0.0)), rounding)


def _warn_trace(full: TraceResult, parts: dict[str, TraceResult], rtol: float, max_hvp: int,
                precision: Precision, limited: bool, stacklevel: int) -> None:
    """Warn when an estimate missed ``rtol``: on the product budget (BudgetWarning) or, when
    the statistical error met its goal, on the products' precision (PrecisionWarning)."""
    open_blocks = [nm for nm, r in parts.items() if r.converged is False]
    if rtol <= 0 or (full.converged and not open_blocks):
        return
    rel = full.stderr / abs(full.value) if full.value else math.inf
    which = f"; {len(open_blocks)} of {len(parts)} blocks above it too" if open_blocks else ""
    if limited and not precision.fine:
        warnings.warn(precision.message(
            f"the trace (relative standard error {rel:.2%}{which})", f"rtol={rtol:.2%}"),
            PrecisionWarning, stacklevel=stacklevel)
        return
    warnings.warn(
        f"trace stopped at max_hvp={max_hvp} products with relative standard error "
        f"{rel:.2%} (rtol={rtol:.2%}{which}): raise max_hvp or rtol",
        BudgetWarning,
        stacklevel=stacklevel,
    )


class TraceState:
    """Where a :func:`block_traces` run stopped, for a later call to continue (kept for
    compatibility: a :class:`BlockTraceEstimator` is the same state with its own methods).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.linspace(0.0, 2.0, 300, dtype=torch.float64))
    >>> st = TraceState()
    >>> loose = block_traces(A, {"a": slice(0, 10)}, rtol=0.2, block_floor=1e300, state=st)
    >>> strict, _ = block_traces(A, {"a": slice(0, 10)}, rtol=0.2, state=st)
    >>> fresh, _ = block_traces(A, {"a": slice(0, 10)}, rtol=0.2)
    >>> strict.value == fresh.value, strict.n_hvp == fresh.n_hvp
    (True, True)
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.estimator: BlockTraceEstimator | None = None

    @property
    def basis(self) -> Tensor | None:
        """The sketch basis kept for the next call (None when too large to keep)."""
        return None if self.estimator is None else self.estimator.kept_basis


def block_traces(
    op: SymmetricOperator | Tensor,
    slices: Mapping[str, slice] | None = None,
    rtol: float = 0.01,
    max_hvp: int = 1000,
    min_probes: int = 30,
    sketch_rank: int = 16,
    distribution: str = "rademacher",
    seed: int = 0,
    batch_size: int = 16,
    progress: ProgressFn | None = None,
    block_floor: float = 0.01,
    state: TraceState | None = None,
) -> tuple[TraceResult, dict[str, TraceResult]]:
    """The trace of ``A`` and of each diagonal block, from one shared set of probes: one
    :meth:`BlockTraceEstimator.run` (see there for the method and the stopping rule).

    Parameters
    ----------
    op, slices :
        The operator and its blocks (``BlockTraceEstimator(op, slices, ...)``).
    rtol, max_hvp, block_floor :
        The stopping rule and budget of :meth:`BlockTraceEstimator.run`.
    min_probes, sketch_rank, distribution, seed, batch_size, progress :
        As for :class:`BlockTraceEstimator`.
    state : TraceState, optional
        Where the estimate stopped is recorded here; a later call with the same ``slices``,
        ``seed``, ``distribution``, ``sketch_rank`` and ``batch_size`` and this state goes on
        with the same probes (on the ``op`` it is given), as :meth:`BlockTraceEstimator.run`
        does.

    Returns
    -------
    full : TraceResult
        The trace of ``A``.
    blocks : dict of str to TraceResult
        The trace of each block, in the order of ``slices``; every result reports the same,
        shared ``n_hvp``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> B = torch.randn(400, 400, generator=g, dtype=torch.float64)
    >>> A = B @ B.T / 400
    >>> full, blocks = block_traces(A, {"a": slice(0, 100), "b": slice(100, 400)}, rtol=0.02)
    >>> abs(full.value - (blocks["a"].value + blocks["b"].value)) < 1e-9
    True
    >>> abs(blocks["a"].value - float(A.diagonal()[:100].sum())) < 4 * blocks["a"].stderr
    True
    """
    op = as_operator(op)

    def make() -> BlockTraceEstimator:
        return BlockTraceEstimator(op, slices, sketch_rank=sketch_rank, min_probes=min_probes,
                                   distribution=distribution, seed=seed,
                                   batch_size=batch_size, progress=progress)

    estimator = make()
    estimator._stacklevel = 5  # warnings point at the caller of block_traces
    if state is None:
        return estimator.run(rtol, max_hvp, block_floor)
    key = (op.dim, tuple(estimator._segs), distribution, seed, sketch_rank,
           estimator._batch, estimator._dtype)
    if state.key == key and state.estimator is not None:
        estimator = state.estimator
        estimator.op, estimator.progress, estimator._stacklevel = op, progress, 5
    state.key, state.estimator = key, estimator
    return estimator.run(rtol, max_hvp, block_floor)
