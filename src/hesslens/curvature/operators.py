"""Curvature operators of a model's loss: the Hessian, the generalised Gauss-Newton matrix, the
residual between them, and each one's per-layer diagonal blocks.

Every operator is a symmetric linear operator over the flat vector of the trainable parameters it
covers, in ``model.named_parameters()`` order. It implements the ``hesslens.linalg`` protocol
(``dim``, ``dtype``, ``device``, ``matmat``), so any algorithm there runs on it, and it wraps the
common ones as methods: ``eigenvalues``, ``trace``, ``layer_traces``, ``density``.

Example:
    >>> import torch, hesslens as hl
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> H = hl.Hessian(model, torch.nn.functional.cross_entropy, data)
    >>> H.layers, H.dim
    (['0', '2'], 67)
    >>> H.hvp(torch.ones(H.dim)).shape
    torch.Size([67])
    >>> top = H.eigenvalues(k=2)
    >>> bool(top.converged.all()), bool(top.values[0] >= top.values[1])
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hesslens.curvature.blocks import (
    Blocks,
    ParamSlice,
    block_flat_indices,
    block_parameters,
    resolve_blocks,
)
from hesslens.curvature.data import BatchSource
from hesslens.curvature.engine import Path, ProductEngine
from hesslens.curvature.functional_model import BatchNormMode, FunctionalModel
from hesslens.curvature.layers import ROOT_LAYER, owned_parameters, select_layers
from hesslens.curvature.loss import BatchLoss, LossFn
from hesslens.curvature.sharded import check_not_fsdp2
from hesslens.errors import HesslensInputError

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator
import itertools

from hesslens.linalg import (
    EigenResult,
    Spectrum,
    TraceResult,
    TraceState,
    block_traces,
    eigsh,
    hutchinson,
    hutchpp,
    slq,
)


class CurvatureOperator:
    """A curvature matrix of a model's loss averaged over ``data``.

    Parameters
    ----------
    model : nn.Module
        The network. It is never changed: products run on a private copy of it and a snapshot
        of its parameters taken now.
    loss_fn : callable or None
        ``loss_fn(outputs, targets)`` for ``(inputs, targets)`` batches,
        ``loss_fn(outputs, batch)`` for mapping batches, returning the batch's mean loss (a
        scalar tensor); ``None`` takes the model's own loss (``output.loss``, or a scalar
        output), the batch passed whole (``model(**batch)`` for a mapping).
    data : a batch or an iterable of batches
        ``(inputs, targets)`` pairs, mappings of tensors (Hugging Face style) or pytrees of
        tensors; over several batches the operator is that of the mean loss over all loss
        terms (see :mod:`hesslens.curvature.loss` for how terms are counted).
    layers : None, "modules", "transformer", "transformer_heads" or a mapping
        How parameters are grouped into blocks (:func:`hesslens.curvature.blocks.resolve_blocks`):
        one block per module (default), the transformer preset (q, k, v, o, mlp_in, mlp_out
        per layer, slices of a fused QKV weight), or your own {name: parameter names, glob
        patterns or ParamSlices}.
    dtype, device : optional
        Analyse a copy of the model in this dtype (``torch.float64`` for reference precision)
        and on this device.
    batchnorm : {"eval", "batch"}
        BatchNorm uses its running statistics (default) or each batch's own statistics; running
        statistics are never updated either way.
    allow_dropout : bool
        Random products with dropout on (default: dropout off in the private copy).
    path : {"auto", "reverse", "forward", "fd"}
        How Hessian products are computed (:mod:`hesslens.curvature.engine`); ``"fd"``:
        finite differences of gradients, for models without second derivatives.
    reuse_graph, graph_cache_bytes, chunk_size, product_bytes, fd_order :
        Product settings: see :class:`hesslens.curvature.engine.ProductEngine`.
    num_terms : callable, optional
        ``num_terms(batch) -> int``: the number of loss terms of a batch (its weight).
    distributed, process_group :
        With ``torch.distributed`` initialised (and ``distributed`` not False), ``data`` is this
        rank's shard: the loss-term count is summed over the ranks once, every product is the
        local weighted sum followed by one all-reduce, and every estimator (probes and start
        vectors seeded alike on every rank) returns the same result on every rank.
        ``distributed=False``: rank-local. ``process_group``: the group (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: object,
        *,
        layers: str | Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        batchnorm: BatchNormMode = "eval",
        allow_dropout: bool = False,
        path: Path = "auto",
        reuse_graph: bool | None = None,
        graph_cache_bytes: int | None = None,
        chunk_size: int = 32,
        product_bytes: int | None = None,
        fd_order: int = 4,
        num_terms: Callable[[Any], int] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        model = unwrap_model(model)
        check_not_fsdp2(model)  # a named error pointing to ShardedHessian
        group = _process_group(distributed, process_group)
        fmodel = FunctionalModel(model, dtype=dtype, device=device, batchnorm=batchnorm,
                                 allow_dropout=allow_dropout)
        loss = BatchLoss(model, loss_fn, num_terms)
        source = BatchSource(data, count_terms=loss.terms, group=group)
        engine = ProductEngine(fmodel, loss, source, path=path, reuse_graph=reuse_graph,
                               graph_cache_bytes=graph_cache_bytes, chunk_size=chunk_size,
                               product_bytes=product_bytes, fd_order=fd_order, group=group)
        blocks = resolve_blocks(fmodel.module, layers, fmodel.trainable)
        owner = {p: m for m, ps in owned_parameters(fmodel.module, lambda _n, _p: True).items()
                 for p in ps}
        wanted = {owner[p.param] for b in blocks.values() for p in b
                  if owner.get(p.param, ROOT_LAYER) != ROOT_LAYER}
        try:  # every rank checks its own first batch: all raise if one fails, none hangs
            order = engine.first_batch_probe(wanted)
        except Exception as err:
            engine.agree(err)
            raise
        engine.agree(None)
        if layers is None or isinstance(layers, str):
            def rank(name: str) -> int:
                module = owner.get(blocks[name][0].param, ROOT_LAYER)
                return -1 if module == ROOT_LAYER else order.get(module, len(order))

            blocks = {name: blocks[name] for name in sorted(blocks, key=rank)}
        self._setup(engine, blocks, [ParamSlice(n) for n in fmodel.trainable], label="full")

    def _setup(self, engine: ProductEngine, blocks: Blocks, pieces: list[ParamSlice],
               label: str) -> None:
        self._engine = engine
        self._layer_map: Blocks = {k: list(v) for k, v in blocks.items()}
        self._pieces = pieces
        params = engine.model.params
        wanted = {p.param for p in pieces}
        self._names = [n for n in engine.model.trainable if n in wanted]
        self._shapes = {n: params[n].shape for n in self._names}
        self._width = sum(math.prod(s) for s in self._shapes.values())
        canonical = [p.canonical(self._shapes[p.param]) for p in pieces]
        # Whole parameters in model order: the operator's vector is the parameters' own, and no
        # index tensor (8 bytes an element) is ever built.
        self._identity = (all(p.dim is None for p in canonical)
                          and [p.param for p in canonical] == self._names)
        self._dim = sum(p.numel(self._shapes[p.param]) for p in canonical)
        self._index = None if self._identity else block_flat_indices(
            pieces, self._shapes).to(engine.model.device)
        starts = np.cumsum([0] + [p.numel(self._shapes[p.param]) for p in canonical]).tolist()
        self._piece_ranges = {p: (a, b) for p, a, b in zip(canonical, starts, starts[1:])}
        self.label = label
        self.n_products = 0
        self._trace_cache: dict[tuple, tuple[TraceResult, dict[str, TraceResult]]] = {}
        self._trace_states: dict[tuple, TraceState] = {}  # where trace()'s probes stopped
        self._version = engine.version

    def _derived(self, cls: type[CurvatureOperator], blocks: Blocks,
                 pieces: list[ParamSlice], label: str) -> CurvatureOperator:
        op = cls.__new__(cls)
        op._setup(self._engine, blocks, pieces, label)
        return op

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> list[str]:
        """Names of the blocks (layers) this operator covers, in forward order."""
        return list(self._layer_map)

    @property
    def layer_parameters(self) -> dict[str, list[str]]:
        """Each layer's parameter names (a sliced block names the parameters it slices)."""
        return block_parameters(self._layer_map)

    @property
    def layer_pieces(self) -> dict[str, list[ParamSlice]]:
        """Each layer's pieces: whole parameters or slices of them."""
        return {k: list(v) for k, v in self._layer_map.items()}

    @property
    def parameter_names(self) -> list[str]:
        """The parameters this operator's products differentiate, in model order."""
        return list(self._names)

    @property
    def dim(self) -> int:
        """Length of the flat vector (the operator is ``dim x dim``)."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        return self._engine.model.dtype

    @property
    def device(self) -> torch.device:
        return self._engine.model.device

    @property
    def num_samples(self) -> int:
        """How many loss terms the loss averages over (samples, or label tokens)."""
        return self._engine.data.num_terms

    @property
    def engine_choice(self) -> dict[str, str]:
        """The product path chosen for single and batched products (after the first products)."""
        return dict(self._engine.choice)

    def layer_ranges(self) -> dict[str, slice] | None:
        """Each layer's contiguous range in this operator's flat vector, or ``None`` when some
        layer is not one range (a slice of a fused weight, layers out of order)."""
        out = {}
        for layer, pieces in self._layer_map.items():
            spans = [self._piece_ranges.get(p.canonical(self._shapes[p.param]))
                     if p.param in self._shapes else None for p in pieces]
            if any(span is None for span in spans):
                return None
            if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
                return None
            out[layer] = slice(spans[0][0], spans[-1][1])
        return out

    def layer_indices(self) -> dict[str, torch.Tensor]:
        """Where each layer's elements lie in this operator's flat vector (int64 indices)."""
        position = torch.full((self._width,), -1, dtype=torch.int64)
        if self._index is None:
            position = torch.arange(self._width)
        else:
            position[self._index.cpu()] = torch.arange(self.dim)
        out = {}
        for layer, pieces in self._layer_map.items():
            idx = position[block_flat_indices(pieces, self._shapes)]
            out[layer] = idx[idx >= 0]
        return out

    def block(self, name: str | Sequence[str]) -> CurvatureOperator:
        """The diagonal block of one layer (or of several, given a list of names): the same
        interface, restricted to those parameters (or slices); its products differentiate only
        with respect to them."""
        if not isinstance(name, str) and not (
                isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name)):
            raise HesslensInputError(
                f"block() takes a layer name or a list of names, not {name!r}; the layers are "
                f"{self.layers[:8]}{' ...' if len(self.layers) > 8 else ''}")
        chosen = select_layers(self._layer_map, name)
        blocks = {k: self._layer_map[k] for k in chosen}
        pieces = [p for k in chosen for p in blocks[k]]
        label = chosen[0] if len(chosen) == 1 else "+".join(chosen)
        return self._derived(type(self), blocks, pieces, label)

    def gauss_newton(self) -> GaussNewton:
        """The Gauss-Newton part ``G`` of this operator's Hessian, on the same parameters."""
        return self._derived(GaussNewton, self._layer_map, self._pieces, self.label)

    def residual(self) -> GaussNewtonResidual:
        """The residual ``Hess - G``, on the same parameters."""
        return self._derived(GaussNewtonResidual, self._layer_map, self._pieces, self.label)

    def hessian(self) -> Hessian:
        """The full Hessian on the same parameters."""
        return self._derived(Hessian, self._layer_map, self._pieces, self.label)

    # ------------------------------------------------------------------ products
    def _products(self, V: torch.Tensor) -> torch.Tensor:
        """The engine's products over ``self._names`` for a (k, width) batch."""
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Products with a (k, dim) batch of row vectors: row i of the result is ``A V[i]``."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.dim:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise HesslensInputError(
                f"expected a (k, {self.dim}) batch of vectors, got shape {shape}"
            )
        if V.shape[0] == 0:
            return V.new_zeros(V.shape)
        V = V.to(device=self.device, dtype=self.dtype)
        self.n_products += V.shape[0]
        if self._identity:
            return self._products(V)
        W = V.new_zeros(V.shape[0], self._width)
        W[:, self._index] = V
        return self._products(W)[:, self._index]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """The product with a flat vector ``v`` of length ``dim``, or with each row of a (k, dim)
        batch; the result has ``v``'s shape, dtype and device."""
        if not isinstance(v, torch.Tensor):
            raise HesslensInputError(f"v must be a torch tensor, not {type(v).__name__}")
        if not (v.is_floating_point() or v.is_complex()) or v.is_complex():
            raise HesslensInputError(
                f"v must be a real floating-point tensor, not {v.dtype}: its product would be "
                "rounded to that dtype (use v.double() or v.float())")
        if v.dim() == 1:
            return self.matmat(v.unsqueeze(0))[0].to(device=v.device, dtype=v.dtype)
        if v.dim() == 2:
            return self.matmat(v).to(device=v.device, dtype=v.dtype)
        raise HesslensInputError(
            f"v must be a flat vector ({self.dim},) or a batch (k, {self.dim}), got shape "
            f"{tuple(v.shape)}"
        )

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
        from scipy.sparse.linalg import LinearOperator

        def matmat(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X, dtype=np.float64)
            if X.ndim == 1:
                X = X[:, None]
            V = torch.as_tensor(X.T.copy())
            return self.matmat(V).to("cpu", torch.float64).numpy().T

        return LinearOperator((self.dim, self.dim), matvec=matmat, matmat=matmat,
                              rmatvec=matmat, rmatmat=matmat, dtype=np.float64)

    def reload_parameters(self, model: nn.Module) -> CurvatureOperator:
        """Take the current parameters of ``model`` (the network this operator was built on,
        later in training) without rebuilding anything: the private copy, the data and its
        checks, the blocks and the chosen product path are kept. Every operator derived from
        this one (blocks, Gauss-Newton, residual) shares the snapshot and moves with it.
        Returns the operator.

        Example:
            >>> import torch, hesslens as hl
            >>> net = torch.nn.Linear(2, 1)
            >>> H = hl.Hessian(net, torch.nn.functional.mse_loss,
            ...                (torch.randn(4, 2), torch.randn(4, 1)))
            >>> with torch.no_grad():
            ...     _ = net.weight.mul_(2.0)
            >>> H.reload_parameters(net).dim
            3
        """
        self._engine.reload(unwrap_model(model))
        return self

    def _fresh_caches(self) -> None:
        """Drop trace results computed before the engine's last reload."""
        if self._version != self._engine.version:
            self._trace_cache.clear()
            self._trace_states.clear()
            self._version = self._engine.version

    def loss_and_gradient(self) -> tuple[float, torch.Tensor]:
        """The mean loss and its flat gradient with respect to this operator's elements."""
        loss, grad = self._engine.loss_and_gradient(self._names)
        return loss, grad if self._identity else grad[self._index]

    # ------------------------------------------------------------------ estimators
    def eigenvalues(
        self,
        k: int = 5,
        *,
        which: str = "LA",
        tol: float = 1e-6,
        max_steps: int | None = None,
        seed: int = 0,
        return_vectors: bool = True,
        ncv: int | None = None,
        basis_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
    ) -> EigenResult:
        """The top-``k`` eigenvalues (``which="LA"``; also ``"SA"``, ``"LM"``) by thick-restarted
        Lanczos with full reorthogonalisation in a basis of at most ``ncv`` vectors (in
        ``basis_dtype`` on ``basis_device``), stopped on the a-posteriori error bound of each
        Ritz value: see :func:`hesslens.linalg.eigsh`.

        Memory, in copies of the parameters (``dim * itemsize``; what one product takes:
        :mod:`hesslens.curvature.engine`): the snapshot (1), the basis and its step temporaries
        (``ncv + 3``; the ``k`` Ritz vectors are formed in place in the basis, which is then
        freed, ``k`` more for another ``basis_dtype`` or ``basis_device``; the default ``ncv``
        of a large operator is ``min(max(2k + 8, 20), 31 - k)``, at least ``k + 2``) and one
        product; top-5 of a 10M-parameter network: 24 + a product."""
        _check_k(k, self.dim)
        return eigsh(self, k=k, which=which, tol=tol, max_steps=max_steps, seed=seed,
                     return_vectors=return_vectors, ncv=ncv, basis_dtype=basis_dtype,
                     basis_device=basis_device)

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
        :mod:`hesslens.curvature.engine`): the snapshot (1), the sketch basis (16), a batch of ``b``
        probes and its products (``2 b``, ``b = min(16, 256 MiB / (2 dim itemsize))``: 3 for 10M
        float32 parameters) and the products of that batch; about 23 + a product at 10M."""
        self._fresh_caches()
        if method == "hutch++":
            key = (rtol, n_hvp or max_hvp, distribution, seed)
            if ("blocks", *key) in self._trace_cache:  # traces() ran: its full is as good
                return self._trace_cache[("blocks", *key)][0]
            if ("full", *key) not in self._trace_cache:
                # the layers' shares come from the same probes, and where the probes stopped
                # is kept: a later traces() continues them
                state = self._trace_states.setdefault(key, TraceState())
                self._trace_cache[("full", *key)] = self._block_traces(
                    *key, block_floor=_NO_BLOCK_RULE, state=state)
            return self._trace_cache[("full", *key)][0]
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
        self._fresh_caches()
        key = (rtol, max_hvp, distribution, seed)
        if ("blocks", *key) in self._trace_cache:
            return self._trace_cache[("blocks", *key)]
        earlier = self._trace_cache.get(("full", *key))
        if earlier is not None and _blocks_converged(earlier, rtol):
            self._trace_cache[("blocks", *key)] = earlier
            return earlier
        result = self._block_traces(*key, state=self._trace_states.pop(key, None))
        self._trace_cache[("blocks", *key)] = result
        return result

    def _block_traces(self, rtol: float, max_hvp: int, distribution: str, seed: int,
                      block_floor: float = 0.01, state: TraceState | None = None
                      ) -> tuple[TraceResult, dict[str, TraceResult]]:
        ranges = self.layer_ranges()
        if ranges is not None:  # layers are ranges of the vector already: no permutation
            return block_traces(self, ranges, rtol=rtol, max_hvp=max_hvp,
                                distribution=distribution, seed=seed, block_floor=block_floor,
                                state=state)
        indices = self.layer_indices()
        perm = torch.cat([*indices.values(), torch.zeros(0, dtype=torch.int64)])
        if len(perm) < self.dim:
            rest = torch.ones(self.dim, dtype=torch.bool)
            rest[perm] = False
            perm = torch.cat([perm, torch.nonzero(rest).flatten()])
        view = _Permuted(self, perm)
        ranges, start = {}, 0
        for layer, idx in indices.items():
            ranges[layer] = slice(start, start + len(idx))
            start += len(idx)
        return block_traces(view, ranges, rtol=rtol, max_hvp=max_hvp,
                            distribution=distribution, seed=seed, block_floor=block_floor,
                            state=state)

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

        Memory, in copies of the parameters (one product: :mod:`hesslens.curvature.engine`): the
        larger of the deflation (:meth:`eigenvalues` with ``k=deflate``: 1 + 24 copies for
        ``k=10`` on a large operator, plus one product) and the quadrature: the snapshot (1),
        the deflation vectors (``deflate``), three vectors per probe of a group of ``g =
        min(n_probes, 256 MiB / (3 dim itemsize))`` (2 for 10M float32 parameters) and the
        products of the group."""
        own_deflation = isinstance(deflate, int) and not isinstance(deflate, bool)
        if own_deflation:
            k = min(deflate, max(self.dim - 2, 0))
            deflate = self.eigenvalues(k=k, tol=1e-4, seed=seed) if k > 0 else None
            if deflate is not None and not bool(torch.as_tensor(deflate.converged).all()):
                warnings.warn(
                    f"density(): {int((~torch.as_tensor(deflate.converged)).sum())} of the {k} "
                    "eigenpairs used for deflation did not converge; the outliers of the "
                    "density are approximate (pass deflate=0, or a converged eigenvalues() "
                    "result)", stacklevel=2)
        spectrum, _ = slq(self, n_probes=n_probes, n_steps=min(n_steps, self.dim), seed=seed,
                          distribution=distribution, deflate=deflate, reorth=reorth,
                          probe_chunk=probe_chunk, overwrite_deflate=own_deflation)
        return spectrum

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.label!r}, dim={self.dim}, layers={len(self.layers)},"
                f" samples={self.num_samples}, dtype={self.dtype}, device={self.device})")


