"""The one data loop of the curvature operators: every product, gradient and check walks the
data here.

:class:`DataLoop` owns what every matrix shares: moving each batch to the model's device and
dtype, its weight (its share of the loss terms), the check that the data is the same on every
pass, each batch's loss check on first use, the cache of per-batch graphs (bounded in bytes:
batches whose graphs do not fit are rebuilt on every pass), and the reduction step that sums the
batches' products in one result and, under ``torch.distributed``, over the ranks (one all-reduce
per call, with every rank's failure flag, :mod:`hesslens.parallel`), then checks it finite. A
matrix only says what one batch contributes (:class:`WeightedBatch` gives it the batch's loss,
outputs and cached graphs).

Example:
    >>> import torch
    >>> from hesslens.curvature.data import BatchSource
    >>> from hesslens.curvature.functional_model import FunctionalModel
    >>> from hesslens.curvature.loss import BatchLoss
    >>> net = torch.nn.Linear(3, 1)
    >>> loop = DataLoop(FunctionalModel(net), BatchLoss(net, torch.nn.functional.mse_loss),
    ...                 BatchSource((torch.randn(8, 3), torch.randn(8, 1))))
    >>> loss, grad = loop.loss_and_gradient(["weight", "bias"])
    >>> grad.shape
    torch.Size([4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.curvature import products
from hesslens.curvature.data import (
    Batch,
    BatchSource,
    batch_device,
    leading_size,
    move_batch,
    take_rows,
)
from hesslens.curvature.functional_model import FunctionalModel
from hesslens.curvature.lm_head import ChunkedLMLoss
from hesslens.curvature.loss import BatchLoss, check_loss
from hesslens.errors import HesslensInputError, NonFiniteCurvatureError
from hesslens.linalg.lanczos import work_dtype
from hesslens.parallel import STATUS_SLOTS, all_reduce_checked

#: Default bound on the bytes of cached per-batch graphs (per operator family).
GRAPH_CACHE_BYTES = 4 * 2**30

#: Default bound on the estimated temporaries of one chunk of vectors pushed through a batched
#: product: it sets the chunk of a network with 10M float32 parameters to 2 vectors.
PRODUCT_BYTES = 2**28

PerBatch = Callable[["WeightedBatch", list[Tensor]], object]


class WeightedBatch:
    """One batch as a product sees it: its index, its weight (its share of the loss terms),
    the batch on the model's device, and the functions of the parameters a product
    differentiates. ``params`` overrides the model's snapshot for the parameters given."""

    def __init__(self, loop: DataLoop, index: int, data: Batch | None, weight: float) -> None:
        self._loop = loop
        self.index = index
        self.data = data
        self.weight = weight

    @property
    def params(self) -> dict[str, Tensor]:
        """The snapshot of every parameter (detached)."""
        return self._loop.model.params

    @property
    def model(self) -> FunctionalModel:
        """The private copy of the network the products run on."""
        return self._loop.model

    @property
    def trainable(self) -> list[str]:
        """Every trainable parameter's name, in model order (graphs built over all of them are
        shared by every block)."""
        return self._loop.model.trainable

    @property
    def randomness(self) -> str:
        """``vmap``'s randomness for this model: ``"different"`` where dropout is on (each
        vector its own mask, as a loop would give), else ``"error"``."""
        return "different" if self._loop.model.random else "error"

    def loss(self, params: dict[str, Tensor]) -> Tensor:
        """The weighted loss ``w_b L_b``; checked a finite scalar the first time each batch is
        evaluated outside a transform."""
        loop = self._loop
        value = loop.loss.batch_loss(loop.model, params, self.data)
        if self.index not in loop.checked and not _is_traced(value):
            check_loss(value)
            loop.checked.add(self.index)
        return value * self.weight

    def outputs(self, params: dict[str, Tensor]) -> Tensor:
        """The network's output tensor ``z`` (``.logits`` of a ModelOutput)."""
        loop = self._loop
        return loop.loss.output_tensor(loop.loss.call(loop.model.bind(params), self.data))

    @property
    def lm_head(self) -> ChunkedLMLoss | None:
        """The chunked output layer this batch's loss runs through
        (:mod:`~hesslens.curvature.lm_head`), or ``None`` for the model's own loss."""
        return self._loop.loss.chunked(self.data)

    def loss_of_outputs(self, z: Tensor) -> Tensor:
        """The weighted loss as a function of the output tensor ``z``."""
        return self._loop.loss.loss_of_outputs(z, self.data) * self.weight

    def check(self) -> None:
        """Check the batch's loss once (for products that only evaluate it inside a transform,
        where its value cannot be read)."""
        if self.index not in self._loop.checked:
            with torch.no_grad():
                self.loss({})

    def graph(self, kind: str, build: Callable[[WeightedBatch], Any]) -> Any:
        """This batch's graph of ``kind`` (anything with ``nbytes``): cached, or built by
        ``build(self)`` and cached while the cache has room."""
        return self._loop.graph(self, kind, build)


