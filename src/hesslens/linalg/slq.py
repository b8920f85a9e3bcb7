"""Stochastic Lanczos quadrature (SLQ): the eigenvalue density of a symmetric operator.

For a unit probe ``v``, ``m`` Lanczos steps from ``v`` give a tridiagonal ``T`` with Ritz
values ``theta_j`` and eigenvectors ``s_j``; the Gauss quadrature ``sum_j s_{1j}^2
delta(x - theta_j)`` matches the first ``2m - 1`` moments of ``v^T delta(x - A) v``, whose
average over random probes is the spectral measure ``(1/n) sum_i delta(x - lambda_i)``
(Golub and Meurant; Ubaru, Chen and Saad 2017; Ghorbani, Krishnan and Xiao 2019).

The probes' Lanczos runs go as one batch: each step is one ``op.matmat`` of shape
``(n_probes, dim)``, and each run is fully reorthogonalised against its own float64 basis.

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

from hesslens.errors import HesslensInputError
from hesslens.linalg.lanczos import _BatchLanczos, _tridiag_eig
from hesslens.linalg.operator import SymmetricOperator, as_operator
from hesslens.linalg.probes import check_distribution, random_probes
from hesslens.linalg.results import EigenResult
from hesslens.linalg.spectrum import Spectrum

__all__ = ["slq"]


def slq(
    op: SymmetricOperator | torch.Tensor,
    n_probes: int = 8,
    n_steps: int = 80,
    seed: int = 0,
    distribution: str = "rademacher",
    deflate: EigenResult | None = None,
    progress: Callable[[int], None] | None = None,
    batch_size: int | None = None,
) -> tuple[Spectrum, int]:
    """Estimate the spectral measure of ``A`` by stochastic Lanczos quadrature.

    Parameters
    ----------
    op : SymmetricOperator or Tensor
        The symmetric operator ``A`` (``dim = n``).
    n_probes : int
        Number of random probes (Lanczos runs).
    n_steps : int
        Lanczos steps per probe. With ``n_steps >= n`` (minus the deflated rank) every run
        reaches an invariant subspace: its nodes are exact eigenvalues and the measure
        reproduces ``v^T A^p v`` for every power. Runs that reach an invariant subspace
        earlier stop there (their quadrature is then exact).
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
        Probes run together (default: all ``n_probes``). The bases take
        ``8 * batch_size * n_steps * n`` bytes: lower it for very large operators.

    Returns
    -------
    spectrum : Spectrum
        Nodes: the Ritz values of every run (and the deflated eigenvalues); weights: the
        squared first components of the eigenvectors of ``T``, over ``n_probes``.
    n_hvp : int
        Products used.

    Raises
    ------
    ValueError
        For nonpositive sizes or a ``deflate`` result without vectors.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> B = torch.randn(200, 200, generator=g, dtype=torch.float64)
    >>> A = (B + B.T) / 2
    >>> spec, n_hvp = slq(A, n_probes=4, n_steps=30)
    >>> n_hvp, round(float(spec.weights.sum()), 12)
    (120, 1.0)
    """
    op = as_operator(op)
    n = op.dim
    for name, value in (("n_probes", n_probes), ("n_steps", n_steps)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise HesslensInputError(f"{name} must be a positive integer, got {value!r}")
    check_distribution(distribution)
    batch_size = n_probes if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise HesslensInputError(f"batch_size must be positive, got {batch_size}")

    U = None
    defl_values = np.zeros(0)
    if deflate is not None:
        if deflate.vectors is None:
            raise HesslensInputError("deflate needs eigenvectors: call eigsh(return_vectors=True)")
        V = deflate.vectors.to(dtype=torch.float64, device=op.device)
        if V.ndim != 2 or V.shape[1] != n:
            raise HesslensInputError(f"deflate vectors must have shape (r, {n})")
        U = torch.linalg.qr(V.T)[0].T.contiguous()
        defl_values = deflate.values.detach().cpu().numpy().astype(np.float64)
    rank = defl_values.shape[0]

    gen = torch.Generator().manual_seed(seed)
    probes = random_probes(n_probes, n, distribution, gen, torch.float64, op.device)
    nodes, weights = [], []
    n_hvp = 0
    if rank < n:
        for s in range(0, n_probes, batch_size):
            engine = _BatchLanczos(op, probes[s : s + batch_size], n_steps, deflation=U)
            while engine.active:
                engine.step()
                if progress is not None:
                    progress(n_hvp + engine.n_hvp)
            n_hvp += engine.n_hvp
            for alpha, beta in zip(engine.alpha, engine.beta):
                theta, S = _tridiag_eig(np.array(alpha), np.array(beta[:-1]))
                nodes.append(theta)
                weights.append(S[0] ** 2)
    if not nodes:  # everything deflated
        return Spectrum.from_eigenvalues(defl_values), n_hvp
    slq_weights = np.concatenate(weights) / n_probes
    if rank == 0:
        return Spectrum(np.concatenate(nodes), slq_weights), n_hvp
    all_nodes = np.concatenate([defl_values, *nodes])
    all_weights = np.concatenate([np.full(rank, 1.0 / n), (n - rank) / n * slq_weights])
    return Spectrum(all_nodes, all_weights), n_hvp
