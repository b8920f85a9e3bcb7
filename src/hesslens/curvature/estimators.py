"""The estimators every curvature operator offers as methods: top eigenvalues, the trace and the
trace of every block, the spectral density, the dense matrix and a SciPy view.

They are thin fronts over :mod:`hesslens.linalg`, which knows nothing of networks: each method
checks its arguments, calls the algorithm on the operator and keeps what an estimator may go on
from (the trace probes already spent). The operator supplies ``dim``, ``dtype``, ``device``,
``matmat``, ``layers``, ``layer_ranges()`` and ``layer_indices()``.

Example:
    >>> import torch, hesslens as hl
    >>> A = hl.Hessian(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy,
    ...                (torch.randn(6, 3), torch.randint(0, 2, (6,))))
    >>> full, layers = A.traces(rtol=0.1)
    >>> list(layers)
    ['<root>']
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator

from hesslens.checks import check_positive_int
from hesslens.curvature.layout import Permuted, contiguous_blocks
from hesslens.errors import HesslensInputError
from hesslens.linalg import (
    BlockTraceEstimator,
    EigenResult,
    Spectrum,
    TraceResult,
    eigsh,
    hutchinson,
    hutchpp,
    slq,
)


class Estimators:
    """Estimator methods over ``self.matmat`` (mixed into the curvature operators)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def _reset_estimators(self, version: int) -> None:
        """Forget what the estimators kept (on construction, and after parameters changed)."""
        self._trace_estimators: dict[tuple, BlockTraceEstimator] = {}
        self._version = version

    def _trace_estimator(self, rtol: float, max_hvp: int, distribution: str, seed: int
                         ) -> BlockTraceEstimator:
        """The estimator of the full and every layer's trace for these arguments: it keeps its
        probes, so :meth:`trace` and :meth:`traces` go on from where the other stopped."""
        if self._version != self._shared.loop.version:  # the parameters changed since
            self._reset_estimators(self._shared.loop.version)
        key = (rtol, max_hvp, distribution, seed)
        if key not in self._trace_estimators:
            ranges = self.layer_ranges()
            view: Any = self
            if ranges is None:  # layers are not ranges of the vector: permute them into ranges
                perm, ranges = contiguous_blocks(self.dim, self.layer_indices())
                view = Permuted(self, perm)
            lean = self._shared.budget.trace()  # a smaller sketch where vectors are large
            sizes = {} if lean is None else {"sketch_rank": lean[0], "batch_size": lean[1]}
            self._trace_estimators[key] = BlockTraceEstimator(view, ranges,
                                                              distribution=distribution,
                                                              seed=seed, **sizes)
        return self._trace_estimators[key]

    def dense(self, max_dim: int = 20_000) -> torch.Tensor:
        """The whole matrix, built column by column (``dim`` products): for small models."""
        if self.dim > max_dim:
            raise HesslensInputError(
                f"the operator is {self.dim} x {self.dim}; dense() stops at max_dim={max_dim}"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self.matmat(eye[i : i + 64]) for i in range(0, self.dim, 64)]
        M = torch.cat(cols, dim=0)
        return (M + M.T) / 2

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 (numpy in, numpy out)."""
        def matmat(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            if X.ndim == 1:
                X = X[:, None]
            V = torch.as_tensor(X.T.copy())
            return self.matmat(V).to("cpu", torch.float64).numpy().T

        return LinearOperator((self.dim, self.dim), matvec=matmat, matmat=matmat,
                              rmatvec=matmat, rmatmat=matmat, dtype=np.float64)

    # ------------------------------------------------------------------ estimators
    def eigenvalues(
        self,
        k: int = 5,
        *,
        which: str = "LA",
        tol: float = 1e-6,
        max_steps: int | None = None,
        seed: int = 0,
        return_vectors: bool | None = None,
        ncv: int | None = None,
        basis_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
        v0: torch.Tensor | None = None,
    ) -> EigenResult:
        """The top-``k`` eigenvalues (``which="LA"``; also ``"SA"``, ``"LM"``) by thick-restarted
        Lanczos with full reorthogonalisation in a basis of at most ``ncv`` vectors (in
        ``basis_dtype`` on ``basis_device``), stopped on the a-posteriori error bound of each
        Ritz value: see :func:`hesslens.linalg.eigsh`. ``v0`` (a vector, or ``(m, dim)``
        vectors such as an earlier result's ``.vectors``) warm-starts the run near them.
        ``return_vectors``: ``None`` (default) the eigenvectors, for ``k=1`` on a large model
        formed when first read (below); ``True`` formed with the values (a basis is kept);
        ``False`` none.

        Memory, in vectors of ``dim`` (float32 for a float32 or half-precision operator): the
        basis (``ncv + 1``; each step's product is summed straight into it and the ``k`` Ritz
        vectors are formed in place in it), one update temporary, and what one product holds
        (:mod:`hesslens.curvature.loop`). ``ncv`` and ``basis_device`` default from the
        operator's memory budget (:mod:`hesslens.curvature.memory`): a few vectors where they
        are large, and the basis off a GPU that cannot hold it. For ``k=1`` on a large model
        no basis at all (``ncv=0``, the three-term recurrence: three vectors, the products of
        a full basis); its eigenvector is then formed when ``.vectors`` is first read, by a
        second pass of products (:mod:`hesslens.linalg.three_term`)."""
        _check_k(k, self.dim)
        budget = self._shared.budget
        steps = max(100, 30 * k) if max_steps is None else int(max_steps)
        if ncv is None:  # from the memory budget: a smaller basis where vectors are large
            ncv = budget.ncv(k, self.dim, steps, vector_later=return_vectors is not True)
        if basis_device is None:
            rows = 3 if ncv == 0 else (ncv or min(self.dim, steps)) + 1
            basis_device = budget.basis_device(rows, self.device)
        return eigsh(self, k=k, which=which, tol=tol, max_steps=max_steps, seed=seed,
                     return_vectors=return_vectors is not False, ncv=ncv, basis_dtype=basis_dtype,
                     basis_device=basis_device, v0=v0)

    def trace(
        self,
        *,
        method: str = "hutch++",
        rtol: float = 0.01,
        max_hvp: int = 1000,
        n_hvp: int | None = None,
        distribution: str = "rademacher",
        seed: int = 0,
    ) -> TraceResult:
        """The trace. ``"hutch++"`` (default): sketch-deflated Hutchinson that stops when its
        standard error falls below ``rtol`` of the estimate (or at ``max_hvp`` products);
        ``"hutchinson"`` and ``"hutch++-fixed"`` spend exactly ``n_hvp`` products; ``"exact"``
        spends ``dim``.

        Memory (``"hutch++"``), in copies of the parameters (one product:
        :mod:`hesslens.curvature.loop`): the snapshot (1), the sketch basis (16), a batch of ``b``
        probes and its products (``2 b``, ``b = min(16, 256 MiB / (2 dim itemsize))``: 3 for 10M
        float32 parameters) and the products of that batch; about 23 + a product at 10M."""
        if method == "hutch++":
            budget = n_hvp or max_hvp
            # the full trace alone decides; the layers' shares come from the same probes, and
            # a later traces() goes on from them
            return self._trace_estimator(rtol, budget, distribution, seed).run(
                rtol, budget, block_floor=None)[0]
        if method == "hutchinson":
            return hutchinson(self, n_hvp=n_hvp or 100, distribution=distribution, seed=seed)
        if method == "hutch++-fixed":
            return hutchpp(self, n_hvp=n_hvp or 99, distribution=distribution, seed=seed)
        if method == "exact":
            value = float(torch.diagonal(self.dense()).sum())
            return TraceResult(value=value, stderr=0.0, n_hvp=self.dim, method="exact",
                               n_samples=0, converged=True)
        raise HesslensInputError(
            f"unknown trace method {method!r}: use 'hutch++', 'hutchinson', 'hutch++-fixed' or "
            "'exact'"
        )

    def traces(
        self,
        *,
        rtol: float = 0.01,
        max_hvp: int = 1000,
        distribution: str = "rademacher",
        seed: int = 0,
    ) -> tuple[TraceResult, dict[str, TraceResult]]:
        """The full trace and every layer's block trace from one shared set of probes: for
        Rademacher ``v``, ``E[v_l . (H v)_l] = tr(H_ll)``. The layer estimates add up to the full
        one exactly. The estimate runs until the full trace and every layer's reach ``rtol``
        (layers below 1 % of the full trace: ``rtol`` of 1 % of it), so it may take more
        products than :meth:`trace`, which stops on the full trace alone. After a
        :meth:`trace` with the same arguments its products are reused: as they are when its
        layer estimates already meet that rule, else continued with the next probes of the
        same sequence (the result is that of a :meth:`traces` alone, for fewer products)."""
        return self._trace_estimator(rtol, max_hvp, distribution, seed).run(rtol, max_hvp)

    def layer_traces(self, **kwargs: Any) -> dict[str, TraceResult]:
        """Every layer's block trace ``tr(H_ll)`` from shared full-network probes (see
        :meth:`traces`)."""
        return self.traces(**kwargs)[1]

    def density(
        self,
        *,
        n_probes: int = 8,
        n_steps: int = 80,
        deflate: int | EigenResult | None = 10,
        distribution: str = "rademacher",
        seed: int = 0,
        reorth: str = "auto",
        probe_chunk: int | None = None,
    ) -> Spectrum:
        """The spectral density by stochastic Lanczos quadrature, probes run in batches.
        ``deflate`` (an int ``k`` or a result of :meth:`eigenvalues` with vectors) removes the
        top eigenpairs first and adds them back exactly, which sharpens the outliers and the
        density's mean. ``reorth`` and ``probe_chunk`` bound the memory (a stored basis only
        for small problems; see :func:`hesslens.linalg.slq`).

        Memory, in copies of the parameters (one product: :mod:`hesslens.curvature.loop`): the
        larger of the deflation (:meth:`eigenvalues` with ``k=deflate``: 1 + 24 copies for
        ``k=10`` on a large operator, plus one product) and the quadrature: the snapshot (1),
        the deflation vectors (``deflate``), three vectors per probe of a group of ``g =
        min(n_probes, 256 MiB / (3 dim itemsize))`` (2 for 10M float32 parameters) and the
        products of the group."""
        budget = self._shared.budget
        own_deflation = isinstance(deflate, int) and not isinstance(deflate, bool)
        if own_deflation:
            k = min(budget.deflation(deflate), max(self.dim - 2, 0))
            deflate = self.eigenvalues(k=k, tol=1e-4, seed=seed) if k > 0 else None
            if deflate is not None and not bool(torch.as_tensor(deflate.converged).all()):
                warnings.warn(
                    f"density(): {int((~torch.as_tensor(deflate.converged)).sum())} of the {k} "
                    "eigenpairs used for deflation did not converge; the outliers of the "
                    "density are approximate (pass deflate=0, or a converged eigenvalues() "
                    "result)", stacklevel=2)
        if probe_chunk is None:
            n_deflate = 0 if deflate is None else int(torch.as_tensor(deflate.values).numel())
            probe_chunk = budget.density_group(n_probes, n_deflate)
        spectrum, _ = slq(self, n_probes=n_probes, n_steps=min(n_steps, self.dim), seed=seed,
                          distribution=distribution, deflate=deflate, reorth=reorth,
                          probe_chunk=probe_chunk, overwrite_deflate=own_deflation)
        return spectrum


def _check_k(k: int, dim: int) -> None:
    check_positive_int(k, "k")
    if k > dim:
        raise HesslensInputError(
            f"k={k} is larger than the operator's dimension {dim}: ask for at most {dim}"
        )
