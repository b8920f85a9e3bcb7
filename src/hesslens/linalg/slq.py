"""Stochastic Lanczos quadrature (SLQ): the eigenvalue density of a symmetric operator.

For a unit probe ``v``, ``m`` Lanczos steps from ``v`` give a tridiagonal ``T`` with Ritz
values ``theta_j`` and eigenvectors ``s_j``; the Gauss quadrature ``sum_j s_{1j}^2
delta(x - theta_j)`` matches the first ``2m - 1`` moments of ``v^T delta(x - A) v``, whose
average over random probes is the spectral measure ``(1/n) sum_i delta(x - lambda_i)``
(Golub and Meurant; Ubaru, Chen and Saad 2017; Ghorbani, Krishnan and Xiao 2019).

The probes' Lanczos runs go in groups of ``probe_chunk``: each step is one ``op.matmat`` of
shape ``(probe_chunk, dim)``. By default (``reorth="auto"``) large problems keep no basis: the
three-term recurrence needs three vectors per probe. Without reorthogonalisation the runs lose
orthogonality and repeat converged Ritz values ("ghosts"), but the quadrature stays accurate:
the weights of a ghost and its original add up to what one node would carry (Paige; Greenbaum
and Strakos; checked against dense spectra in ``tests/linalg/test_linalg_slq.py``).

Example
-------
>>> import torch
>>> from hesslens.linalg import MatrixOperator
>>> A = torch.diag(torch.tensor([1.0, 2.0, 2.0, 5.0], dtype=torch.float64))
>>> spec, n_hvp = slq(MatrixOperator(A), n_probes=4, n_steps=10)
>>> sorted({round(x, 8) for x in spec.nodes.tolist()})
[1.0, 2.0, 5.0]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from hesslens.checks import check_positive_int
from hesslens.errors import HesslensInputError
from hesslens.linalg.budget import WORK_BYTES, vectors_within
from hesslens.linalg.lanczos import (
    _BatchLanczos,
    _coef,
    _combine_rows_,
    _gram64,
    _norm64,
    _rowdot,
    _tridiag_eig,
)
from hesslens.linalg.lanczos import work_dtype as default_work_dtype
from hesslens.linalg.operator import SymmetricOperator, as_operator, matmat_as
from hesslens.linalg.precision import Precision
from hesslens.linalg.probes import check_distribution, generator, random_probes
from hesslens.linalg.results import EigenResult
from hesslens.linalg.spectrum import Spectrum

__all__ = ["REORTH", "slq"]

#: The reorthogonalisation modes of :func:`slq`.
REORTH = ("auto", "full", "none")

# reorth="auto" keeps full reorthogonalisation while one group's float64 bases take at most
# this many bytes (then the old, exact-to-rounding path runs at no memory cost that matters).
_AUTO_FULL_BYTES = 2**27



def _recurrence(
    op: SymmetricOperator,
    make_probes: Callable[[], Tensor],
    n_steps: int,
    U: Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
    on_step: Callable[[int], None],
) -> list[tuple[list[float], list[float]]]:
    """The Lanczos coefficients from every probe ``make_probes()`` draws (the rows of one
    group; their storage becomes the first Lanczos vectors) by the three-term recurrence.

    No basis is kept: ``q_prev``, ``q`` and ``w = A q`` per probe (plus the deflation basis
    ``U``, against which ``w`` is projected after every product). A run stops after
    ``n_steps`` steps or on breakdown (``beta`` below
    :attr:`~hesslens.linalg.precision.Precision.breakdown_tol` times ``max ||A q||``: an
    invariant Krylov space, whose quadrature is exact). ``on_step(k)`` is told the products
    of each step.
    """
    breakdown_tol = Precision.of(op).breakdown_tol
    q = make_probes().to(dtype=dtype, device=device)
    n_runs = int(q.shape[0])
    coeffs: list[tuple[list[float], list[float]]] = [([], []) for _ in range(n_runs)]
    anorm = [0.0] * n_runs
    live = list(range(n_runs))  # global indices of the rows of q

    def deflate(W: Tensor) -> Tensor:
        if U is not None:
            W.addmm_(_coef(W, U), U, alpha=-1.0)
        return W

    q = deflate(deflate(q))
    norms = _norm64(q)
    if bool((norms == 0).any()):
        raise HesslensInputError("an SLQ probe is zero after deflation")
    q.div_(norms.to(dtype=dtype, device=device)[:, None])
    q_prev: Tensor | None = None
    beta_prev = torch.zeros(n_runs, dtype=torch.float64)
    for _ in range(n_steps):
        w = deflate(matmat_as(op, q, dtype, device))
        on_step(len(live))
        wnorm = _norm64(w).tolist()
        alpha = _rowdot(q, w)
        w.addcmul_(q, alpha.to(dtype=dtype, device=device)[:, None], value=-1.0)
        if q_prev is not None:
            w.addcmul_(q_prev, beta_prev.to(dtype=dtype, device=device)[:, None], value=-1.0)
        w = deflate(w)
        beta = _norm64(w)
        alpha_l, beta_l = alpha.tolist(), beta.tolist()
        keep = []
        for row, i in enumerate(live):
            coeffs[i][0].append(alpha_l[row])
            coeffs[i][1].append(beta_l[row])
            anorm[i] = max(anorm[i], wnorm[row])
            if beta_l[row] > breakdown_tol * anorm[i]:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):  # compact the group to the runs still going
            sel = torch.tensor(keep, device=device)
            q, w, beta = q[sel], w[sel], beta[torch.tensor(keep)]
            live = [live[r] for r in keep]
        w.div_(beta.to(dtype=dtype, device=device)[:, None])
        q_prev, q, beta_prev = q, w, beta
    return coeffs


def slq(
    op: SymmetricOperator | torch.Tensor,
    n_probes: int = 8,
    n_steps: int = 80,
    seed: int = 0,
    distribution: str = "rademacher",
    deflate: EigenResult | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int | None = None,
    *,
    reorth: str = "auto",
    probe_chunk: int | None = None,
    work_dtype: torch.dtype | None = None,
    work_device: torch.device | str | None = None,
    overwrite_deflate: bool = False,
) -> tuple[Spectrum, int]:
    """Estimate the spectral measure of ``A`` by stochastic Lanczos quadrature.

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A`` (``dim = n``).
    n_probes : int
        Number of random probes (Lanczos runs).
    n_steps : int
        Lanczos steps per probe. With ``n_steps >= n`` (minus the deflated rank) and full
        reorthogonalisation every run reaches an invariant subspace: its nodes are exact
        eigenvalues and the measure reproduces ``v^T A^p v`` for every power. Runs that reach
        an invariant subspace earlier stop there (their quadrature is then exact).
    seed : int
        Seed of the probes.
    distribution : {"rademacher", "gaussian"}
        Probe distribution (each probe is normalised).
    deflate : EigenResult, optional
        Top eigenpairs of ``A`` (with ``vectors``), e.g. from :func:`eigsh`. The probes and
        every new Lanczos vector are then projected onto the orthogonal complement of the
        ``r`` vectors, and the result is the mixture ``(1/n) sum_{i<=r} delta(x - lambda_i)
        + ((n - r)/n) mu_R``, with ``mu_R`` the SLQ measure of ``A`` on the complement. The
        outliers then carry their exact weight ``1/n`` (plain SLQ gives them random weights
        of the same mean but a large variance), which makes the mean (``~ tr(A) / n``) and
        the top of the density much more accurate.
    progress : callable, optional
        ``progress(n_hvp_used)`` after every batched step.
    batch_size : int, optional
        Former name of ``probe_chunk`` (kept working; ``probe_chunk`` wins if both are given).
    reorth : {"auto", "full", "none"}
        ``"none"``: the three-term recurrence, no basis kept (ghost Ritz values appear, the
        quadrature stays accurate). ``"full"``: every run fully reorthogonalised against its
        own float64 basis (exact to rounding; memory grows with ``n_steps``). ``"auto"``:
        ``"full"`` while one group's bases take at most 128 MiB
        (``probe_chunk * n_steps * n * 8`` bytes), else ``"none"``.
    probe_chunk : int, optional
        Probes run together (one ``matmat`` of this many rows per step). Default: all
        ``n_probes`` if their working vectors fit in 256 MiB (``3 * n_probes * n * itemsize``),
        else as many as fit (at least 1). The groups run one after the other. Rademacher
        probes come out the same whatever the grouping (drawn group by group from one
        generator); the moments of the result then agree to rounding, while without
        reorthogonalisation single nodes may move (rounding decides where ghosts appear).
    work_dtype, work_device : optional
        Dtype and device of the ``"none"`` recurrence's vectors and of its deflation basis
        (the ``"full"`` path works in float64 on the operator's device).
        Default: float64 for a float64 operator, else float32 (as accurate as the products);
        the operator's device. ``work_device="cpu"`` keeps them off a GPU (each product then
        moves one group to the device and back).
    overwrite_deflate : bool
        Let ``deflate.vectors`` be made orthonormal in place (as scipy's ``overwrite_a``) where
        they are not to rounding (float32 Ritz vectors can be 1e-4 off), instead of in a copy
        of ``r`` vectors; only their span matters here, and it is kept.

    Returns
    -------
    spectrum : Spectrum
        Nodes: the Ritz values of every run (and the deflated eigenvalues); weights: the
        squared first components of the eigenvectors of ``T``, over ``n_probes``.
    n_hvp : int
        Products used.

    Notes
    -----
    Memory, besides what one product needs and ``O(n_probes * n_steps)`` coefficients:
    with ``reorth="none"``, ``3 * probe_chunk * n * itemsize(work_dtype)`` bytes for the
    working vectors (``q_prev``, ``q``, ``A q`` per probe; the probes become the first ``q``),
    plus ``r * n * itemsize`` for the deflation basis when the ``deflate`` vectors are not
    orthonormal to rounding in ``work_dtype`` already (eigsh's are, and are used as they are);
    Gaussian probes are drawn in float64 first. With ``reorth="full"``,
    ``probe_chunk * (n_steps + 2) * n * 8 + r * n * 8`` bytes. On a 10M-parameter float32
    network the default group is 2 probes: 6 copies of the parameters (plus the 10 deflation
    vectors of ``density()``).

    Raises
    ------
    ValueError
        For nonpositive sizes, an unknown ``reorth`` or a ``deflate`` result without vectors.
    NonFiniteCurvatureError
        When a product has a NaN or infinite entry.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> B = torch.randn(200, 200, generator=g, dtype=torch.float64)
    >>> A = (B + B.T) / 2
    >>> spec, n_hvp = slq(A, n_probes=4, n_steps=30)
    >>> n_hvp, round(float(spec.weights.sum()), 12)
    (120, 1.0)
    >>> spec2, _ = slq(A, n_probes=4, n_steps=30, reorth="none", probe_chunk=2)
    >>> abs(spec2.moment(2) - spec.moment(2)) < 1e-8
    True
    """
    op = as_operator(op)
    n = op.dim
    check_positive_int(n_probes, "n_probes")
    check_positive_int(n_steps, "n_steps")
    check_distribution(distribution)
    if reorth not in REORTH:
        raise HesslensInputError(f"reorth must be one of {REORTH}, got {reorth!r}")
    dtype = default_work_dtype(op.dtype) if work_dtype is None else work_dtype
    device = op.device if work_device is None else torch.device(work_device)
    if probe_chunk is None:
        probe_chunk = batch_size
    if probe_chunk is None:
        # as many probes as keep the group's three working vectors within the budget
        probe_chunk = vectors_within(WORK_BYTES, n, dtype, per=3, at_most=n_probes)
    probe_chunk = check_positive_int(probe_chunk, "probe_chunk")

    defl_values = np.zeros(0)
    if deflate is not None:
        if deflate.vectors is None:
            raise HesslensInputError("deflate needs eigenvectors: call eigsh(return_vectors=True)")
        if deflate.vectors.ndim != 2 or deflate.vectors.shape[1] != n:
            raise HesslensInputError(f"deflate vectors must have shape (r, {n})")
        defl_values = deflate.values.detach().cpu().numpy().astype(np.float64)
    rank = defl_values.shape[0]
    steps = min(int(n_steps), n - rank)
    if reorth == "auto":
        reorth = "full" if probe_chunk * steps * n * 8 <= _AUTO_FULL_BYTES else "none"
    if reorth == "full":  # the bases of the full path are float64 on the operator's device
        dtype, device = torch.float64, op.device
    U = None
    if deflate is not None and rank < n:
        U = _deflation_basis(deflate.vectors, dtype, device, overwrite_deflate)

    gen = generator(seed)
    nodes, weights = [], []
    used = [0]

    def on_step(k: int) -> None:
        used[0] += k
        if progress is not None:
            progress(used[0])

    if rank < n:
        for s in range(0, n_probes, probe_chunk):
            c = min(probe_chunk, n_probes - s)
            def draw(c: int = c) -> Tensor:
                return random_probes(c, n, distribution, gen, dtype, device)

            if reorth == "full":  # dtype is float64 here
                runs = _full_runs(op, draw, steps, U, on_step)
            else:
                runs = _recurrence(op, draw, steps, U, dtype, device, on_step)
            for alpha, beta in runs:
                theta, S = _tridiag_eig(np.array(alpha), np.array(beta[:-1]))
                nodes.append(theta)
                weights.append(S[0] ** 2)
    return _measure(nodes, weights, defl_values, n_probes, n), used[0]


def _deflation_basis(vectors: Tensor, dtype: torch.dtype, device: torch.device,
                     overwrite: bool) -> Tensor:
    """Orthonormal rows spanning the deflation ``vectors``, in the working dtype: by Cholesky QR
    in float64 (an ``r x r`` Gram matrix: ``(r, n)`` once, not an ``n x r`` float64 QR), or the
    vectors themselves when they are orthonormal to rounding already (in place when
    ``overwrite`` or when the cast made a copy)."""
    rank = vectors.shape[0]
    V = vectors.to(device=device, dtype=dtype)
    eye = torch.eye(rank, dtype=torch.float64)
    gram = _gram64(V, V)
    if float((gram - eye).abs().max()) <= 10.0 * rank * torch.finfo(dtype).eps:
        return V  # orthonormal to rounding already: no copy
    L = torch.linalg.cholesky(gram + 1e-14 * eye)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    if overwrite or V is not vectors:  # V is ours: in place
        return _combine_rows_(V, Linv)
    return Linv.to(device=device, dtype=dtype) @ V


def _full_runs(op: SymmetricOperator, make_probes: Callable[[], Tensor], steps: int,
               U: Tensor | None, on_step: Callable[[int], None]
               ) -> list[tuple[list[float], list[float]]]:
    """The Lanczos coefficients from every probe ``make_probes()`` draws, each run fully
    reorthogonalised against its own float64 basis (and the deflation ``U``); the probes are
    copied into the bases and freed."""
    engine = _BatchLanczos(op, make_probes(), steps, deflation=U)
    while engine.active:
        before = engine.n_hvp
        engine.step()
        on_step(engine.n_hvp - before)
    return list(zip(engine.alpha, engine.beta))


def _measure(nodes: list[np.ndarray], weights: list[np.ndarray], defl_values: np.ndarray,
             n_probes: int, n: int) -> Spectrum:
    """The quadrature of the runs mixed with the deflated eigenvalues (weight ``1/n`` each)."""
    rank = defl_values.shape[0]
    if not nodes:  # everything deflated
        return Spectrum.from_eigenvalues(defl_values)
    slq_weights = np.concatenate(weights) / n_probes
    if rank == 0:
        return Spectrum(np.concatenate(nodes), slq_weights)
    all_nodes = np.concatenate([defl_values, *nodes])
    all_weights = np.concatenate([np.full(rank, 1.0 / n), (n - rank) / n * slq_weights])
    return Spectrum(all_nodes, all_weights)
