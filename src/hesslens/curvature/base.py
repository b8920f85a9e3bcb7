"""The base of every curvature operator: a matrix of a model's loss averaged over data, as a
symmetric linear operator over the flat vector of the parameters (or slices) it covers.

A matrix is one small subclass that says what ONE batch contributes:
:meth:`CurvatureOperator.batch_products` multiplies the matrix of one batch's weighted loss with
a few vectors. The base does the rest once for every matrix: the private copy of the model and
its parameter snapshot (:mod:`~hesslens.curvature.functional_model`), the data loop with its
weights, device moves, pass checks, graph cache, reduction over batches and processes and
finiteness check (:mod:`~hesslens.curvature.loop`), the blocks and the flat layout
(:mod:`~hesslens.curvature.layout`), and the estimators (:mod:`~hesslens.curvature.estimators`).
The built-in matrices: :class:`~hesslens.curvature.hessian.Hessian`,
:class:`~hesslens.curvature.gauss_newton.GaussNewton`,
:class:`~hesslens.curvature.fisher.EmpiricalFisher`, and combinations of operators
(:mod:`~hesslens.curvature.combinators`).

Example: a matrix of your own, ``M = 2 H`` (a real one would do something new per batch):

    >>> import torch, hesslens as hl
    >>> from hesslens.curvature import products
    >>> class TwiceHessian(hl.CurvatureOperator):
    ...     def batch_products(self, batch, names, vectors, out=None):
    ...         graph = products.first_order_graph(batch.loss, batch.params, names)
    ...         return [2 * hv for hv in products.hvp_rows(graph.grads, graph.leaves, vectors)]
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    >>> M = TwiceHessian(net, torch.nn.functional.cross_entropy, data)
    >>> H = hl.Hessian(net, torch.nn.functional.cross_entropy, data)
    >>> v = torch.randn(M.dim)
    >>> torch.allclose(M.hvp(v), 2 * H.hvp(v), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from hesslens.curvature.blocks import Blocks, ParamSlice, block_parameters, resolve_blocks
from hesslens.curvature.checkpointing import checkpoint_errors
from hesslens.curvature.data import BatchSource
from hesslens.curvature.estimators import Estimators
from hesslens.curvature.functional_model import BatchNormMode, FunctionalModel
from hesslens.curvature.layers import ROOT_LAYER, owned_parameters, select_layers
from hesslens.curvature.layout import FlatLayout
from hesslens.curvature.lm_head import TOKEN_CHUNK_BYTES
from hesslens.curvature.loop import (
    DataLoop,
    WeightedBatch,
    join_flat,
    split_flat,
)
from hesslens.curvature.loss import BatchLoss, LossFn
from hesslens.curvature.memory import MemoryBudget
from hesslens.curvature.paths import PathChoice
from hesslens.curvature.products import StepScale, named_derivative_errors
from hesslens.curvature.sharded import check_not_fsdp2
from hesslens.errors import HesslensInputError
from hesslens.linalg.lanczos import work_dtype
from hesslens.parallel import resolve_group

Path = Literal["auto", "reverse", "forward", "fd"]
PATHS = ("auto", "reverse", "forward", "fd")


@dataclass
class Shared:
    """What an operator shares with its blocks and the matrices derived from it: the data loop
    (model copy, data, graph cache), the product settings and what was learned about them."""

    loop: DataLoop
    budget: MemoryBudget
    path: str = "auto"
    fd_order: int = 4
    fd_scale: StepScale = field(default_factory=StepScale)
    choices: dict[str, PathChoice] = field(default_factory=dict)

    def choice(self, kind: str) -> PathChoice:
        """The product-path choice of one matrix kind (shared by all its blocks)."""
        return self.choices.setdefault(kind, PathChoice())

    def reload(self, model: nn.Module) -> None:
        """The data loop takes ``model``'s parameters; the finite-difference step is learned
        afresh (the chosen product paths are kept)."""
        self.loop.reload(model)
        self.fd_scale = StepScale()


class CurvatureOperator(Estimators):
    """A curvature matrix of a model's loss averaged over ``data``.

    Parameters
    ----------
    model : nn.Module
        The network. It is never changed: products run on a private copy of its modules and a
        snapshot of its parameters taken now (:meth:`reload_parameters` takes later ones).
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
        How Hessian products are computed (:mod:`hesslens.curvature.hessian`); ``"fd"``:
        finite differences of gradients, for models without second derivatives.
    memory : int, "auto" or None
        The one memory budget the estimators' vectors, the graph cache and the product chunks
        derive from (:mod:`hesslens.curvature.memory`): ``None`` (default) lean where vectors
        are large, ``"auto"`` half of the device's available memory, or bytes.
    reuse_graph, graph_cache_bytes, chunk_size, product_bytes :
        Keep per-batch graphs between products (``None``: while they fit in
        ``graph_cache_bytes``; ``False``: never), and the most vectors (``chunk_size``) and
        estimated bytes (``product_bytes``) of one batched product (both defaults from
        ``memory``): see :class:`hesslens.curvature.loop.DataLoop`.
    fd_order : {2, 4}
        Order of the finite-difference products (``path="fd"``).
    token_chunk_bytes : int or None
        A Hugging Face causal LM's own loss runs its output layer and cross-entropy this many
        bytes of ``(tokens x vocabulary)`` temporaries at a time (default
        :data:`~hesslens.curvature.lm_head.TOKEN_CHUNK_BYTES`), so that no product holds
        ``(batch x tokens x vocabulary)`` tensors; ``None``: the model's own loss, unchunked
        (:mod:`hesslens.curvature.lm_head`).
    num_terms : callable, optional
        ``num_terms(batch) -> int``: the number of loss terms of a batch (its weight).
    distributed, process_group :
        With ``torch.distributed`` initialised (and ``distributed`` not False), ``data`` is this
        rank's shard: the loss-term count is summed over the ranks once, every product is the
        local weighted sum followed by one all-reduce, and every estimator (probes and start
        vectors seeded alike on every rank) returns the same result on every rank.
        ``distributed=False``: rank-local. ``process_group``: the group (default: the world).
    snapshot : bool or None
        Copy the parameters (``True``), or use the model's own (``False``: no second copy of a
        large model; a product after they changed in place, e.g. by an optimizer step, is a
        named error until :meth:`reload_parameters`). ``None`` (default): copy models of up to
        16 MiB of parameters. A ``dtype`` or ``device`` other than the model's always copies.
    """

    #: The kind of per-batch graph every product of this matrix runs through alone: once every
    #: batch's graph of it is cached, the data loop no longer reads the data (``None``:
    #: products need the batches).
    graph_kind: str | None = None

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
        token_chunk_bytes: int | None = TOKEN_CHUNK_BYTES,
        num_terms: Callable[[Any], int] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        snapshot: bool | None = None,
        memory: int | str | None = None,
    ) -> None:
        if path not in PATHS:
            raise HesslensInputError(f"path must be one of {PATHS}, not {path!r}")
        if fd_order not in (2, 4):
            raise HesslensInputError(f"fd_order must be 2 or 4, not {fd_order!r}")
        model = unwrap_model(model)
        check_not_fsdp2(model)  # a named error pointing to ShardedHessian
        group = resolve_group(distributed, process_group)
        fmodel = FunctionalModel(model, dtype=dtype, device=device, batchnorm=batchnorm,
                                 allow_dropout=allow_dropout, snapshot=snapshot)
        loss = BatchLoss(model, loss_fn, num_terms, token_chunk_bytes=token_chunk_bytes)
        source = BatchSource(data, count_terms=loss.terms, group=group)
        width = sum(fmodel.params[n].numel() for n in fmodel.trainable)
        budget = MemoryBudget.of(memory, width * torch.finfo(work_dtype(fmodel.dtype)).bits // 8,
                                 fmodel.device)
        cache = budget.graph_cache_bytes if graph_cache_bytes is None else int(graph_cache_bytes)
        loop = DataLoop(fmodel, loss, source, graph_cache_bytes=0 if reuse_graph is False
                        else cache, chunk_size=chunk_size,
                        product_bytes=budget.product_bytes if product_bytes is None
                        else int(product_bytes), group=group)
        if group is not None and path == "auto":
            # Timing would pick per rank, and the candidates' collectives must match: pin the
            # double-backward path (bitwise-repeatable too).
            path = "reverse"
        blocks = _ordered_blocks(loop, resolve_blocks(fmodel.module, layers, fmodel.trainable),
                                 by_call_order=layers is None or isinstance(layers, str))
        if (budget.chunk_saved_bytes is not None and reuse_graph is None
                and graph_cache_bytes is None and loop.split_rows(budget.chunk_saved_bytes)):
            loop.graph_cache_bytes = 0  # each chunk's graph is rebuilt: none held between
        self._attach(Shared(loop, budget, path=path, fd_order=fd_order), blocks,
                     [ParamSlice(n) for n in fmodel.trainable], label="full")

    def _attach(self, shared: Shared, blocks: Blocks, pieces: list[ParamSlice],
                label: str) -> None:
        """Set this operator up over ``pieces`` of the parameters of ``shared``'s model."""
        model = shared.loop.model
        self._shared = shared
        self._blocks: Blocks = {k: list(v) for k, v in blocks.items()}
        self._layout = FlatLayout(pieces, model.trainable,
                                  {n: p.shape for n, p in model.params.items()}, model.device)
        self.label = label
        self.n_products = 0
        self._reset_estimators(shared.loop.version)

    def _sibling(self, cls: type[CurvatureOperator], blocks: Blocks | None = None,
                 pieces: list[ParamSlice] | None = None,
                 label: str | None = None) -> CurvatureOperator:
        """An operator of matrix ``cls`` on this one's model, data and (by default) blocks."""
        op = cls.__new__(cls)
        op._attach(self._shared, self._blocks if blocks is None else blocks,
                   self._layout.pieces if pieces is None else pieces,
                   self.label if label is None else label)
        return op

    # ------------------------------------------------------------------ the matrix
    def batch_products(self, batch: WeightedBatch, names: list[str], vectors: list[Tensor],
                       out: list[Tensor] | None = None) -> list[Tensor]:
        """The products of ONE batch's matrix with a few vectors: what a matrix implements.

        ``batch`` gives the batch's weighted loss ``batch.loss(params)``, its outputs
        ``batch.outputs(params)``, the loss in the outputs ``batch.loss_of_outputs(z)``, the
        parameter snapshot ``batch.params`` and a graph cache (``batch.graph(kind, build)``);
        ``params`` override the snapshot for the parameters given. ``names`` are the
        parameters to differentiate (this operator's, in model order) and ``vectors`` one
        ``(k, *shape)`` tensor per name; return the ``k`` products in the same form, or add
        them into ``out`` (tensors shaped like ``vectors``) and return it. The base sums them
        over the batches (each weighted by its share of the loss terms) and the processes.
        :mod:`hesslens.curvature.products` has the primitives."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement batch_products(batch, names, vectors)")

    def _products(self, W: Tensor, out: Tensor | None = None) -> Tensor:
        """``M W`` for ``(k, width)`` vectors over this operator's parameters: the data loop
        over :meth:`batch_products`, chunks of vectors at a time (summed into ``out``, a
        ``(k, width)`` tensor of the accumulation dtype, when given)."""
        names = self._layout.names
        vs = split_flat(W, [self._layout.shapes[n] for n in names])
        loop = self._shared.loop
        k = W.shape[0]
        chunk = loop.vectors_per_chunk(names) if k > 1 else 1

        def per_batch(batch: WeightedBatch, out: list[Tensor]) -> None:
            for start in range(0, k, chunk):
                rows = slice(start, start + chunk)
                target = [o[rows] for o in out]
                result = self.batch_products(batch, names, [v[rows] for v in vs], out=target)
                if result is not target:
                    for o, p in zip(target, result):
                        o += p

        return loop.sum(per_batch, vs, out, graph_kind=self.graph_kind)

    # ------------------------------------------------------------------ products
    def matmat(self, V: Tensor) -> Tensor:
        """The products with a ``(k, dim)`` batch of row vectors, in this operator's dtype and
        device (the :mod:`hesslens.linalg` protocol)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[1] != self.dim:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise HesslensInputError(
                f"expected a (k, {self.dim}) batch of vectors, got shape {shape}"
            )
        if V.shape[0] == 0:
            return V.new_zeros(V.shape)
        V = V.to(device=self.device, dtype=self.dtype)
        self.n_products += V.shape[0]
        return self._apply(V)

    def matmat_into(self, V: Tensor, out: Tensor) -> Tensor:
        """:meth:`matmat` written into ``out`` (a ``(k, dim)`` tensor of this operator's dtype
        and device that does not overlap ``V``), and returned: the products are summed there
        directly where they can be, so that no result of their own is held beside it (a
        Lanczos step's product goes straight into its basis).

        Example:
            >>> import torch, hesslens as hl
            >>> H = hl.Hessian(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy,
            ...                (torch.randn(6, 3), torch.randint(0, 2, (6,))))
            >>> V, out = torch.randn(2, H.dim), torch.empty(2, H.dim)
            >>> H.matmat_into(V, out) is out and torch.allclose(out, H.matmat(V))
            True
        """
        if not (isinstance(out, torch.Tensor) and isinstance(V, torch.Tensor)
                and out.shape == V.shape and out.dtype == self.dtype
                and out.device == self.device):
            raise HesslensInputError(
                f"matmat_into needs out of V's shape, dtype {self.dtype} and device "
                f"{self.device}")
        if V.shape[0] == 0:
            return out
        V = V.to(device=self.device, dtype=self.dtype)
        if not (V.dim() == 2 and V.shape[1] == self.dim):
            return out.copy_(self.matmat(V))  # matmat names the problem
        self.n_products += V.shape[0]
        result = self._apply(V, out)
        return result if result is out else out.copy_(result)

    def _apply(self, V: Tensor, out: Tensor | None = None) -> Tensor:
        """``M V`` for ``(k, dim)`` vectors already in place (combinations override it): the
        products in the model's dtype, summed in this operator's; into ``out`` where the sum can
        go there directly (else a result of their own, which the caller copies)."""
        W = self._layout.widen(V).to(self._shared.loop.model.dtype)
        direct = (out is not None and self._layout.identity and out.is_contiguous()
                  and out.dtype == self._shared.loop.accumulate_dtype)
        with named_derivative_errors(), checkpoint_errors():
            return self._layout.narrow(self._products(W, out if direct else None))

    def hvp(self, v: Tensor) -> Tensor:
        """The product with a flat vector ``v`` of length ``dim``, or with each row of a (k, dim)
        batch; the result has ``v``'s shape, dtype and device."""
        if not isinstance(v, torch.Tensor):
            raise HesslensInputError(f"v must be a torch tensor, not {type(v).__name__}")
        if not v.is_floating_point() or v.is_complex():
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

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The mean loss and its flat gradient with respect to this operator's elements."""
        with checkpoint_errors():
            loss, grad = self._shared.loop.loss_and_gradient(self._layout.names)
        return loss, self._layout.narrow(grad.unsqueeze(0))[0]

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
        self._shared.reload(unwrap_model(model))
        return self

    @property
    def version(self) -> int:
        """Counts :meth:`reload_parameters` calls: results formed later from products (an
        eigenvector read after ``eigenvalues(k=1)`` on a large model) check it unchanged."""
        return self._shared.loop.version

    # ------------------------------------------------------------------ structure
    @property
    def layers(self) -> list[str]:
        """Names of the blocks (layers) this operator covers, in forward order."""
        return list(self._blocks)

    @property
    def layer_parameters(self) -> dict[str, list[str]]:
        """Each layer's parameter names (a sliced block names the parameters it slices)."""
        return block_parameters(self._blocks)

    @property
    def layer_pieces(self) -> dict[str, list[ParamSlice]]:
        """Each layer's pieces: whole parameters or slices of them."""
        return {k: list(v) for k, v in self._blocks.items()}

    @property
    def parameter_names(self) -> list[str]:
        """The parameters this operator's products differentiate, in model order."""
        return list(self._layout.names)

    @property
    def dim(self) -> int:
        """Length of the flat vector (the operator is ``dim x dim``)."""
        return self._layout.dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the operator's vectors and sums: the model's, float32 for a half
        precision model (whose products are computed in its own dtype)."""
        return self._shared.loop.accumulate_dtype

    @property
    def product_eps(self) -> float:
        """The relative precision the products are computed in (the model dtype's epsilon):
        the estimators' stopping rules never claim more (:mod:`hesslens.linalg.precision`)."""
        return torch.finfo(self._shared.loop.model.dtype).eps

    @property
    def device(self) -> torch.device:
        return self._shared.loop.model.device

    @property
    def num_samples(self) -> int:
        """How many loss terms the loss averages over (samples, or label tokens)."""
        return self._shared.loop.data.num_terms

    def layer_ranges(self) -> dict[str, slice] | None:
        """Each layer's contiguous range in this operator's flat vector, or ``None`` when some
        layer is not one range (a slice of a fused weight, layers out of order)."""
        return self._layout.ranges(self._blocks)

    def layer_indices(self) -> dict[str, Tensor]:
        """Where each layer's elements lie in this operator's flat vector (int64 indices)."""
        return self._layout.indices(self._blocks)

    def block(self, name: str | Sequence[str]) -> CurvatureOperator:
        """The diagonal block of one layer (or of several, given a list of names): the same
        interface, restricted to those parameters (or slices); its products differentiate only
        with respect to them."""
        if not isinstance(name, str) and not (
                isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name)):
            raise HesslensInputError(
                f"block() takes a layer name or a list of names, not {name!r}; the layers are "
                f"{self.layers[:8]}{' ...' if len(self.layers) > 8 else ''}")
        chosen = select_layers(self._blocks, name)
        blocks = {k: self._blocks[k] for k in chosen}
        pieces = [p for k in chosen for p in blocks[k]]
        label = chosen[0] if len(chosen) == 1 else "+".join(chosen)
        return self._restricted(blocks, pieces, label)

    def _restricted(self, blocks: Blocks, pieces: list[ParamSlice],
                    label: str) -> CurvatureOperator:
        """This matrix restricted to ``pieces`` (combinations restrict their operands)."""
        return self._sibling(type(self), blocks, pieces, label)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.label!r}, dim={self.dim}, layers={len(self.layers)},"
                f" samples={self.num_samples}, dtype={self.dtype}, device={self.device})")


def _ordered_blocks(loop: DataLoop, blocks: Blocks, *, by_call_order: bool) -> Blocks:
    """Check the first batch (on every rank: all raise if one fails, none hangs) and, for the
    presets, order the blocks by when their modules first run."""
    module = loop.model.module
    owner = {p: m for m, ps in owned_parameters(module, lambda _n, _p: True).items()
             for p in ps}
    wanted = {owner[p.param] for b in blocks.values() for p in b
              if owner.get(p.param, ROOT_LAYER) != ROOT_LAYER}
    try:
        order = loop.first_batch_probe(wanted)
    except Exception as err:
        loop.agree(err)
        raise
    loop.agree(None)
    if not by_call_order:
        return blocks

    def rank(name: str) -> int:
        module_name = owner.get(blocks[name][0].param, ROOT_LAYER)
        return -1 if module_name == ROOT_LAYER else order.get(module_name, len(order))

    return {name: blocks[name] for name in sorted(blocks, key=rank)}


def unwrap_model(model: object) -> object:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (products run
    on a private functional copy, so the wrapper's hooks have no part in them)."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


__all__ = ["PATHS", "CurvatureOperator", "Path", "Shared", "WeightedBatch", "join_flat",
           "unwrap_model"]