class DataLoop:
    """The data loop shared by an operator, its blocks and the matrices derived from it.

    Parameters
    ----------
    model : FunctionalModel
        The frozen copy of the network.
    loss : BatchLoss
        How a batch becomes a loss (and its outputs, and its number of terms).
    data : BatchSource
        The batches and their weights.
    graph_cache_bytes : int
        The most bytes of saved activations the graph cache holds (0: none).
    chunk_size, product_bytes : int
        The most vectors pushed through one batched product, lowered until one chunk's
        estimated temporaries fit in ``product_bytes`` (:meth:`vectors_per_chunk`).
    group : torch.distributed process group, optional
        Sum over this group's ranks (each holding a shard of the data) in the reduction step.
    """

    def __init__(self, model: FunctionalModel, loss: BatchLoss, data: BatchSource, *,
                 graph_cache_bytes: int = GRAPH_CACHE_BYTES, chunk_size: int = 32,
                 product_bytes: int = PRODUCT_BYTES, group: Any = None) -> None:
        self.model = model
        self.loss = loss
        self.data = data
        self.group = group
        self.graph_cache_bytes = int(graph_cache_bytes)
        self.chunk_size = max(1, int(chunk_size))
        self.product_bytes = int(product_bytes)
        self.checked: set[int] = set()
        # products are summed in at least float32: a half-precision model's products are
        # computed in its dtype and added up in float32
        self.accumulate_dtype = work_dtype(model.dtype)
        self.activation_bytes: int | None = None  # the most a batch's graph saved
        self.version = 0  # counts reload()s: what operators cached before one is stale
        self.rows_per_chunk: int | None = None  # batches run in chunks of rows (split_rows)
        self._unit_weights: list[float] | None = None  # every chunk's weight, after a pass
        self._graphs: dict[str, list[Any]] = {}
        self._cache_used = 0

    # ----------------------------------------------------------------- batches
    def batches(self) -> Iterator[WeightedBatch]:
        """Every batch on the model's device, with its weight, in chunks of
        ``rows_per_chunk`` rows where set (:meth:`split_rows`): one pass (after which the
        copy's modules hold the snapshot again)."""
        self.model.check_unchanged()
        weights: list[float] = []
        try:
            for batch, weight in self.data:
                if batch_device(batch) != self.model.device and not self.model.device_requested:
                    raise HesslensInputError(
                        f"the inputs are on {batch_device(batch)} but the model is on "
                        f"{self.model.device}: move the data, or pass device= to the operator"
                    )
                for part, part_weight in self._chunks(batch, weight):
                    yield WeightedBatch(self, len(weights), move_batch(
                        part, self.model.device, self.model.dtype), part_weight)
                    weights.append(part_weight)
            self._unit_weights = weights
        finally:
            self.model.release()

    def _chunks(self, batch: Batch, weight: float) -> Iterator[tuple[Batch, float]]:
        """``batch`` whole, or in chunks of ``rows_per_chunk`` rows, each weighing its share
        of the batch's loss terms (chunks without any are skipped)."""
        rows = leading_size(batch)
        if self.rows_per_chunk is None or rows <= self.rows_per_chunk:
            yield batch, weight
            return
        terms = self.loss.terms(batch)
        for start in range(0, rows, self.rows_per_chunk):
            part = take_rows(batch, slice(start, start + self.rows_per_chunk))
            part_terms = self.loss.terms(part)
            if part_terms > 0:
                yield part, weight * part_terms / terms

    def _pass(self, graph_kind: str | None) -> Iterator[WeightedBatch]:
        """One pass; without touching the data when every batch's graph of ``graph_kind`` is
        cached."""
        if graph_kind is not None and self.graphs_complete(graph_kind):
            self.model.check_unchanged()
            try:
                weights = (self.data.weights if self.rows_per_chunk is None
                           else self._unit_weights or ())
                for i, weight in enumerate(weights):
                    yield WeightedBatch(self, i, None, weight)
            finally:
                self.model.release()
            return
        yield from self.batches()

    def split_rows(self, max_saved_bytes: int) -> int | None:
        """Run every batch in chunks of rows whose forward pass saves at most about
        ``max_saved_bytes`` for backward (measured on the first batch), so that a product
        holds one chunk's graph, not a whole batch's: where a batch saves more than twice
        that (below, keeping the batch whole and its graph costs less time), and its loss
        is exactly the term-weighted mean of its chunks' losses (checked on the first batch:
        no batch statistics, no dropout, no interaction between samples). Returns the rows
        per chunk, or ``None`` (batches kept whole)."""
        if self.model.batchnorm == "batch" or getattr(self.model, "random", False):
            return None
        saved = self._measure_activations()
        batch = next(self.batches()).data
        rows = leading_size(batch)
        per_row = saved / max(rows, 1)
        chunk = max(1, int(max_saved_bytes // max(per_row, 1)))
        if saved <= 2 * max_saved_bytes or chunk >= rows or not self._chunks_add_up(batch,
                                                                                   chunk):
            return None
        self.rows_per_chunk = chunk
        self.activation_bytes = int(per_row * chunk)
        self._unit_weights = None
        return chunk

    def _chunks_add_up(self, batch: Batch, chunk: int) -> bool:
        """Whether ``batch``'s loss is the term-weighted mean of its chunks' losses (to
        rounding)."""
        try:
            whole = float(self._plain_loss(batch))
            terms = self.loss.terms(batch)
            parts = [(self.loss.terms(p), p) for p in (
                take_rows(batch, slice(i, i + chunk))
                for i in range(0, leading_size(batch), chunk))]
            mean = sum(n * float(self._plain_loss(p)) for n, p in parts if n > 0) / terms
        except Exception:  # a model or loss that cannot take part of a batch
            return False
        finally:
            self.model.release()
        tol = 100 * torch.finfo(self.model.dtype).eps * max(abs(whole), abs(mean), 1e-6)
        return math.isfinite(whole) and abs(whole - mean) <= tol

    # ----------------------------------------------------------------- graph cache
    def graph(self, batch: WeightedBatch, kind: str, build: Callable[[WeightedBatch], Any]
              ) -> Any:
        """``batch``'s graph of ``kind``: cached ones first, else built and cached while the
        cache (one budget for all kinds, a prefix of the batches) has room."""
        cache = self._graphs.setdefault(kind, [])
        if batch.index < len(cache):
            graph = cache[batch.index]
            leaves = getattr(graph, "leaves", None)
            if isinstance(leaves, dict):
                # a checkpointed module reruns during backward: with the graph's own leaves
                self.model.hold({**self.model.params, **leaves})
            return graph
        graph = build(batch)
        self.activation_bytes = max(self.activation_bytes or 0, graph.nbytes)
        if batch.index == len(cache) and (
                self._cache_used + graph.nbytes <= self.graph_cache_bytes):
            cache.append(graph)
            self._cache_used += graph.nbytes
        return graph

    def graphs_complete(self, kind: str) -> bool:
        """Whether every batch's graph of ``kind`` is cached."""
        units = len(self.data) if self.rows_per_chunk is None else (
            -1 if self._unit_weights is None else len(self._unit_weights))
        return len(self._graphs.get(kind, ())) == units

    def build_graphs(self, kind: str, build: Callable[[WeightedBatch], Any]) -> None:
        """Build (and cache, as room allows) every batch's graph of ``kind`` now."""
        if self.graph_cache_bytes > 0 and not self.graphs_complete(kind):
            for batch in self.batches():
                batch.graph(kind, build)

    # ----------------------------------------------------------------- sums and reduction
    def sum(self, per_batch: PerBatch, vs: list[Tensor], flat: Tensor | None = None,
            graph_kind: str | None = None) -> Tensor:
        """``per_batch(batch, out)`` adds each batch's products into ``out`` (per-parameter
        views of one ``(k, n)`` result shaped like ``vs``); the result (into ``flat`` if
        given), reduced over processes and checked finite."""
        flat, views = self._result(vs, flat)

        def body() -> None:
            for batch in self._pass(graph_kind):
                per_batch(batch, views)

        return self._finish(flat, self._guard(body))

    def _result(self, vs: list[Tensor], flat: Tensor | None = None
                ) -> tuple[Tensor, list[Tensor]]:
        """One flat (k, n) result (zeroed ``flat`` if given) and its per-parameter views:
        every batch adds into them. Under torch.distributed the result is the head of a buffer
        that ends with the status slots, so that the reduction step all-reduces it in place."""
        k, n = vs[0].shape[0], sum(v[0].numel() for v in vs)
        dtype = self.accumulate_dtype
        if flat is not None:
            flat.zero_()
        elif self.group is None:
            flat = vs[0].new_zeros(k, n, dtype=dtype)
        else:
            flat = vs[0].new_zeros(k * n + STATUS_SLOTS, dtype=dtype)[:k * n].view(k, n)
        return flat, split_flat(flat, [v.shape[1:] for v in vs])

    def _finish(self, flat: Tensor, failure: BaseException | None = None) -> Tensor:
        """The reduction step for a result of :meth:`_result` (in place); checked finite."""
        if self.group is None:
            if failure is not None:
                raise failure
        elif (flat.is_contiguous() and flat.untyped_storage().nbytes() == (
                flat.storage_offset() + flat.numel() + STATUS_SLOTS) * flat.element_size()):
            # the status slots follow the result in its buffer: all-reduce both in place
            buf = flat.view(-1).as_strided((flat.numel() + STATUS_SLOTS,), (1,))
            all_reduce_checked(buf, failure, self.group)
        else:
            flat.copy_(self.reduce([flat], failure)[0])
        check_finite(flat)
        return flat

    def reduce(self, parts: list[Tensor], failure: BaseException | None = None
               ) -> list[Tensor]:
        """The reduction step after the sum over this process's batches: the identity in one
        process (raising ``failure`` if given); under ``torch.distributed`` one all-reduce (a
        sum over the ranks' shards) of all parts and of the ranks' failure flags at once, so
        every rank holds the same sums, or every rank raises."""
        if self.group is None:
            if failure is not None:
                raise failure
            return parts
        flat = torch.cat([*(p.reshape(-1) for p in parts),
                          parts[0].new_zeros(STATUS_SLOTS, dtype=torch.float64)])
        all_reduce_checked(flat, failure, self.group)
        out, start = [], 0
        for p in parts:
            out.append(flat[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        return out

    def _guard(self, body: Callable[[], object]) -> BaseException | None:
        """Run ``body``; under torch.distributed an error is returned (for the reduction step
        to raise on every rank) instead of raised past the collective."""
        if self.group is None:
            body()
            return None
        try:
            body()
        except Exception as err:  # every kind goes to the other ranks
            return err
        return None

    def agree(self, failure: BaseException | None) -> None:
        """Under torch.distributed, one all-reduce of the ranks' failure flags: every rank
        raises if one failed (a check of its own shard); alone, raise ``failure`` if given."""
        self.reduce([torch.zeros(0, dtype=torch.float64)], failure)

    # ----------------------------------------------------------------- chunks
    def vectors_per_chunk(self, names: Sequence[str]) -> int:
        """Vectors per batched product over ``names``: ``chunk_size``, lowered until one
        chunk's estimated temporaries fit in ``product_bytes``. Per vector: three copies of the
        parameters differentiated (the vector's tangents, its product, and one temporary of the
        largest layer's size) and one of the saved activations of a batch (the tangents that
        flow through the graph), measured on the first graph built, or on one forward pass of
        the first batch where no graph is kept; and one token chunk of a chunked output layer
        (:mod:`~hesslens.curvature.lm_head`)."""
        if self.activation_bytes is None:
            self.activation_bytes = self._measure_activations()
        params = self.model.params
        per_vector = 3 * sum(params[n].numel() * params[n].element_size() for n in names)
        per_vector += self.activation_bytes + self.loss.chunk_bytes(self.model.dtype)
        return int(max(1, min(self.chunk_size, self.product_bytes // max(per_vector, 1))))

    def _measure_activations(self) -> int:
        """The bytes one forward pass of the first batch saves for backward (parameters not
        counted)."""
        batch = next(self.batches())
        try:
            with products.saved_bytes(self.model.params.values()) as saved, torch.enable_grad():
                leaves = {n: self.model.params[n].detach().requires_grad_(True)
                          for n in self.model.trainable}
                batch.loss(leaves)
        finally:
            self.model.release()
        return saved.nbytes

    # ----------------------------------------------------------------- first order
    def loss_and_gradient(self, names: Sequence[str]) -> tuple[float, Tensor]:
        """The mean loss and its gradient (flat) with respect to ``names``."""
        total = [torch.zeros((), dtype=torch.float64, device=self.model.device)]
        grads = [torch.zeros_like(self.model.params[n], dtype=self.accumulate_dtype)
                 for n in names]

        def body() -> None:
            for batch in self.batches():
                loss, g = products.gradient(batch.loss, self.model.params, names)
                total[0] += loss.double()
                for acc, gi in zip(grads, g):
                    acc += gi

        reduced = self.reduce([*total, *grads], self._guard(body))
        return float(reduced[0]), join_flat([g.unsqueeze(0) for g in reduced[1:]])[0]

    # ----------------------------------------------------------------- parameters
    def reload(self, model: nn.Module) -> None:
        """Take ``model``'s current parameters (the same network, later in training): the
        snapshot is overwritten in place and everything derived from the old parameters (cached
        graphs, loss checks) is dropped; the data and its weights are kept."""
        self.model.load_from(model)
        self._graphs.clear()
        self._cache_used = 0
        self.checked.clear()
        self.version += 1

    # ----------------------------------------------------------------- first batch
    def first_batch_probe(self, wanted_modules: set[str]) -> dict[str, int]:
        """Check the loss of a couple of samples of the first batch (a finite scalar, a mean
        over its terms) and return the order in which ``wanted_modules`` run: one small
        forward pass, plus two single-sample ones for the mean check."""
        batch = next(self.batches()).data
        head = take_rows(batch, slice(0, 2))
        holder: dict[str, Tensor] = {}

        def run() -> None:
            holder["loss"] = self._plain_loss(head)

        try:
            with products.named_derivative_errors():
                order = self.model.call_order(run, wanted_modules)
            check_loss(holder["loss"])
            self._check_mean(head, holder["loss"])
            self.loss.check_chunked(self.model, head, holder["loss"])
        finally:
            self.model.release()
        return order

    def _plain_loss(self, batch: Batch) -> Tensor:
        """The batch's own (unweighted) loss at the snapshot, without a graph."""
        with torch.no_grad():
            return self.loss.loss(self.loss.call(self.model.bind({}), batch), batch)

    def _check_mean(self, head: Batch, loss: Tensor) -> None:
        """Refuse a loss that adds its terms up instead of averaging them (the weighting of
        several batches assumes a mean): compare the loss of two samples with the losses of
        each. Skipped where single samples cannot be evaluated alone (batch statistics,
        dropout) or carry no loss term."""
        if self.model.batchnorm == "batch" or getattr(self.model, "random", False):
            return
        if leading_size(head) < 2:
            return
        try:
            parts = []
            for r in range(2):
                one = take_rows(head, slice(r, r + 1))
                n = self.loss.terms(one)
                parts.append((n, float(self._plain_loss(one))))
        except Exception:  # e.g. a model that needs two samples: nothing to conclude
            return
        (na, la), (nb, lb) = parts
        both = float(loss)
        if na <= 0 or nb <= 0 or not all(math.isfinite(x) for x in (la, lb, both)):
            return
        mean = (na * la + nb * lb) / (na + nb)
        total = la + lb
        tol = 1e-3 * max(abs(mean), abs(total), 1e-12)
        if abs(both - mean) > tol and abs(both - total) <= tol:
            raise HesslensInputError(
                "the loss of a batch is the sum of its terms, not their mean (two samples give "
                f"{both:.6g} = {la:.6g} + {lb:.6g}): over several batches the curvature is that "
                "of the mean loss. Use a mean reduction (e.g. reduction='mean')")


def _is_traced(t: Tensor) -> bool:
    """Whether ``t`` is a functorch-wrapped tensor (inside vmap/grad/jvp), whose value cannot
    be read."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def check_finite(t: Tensor) -> None:
    """Raise :class:`NonFiniteCurvatureError` unless every entry of the products ``t`` is
    finite."""
    if t.numel() == 0:
        return
    # min and max in one pass, no temporary: torch.isfinite(t) made a float copy of t (abs)
    # and two bool ones
    lo, hi = torch.aminmax(t)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise NonFiniteCurvatureError(
            "a curvature product is not finite (NaN or Inf) although the loss is: the "
            "second derivative of the loss overflows or is undefined at these weights "
            "(check for exploding activations, log(0), sqrt at 0, or use float64 via "
            "dtype=torch.float64)")


def split_flat(V: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split a (k, n) batch of flat vectors into per-parameter (k, *shape) views."""
    sizes = [math.prod(s) for s in shapes]
    parts = torch.split(V, sizes, dim=1)
    # views where V is contiguous (always for the loop's own results): products added into
    # them land in V
    return [p.reshape(V.shape[0], *s) for p, s in zip(parts, shapes)]


def join_flat(parts: Sequence[Tensor]) -> Tensor:
    """Join per-parameter (k, *shape) tensors into a (k, n) batch of flat vectors."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