class Hessian(CurvatureOperator):
    """The Hessian of the mean loss with respect to the trainable parameters."""

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        return self._engine.hessian_products(self._names, V)


class GaussNewton(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = J^T (d2 loss / d outputs2) J``."""

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        return self._engine.gauss_newton_products(self._names, V)


class GaussNewtonResidual(CurvatureOperator):
    """The residual ``Hess - G`` of the Gauss-Newton split (each product costs a Hessian product
    and a Gauss-Newton product)."""

    def _products(self, V: torch.Tensor) -> torch.Tensor:
        engine = self._engine
        return engine.hessian_products(self._names, V) - engine.gauss_newton_products(
            self._names, V)


class _Permuted:
    """``P A P^T`` for a coordinate permutation: makes layer blocks contiguous."""

    def __init__(self, op: CurvatureOperator, perm: torch.Tensor) -> None:
        self.op, self.perm = op, perm.to(op.device)
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = torch.arange(len(perm), device=op.device)
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        V = V.to(device=self.device, dtype=self.dtype)
        return self.op.matmat(V[:, self.inverse])[:, self.perm]


def _check_k(k: int, dim: int) -> None:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise HesslensInputError(f"k must be a positive integer, got {k!r}")
    if k > dim:
        raise HesslensInputError(
            f"k={k} is larger than the operator's dimension {dim}: ask for at most {dim}"
        )


def _process_group(distributed: bool | None, group: Any) -> Any:
    """The process group products are summed over, or None for a rank-local operator."""
    if distributed is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise HesslensInputError(
                "distributed=True but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (torchrun does the environment) first")
        return None
    return group if group is not None else dist.group.WORLD


# block_traces' per-block stopping rule switched off (the full trace alone decides).
_NO_BLOCK_RULE = 1e300


def _blocks_converged(result: tuple[TraceResult, dict[str, TraceResult]], rtol: float,
                      floor: float = 0.01) -> bool:
    """Whether every layer estimate of ``result`` meets block_traces' per-block rule."""
    full, layers = result
    return all(r.stderr <= rtol * max(abs(r.value), floor * abs(full.value))
               for r in layers.values())


def unwrap_model(model: object) -> object:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (products run
    on a private functional copy, so the wrapper's hooks have no part in them)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
