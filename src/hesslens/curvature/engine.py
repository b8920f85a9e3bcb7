"""The product engine: one data loop around the per-batch products of
:mod:`hesslens.curvature.products`, and one reduction step.

The loop owns what every product shares: moving each batch to the model's device and dtype,
its weight (its share of the loss terms), the check that the data is the same on every pass,
each batch's loss check on first use, and the cache of first-order graphs (bounded in bytes:
batches whose graphs do not fit are rebuilt on every pass). :meth:`ProductEngine.reduce` is
where the products of several batches, summed here, are summed over processes too (with a
failure flag per rank, :mod:`hesslens.curvature.collective`, so that an error on one rank is an
error on all of them, not a hang).

Memory: a call with ``k`` vectors returns one ``(k, n)`` result (every batch adds into it) and
pushes its vectors through vmapped / batched products :meth:`ProductEngine.chunk` at a time:
``chunk_size`` lowered until the estimated temporaries of one chunk, per vector three copies of
the differentiated parameters and one of a batch's saved activations, fit in ``product_bytes``
(256 MiB by default). Cached graphs take at most ``graph_cache_bytes`` besides.

Hessian products have three paths: ``"reverse"`` (double backward on a kept graph, looped or
batched with ``is_grads_batched``), ``"forward"`` (forward-over-reverse, vmapped), ``"fd"``
(finite differences of gradients: no second-order autograd, any kernel). ``"auto"`` times the
exact candidates on the first products and keeps the fastest (``.choice``); pin ``path=`` for
bitwise-repeatable products.

Example:
    >>> import torch
    >>> from hesslens.curvature.data import BatchSource
    >>> from hesslens.curvature.functional_model import FunctionalModel
    >>> from hesslens.curvature.loss import BatchLoss
    >>> net = torch.nn.Linear(3, 1)
    >>> data = BatchSource((torch.randn(8, 3), torch.randn(8, 1)))
    >>> engine = ProductEngine(FunctionalModel(net), BatchLoss(net, torch.nn.functional.mse_loss),
    ...                        data, path="reverse")
    >>> engine.hessian_products(["weight", "bias"], torch.eye(4)).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hesslens.curvature import products
from hesslens.curvature.collective import STATUS_SLOTS, all_reduce_checked
from hesslens.curvature.data import Batch, BatchSource, batch_device, move_batch, take_rows
from hesslens.curvature.functional_model import FunctionalModel
from hesslens.curvature.loss import BatchLoss, check_loss
from hesslens.errors import HesslensInputError, NonFiniteCurvatureError

Path = Literal["auto", "reverse", "forward", "fd"]
PATHS = ("auto", "reverse", "forward", "fd")

#: Default bound on the bytes of cached first-order graphs (per engine).
GRAPH_CACHE_BYTES = 4 * 2**30

#: Default bound on the estimated temporaries of one chunk of a batched product: it sets the
#: chunk of a network with 10M float32 parameters to 2 vectors (benchmarks/bench_memory.py).
PRODUCT_BYTES = 2**28

#: Fewest vectors a chunk must hold for the batched paths to be timed against the loop.
_MIN_BATCHED_CHUNK = 4


class ProductEngine:
    """Products of the Hessian and the generalised Gauss-Newton matrix with batches of vectors.

    Parameters
    ----------
    model : FunctionalModel
        The frozen copy of the network.
    loss : BatchLoss
        How a batch becomes a loss (and its outputs, and its number of terms).
    data : BatchSource
        The batches and their weights.
    path : {"auto", "reverse", "forward", "fd"}
        How Hessian products are computed (see the module docstring).
    reuse_graph : bool or None
        Keep first-order graphs between products. ``None``: keep them while they fit in
        ``graph_cache_bytes``; ``False``: never.
    graph_cache_bytes : int
        The most bytes of saved activations the graph cache holds.
    chunk_size : int
        The most vectors pushed through one vmapped or batched product.
    product_bytes : int
        Bound on one chunk's estimated temporaries: lowers the chunk (:meth:`chunk`) of large
        models.
    fd_order : {2, 4}
        Order of the finite-difference products (``path="fd"``).
    group : torch.distributed process group, optional
        Sum products over this group's ranks (each holding a shard of the data) in
        :meth:`reduce`.
    """

    def __init__(
        self,
        model: FunctionalModel,
        loss: BatchLoss,
        data: BatchSource,
        *,
        path: Path = "auto",
        reuse_graph: bool | None = None,
        graph_cache_bytes: int | None = None,
        chunk_size: int = 32,
        product_bytes: int | None = None,
        fd_order: int = 4,
        group: Any = None,
    ) -> None:
        if path not in PATHS:
            raise HesslensInputError(f"path must be one of {PATHS}, not {path!r}")
        if fd_order not in (2, 4):
            raise HesslensInputError(f"fd_order must be 2 or 4, not {fd_order!r}")
        self.model = model
        self.loss = loss
        self.data = data
        # torch.distributed process group whose ranks hold shards of the data (None: alone)
        self.group = group
        if group is not None and path == "auto":
            # Timing would pick per rank, and the candidates' collectives must match: pin the
            # double-backward path (bitwise-repeatable too).
            path = "reverse"
        self.path = path
        self.fd_order = fd_order
        self.fd_scale = products.StepScale()
        self.chunk_size = max(1, int(chunk_size))
        self.product_bytes = PRODUCT_BYTES if product_bytes is None else int(product_bytes)
        self._activation_bytes: int | None = None  # the most a batch's graph saved
        if graph_cache_bytes is None:
            graph_cache_bytes = GRAPH_CACHE_BYTES
        self.graph_cache_bytes = 0 if reuse_graph is False else int(graph_cache_bytes)
        self.choice: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.calibration_products = 0
        self._graphs: dict[str, list] = {}
        self._graphs_complete: dict[str, bool] = {}
        self._cache_used = 0
        self._checked: set[int] = set()
        self.version = 0  # counts reload()s: what operators cached before one is stale
        # allow_dropout=True: each vector of a vmapped batch gets its own dropout mask, as a
        # looped product would (vmap's default refuses random operations).
        self._randomness = "different" if getattr(model, "random", False) else "error"

    def reload(self, model: nn.Module) -> None:
        """Take ``model``'s current parameters (the same network, later in training): the
        snapshot is overwritten in place and everything derived from the old parameters (cached
        graphs, loss checks, the finite-difference step) is dropped; the data, its weights and
        the chosen product paths are kept."""
        self.model.load_from(model)
        self._graphs.clear()
        self._graphs_complete.clear()
        self._cache_used = 0
        self._checked.clear()
        self.fd_scale = products.StepScale()
        self.version += 1

    # ----------------------------------------------------------------- the data loop
    def batches(self) -> Iterator[tuple[int, Batch, float]]:
        """``(index, batch on the model's device, weight)`` for every batch, one pass."""
        for i, (batch, weight) in enumerate(self.data):
            if batch_device(batch) != self.model.device and not self.model.device_requested:
                raise HesslensInputError(
                    f"the inputs are on {batch_device(batch)} but the model is on "
                    f"{self.model.device}: move the data, or pass device= to the operator"
                )
            yield i, move_batch(batch, self.model.device, self.model.dtype), weight

    def loss_of(self, index: int, batch: Batch, weight: float) -> products.LossOf:
        """The weighted loss of one batch as a function of (some of) the parameters; checked
        to be a finite scalar the first time each batch is used."""

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            loss = self.loss.loss(self.loss.call(self.model.bind(params), batch), batch)
            if index not in self._checked and not _is_traced(loss):
                check_loss(loss)
                self._checked.add(index)
            return loss * weight

        return loss_of

    def outputs_of(self, batch: Batch) -> Callable[[dict[str, Tensor]], Tensor]:
        """The network's output tensor (``.logits`` of a ModelOutput) as a function of the
        parameters, for Gauss-Newton products."""
        return lambda params: self.loss.output_tensor(
            self.loss.call(self.model.bind(params), batch))

    def reduce(self, parts: list[Tensor], failure: BaseException | None = None
               ) -> list[Tensor]:
        """The reduction step after the sum over this process's batches: the identity in one
        process (raising ``failure`` if given); under ``torch.distributed`` one all-reduce (a
        sum over the ranks' shards) of all parts and of the ranks' failure flags at once, so
        every rank holds the same products, or every rank raises."""
        if self.group is None:
            if failure is not None:
                raise failure
            return parts
        # one dtype: the widest of the parts
        flat = torch.cat([*(p.reshape(-1) for p in parts),
                          parts[0].new_zeros(STATUS_SLOTS, dtype=torch.float64)])
        all_reduce_checked(flat, failure, self.group)
        out, start = [], 0
        for p in parts:
            out.append(flat[start:start + p.numel()].reshape(p.shape).to(p.dtype))
            start += p.numel()
        return out

    def _result(self, vs: list[Tensor], flat: Tensor | None = None
                ) -> tuple[Tensor, list[Tensor]]:
        """One flat (k, n) result (zeroed ``flat`` if given) and its per-parameter views:
        every batch adds into them. Under torch.distributed the result is the head of a buffer
        that ends with the status slots, so that the reduction step all-reduces it in place."""
        k, n = vs[0].shape[0], sum(v[0].numel() for v in vs)
        if flat is not None:
            flat.zero_()
        elif self.group is None:
            flat = vs[0].new_zeros(k, n)
        else:
            flat = vs[0].new_zeros(k * n + STATUS_SLOTS)[:k * n].view(k, n)
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
        _check_finite([flat])
        return flat

    def _sum(self, per_batch: Callable[[int, Batch, float, list[Tensor]], object],
             vs: list[Tensor], flat: Tensor | None = None) -> Tensor:
        """``per_batch(index, batch, weight, out)`` adds each batch's products into ``out``;
        the flat sum (into ``flat`` if given), reduced over processes and checked finite."""
        flat, views = self._result(vs, flat)

        def body() -> None:
            for i, batch, weight in self.batches():
                per_batch(i, batch, weight, views)

        return self._finish(flat, self._loop(body))

    def _loop(self, body: Callable[[], object]) -> BaseException | None:
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

    # ----------------------------------------------------------------- graph cache
    def _graph_batches(self, kind: str, build: Callable) -> Iterator[Any]:
        """Every batch's graph of ``kind`` (over all trainable parameters, so every block
        shares it): cached ones first, the rest built on the way, and cached while the cache
        (one budget for all kinds) has room."""
        cache = self._graphs.setdefault(kind, [])
        if self._graphs_complete.get(kind):
            yield from cache
            return
        full = False
        for i, batch, weight in self.batches():
            if i < len(cache):
                yield cache[i]
                continue
            graph = build(i, batch, weight)
            self._activation_bytes = max(self._activation_bytes or 0, graph.nbytes)
            if not full and i == len(cache) and (
                    self._cache_used + graph.nbytes <= self.graph_cache_bytes):
                cache.append(graph)
                self._cache_used += graph.nbytes
            else:
                full = True
            yield graph
        self._graphs_complete[kind] = not full

    def _build_hessian_graph(self, i: int, batch: Batch, weight: float) -> products.BatchGraph:
        return products.build_graph(self.loss_of(i, batch, weight), self.model.params,
                                    self.model.trainable)

    # ----------------------------------------------------------------- Hessian products
    def hessian_products(self, names: Sequence[str], V: Tensor) -> Tensor:
        """``H V`` for a (k, n) batch of flat vectors over the parameters ``names``."""
        vs = split_flat(V, [self.model.params[n].shape for n in names])
        key = "batched" if V.shape[0] > 1 else "single"
        with products.named_derivative_errors():
            if key not in self.choice:
                return self._choose(key, names, vs)
            return self._run(self.choice[key], names, vs)

    def _run(self, candidate: str, names: Sequence[str], vs: list[Tensor],
             flat: Tensor | None = None) -> Tensor:
        """The products by one candidate path (into ``flat`` if given)."""
        if candidate == "fd":
            return self._sum(lambda i, b, w, out: products.hvp_fd(
                self.loss_of(i, b, w), self.model.params, names, vs, order=self.fd_order,
                scale=self.fd_scale, out=out), vs, flat)
        if candidate == "forward":
            chunk = self.chunk(names)
            return self._sum(lambda i, b, w, out: self._check_batch(i, b) or products.hvp_forward(
                self.loss_of(i, b, w), self.model.params, names, vs,
                chunk_size=chunk, randomness=self._randomness, out=out), vs, flat)
        batched = candidate == "reverse-batched"
        flat, views = self._result(vs, flat)

        def body() -> None:
            for graph in self._graph_batches("hessian", self._build_hessian_graph):
                products.hvp_reverse(graph, names, vs, batched=batched,
                                     chunk_size=self.chunk(names), out=views)

        return self._finish(flat, self._loop(body))

    def chunk(self, names: Sequence[str]) -> int:
        """Vectors per vmapped or batched product over ``names``: ``chunk_size``, lowered
        until one chunk's estimated temporaries fit in ``product_bytes``. Per vector: three
        copies of the parameters differentiated (the vector's tangents, its product, and one
        temporary of the largest layer's size) and one of the saved activations of a batch
        (the tangents that flow through the graph), measured on the first graph built, or on
        one forward pass of the first batch where no graph is kept."""
        if self._activation_bytes is None:
            self._activation_bytes = self._measure_activations()
        params = self.model.params
        per_vector = 3 * sum(params[n].numel() * params[n].element_size() for n in names)
        per_vector += self._activation_bytes
        return int(max(1, min(self.chunk_size, self.product_bytes // max(per_vector, 1))))

    def _measure_activations(self) -> int:
        """The bytes one forward pass of the first batch saves for backward (parameters not
        counted)."""
        i, batch, weight = next(self.batches())
        with products.saved_bytes(self.model.params.values()) as saved, torch.enable_grad():
            leaves = {n: self.model.params[n].detach().requires_grad_(True)
                      for n in self.model.trainable}
            self.loss_of(i, batch, weight)(leaves)
        return saved[0]

    def _candidates(self, k: int, names: Sequence[str]) -> list[str]:
        if self.path == "fd":
            return ["fd"]
        if self.path == "forward":
            return ["forward"]
        if self.path == "reverse":  # pinned: no timing, so products are bitwise repeatable
            return ["reverse-loop"]
        if k > 1 and self.chunk(names) < _MIN_BATCHED_CHUNK:
            # A chunk within product_bytes holds too few vectors for batching to pay (one vector
            # is the loop itself), and timing the batched paths would add their temporaries to
            # the peak (ResNet-18, 11M parameters, a batch of 2: 24 copies of the parameters
            # against 14 for the loop alone, 10 more at the peak of density()).
            return ["reverse-loop"]
        reverse = ["reverse-loop", "reverse-batched"] if k > 1 else ["reverse-loop"]
        if k == 1 and self.model.device.type == "cpu" and self.graph_cache_bytes > 0:
            # Measured on CPU: a single double backward on a kept graph beats a single
            # forward-over-reverse product on every model tried (MLP 6 ms vs 16, CNN-1D,
            # ResNet-20 0.7 s vs 1.3 s), so do not spend a product finding that out again.
            return reverse
        return [*reverse, "forward"]

    def _choose(self, key: str, names: Sequence[str], vs: list[Tensor]) -> Tensor:
        """Time every candidate path on the first few vectors, keep the fastest for the rest
        and for later calls, and return the products (the discarded candidates' products are
        counted in ``calibration_products``)."""
        k = vs[0].shape[0]
        candidates = self._candidates(k, names)
        if len(candidates) == 1:
            self.choice[key] = candidates[0]
            return self._run(candidates[0], names, vs)
        if self.graph_cache_bytes > 0:
            # Build the cached graphs first, so that their one-off cost is charged to no path.
            for _ in self._graph_batches("hessian", self._build_hessian_graph):
                pass
        m = min(k, 4)
        head = [v[:m] for v in vs]
        # The products of the fastest candidate so far are kept in the head of the result, a
        # slower one's are dropped at once: one extra (m, n) block at most, not one per path.
        flat, _ = self._result(vs)
        timings: dict[str, float] = {}
        failures: list[BaseException] = []
        for candidate in candidates:
            _synchronize(self.model.device)
            start = time.perf_counter()
            try:
                out = self._run(candidate, names, head, None if timings else flat[:m])
            except (RuntimeError, NotImplementedError) as err:
                # e.g. forward-mode AD is not implemented for mse_loss's backward: that path
                # is simply not a candidate for this model and loss.
                failures.append(err)
                continue
            _synchronize(self.model.device)
            elapsed = time.perf_counter() - start
            if timings and elapsed < min(timings.values()):
                flat[:m].copy_(out)
            timings[candidate] = elapsed
            del out
        if not timings:
            raise failures[0]
        best = min(timings, key=timings.get)
        self.choice[key] = best
        self.timings[key] = timings
        self.calibration_products += (len(timings) - 1) * m
        if m < k:
            self._run(best, names, [v[m:] for v in vs], flat[m:])
        return flat

    # ----------------------------------------------------------------- Gauss-Newton products
    def gauss_newton_products(self, names: Sequence[str], V: Tensor) -> Tensor:
        """``G V = J^T (d2 loss / dz2) J V`` for a (k, n) batch of flat vectors.

        A single vector goes through cached graphs (three backward passes, no forward); a
        batch is vmapped through ``jvp`` / ``vjp``, which is cheaper per vector."""
        vs = split_flat(V, [self.model.params[n].shape for n in names])
        with products.named_derivative_errors():
            if V.shape[0] == 1 and self.graph_cache_bytes > 0:
                flat, views = self._result(vs)

                def body() -> None:
                    for graph in self._graph_batches("gauss_newton", self._build_ggn_graph):
                        products.ggn_reverse(graph, names, vs, out=views)

                return self._finish(flat, self._loop(body))
            return self._sum(self._ggn_batched(names, vs), vs)

    def _ggn_loss(self, i: int, batch: Batch, weight: float) -> Callable[[Tensor], Tensor]:
        def loss_of_outputs(z: Tensor) -> Tensor:
            loss = self.loss.loss_of_outputs(z, batch)
            return loss * weight

        return loss_of_outputs

    def _build_ggn_graph(self, i: int, batch: Batch, weight: float
                         ) -> products.GaussNewtonGraph:
        self._check_batch(i, batch)
        return products.build_ggn_graph(self.outputs_of(batch), self._ggn_loss(i, batch, weight),
                                        self.model.params, self.model.trainable)

    def _ggn_batched(self, names: Sequence[str], vs: list[Tensor]) -> Callable:
        chunk = self.chunk(names)

        def per_batch(i: int, batch: Batch, weight: float, out: list[Tensor]) -> None:
            self._check_batch(i, batch)
            products.ggn_vmapped(self.outputs_of(batch), self._ggn_loss(i, batch, weight),
                                 self.model.params, names, vs, chunk_size=chunk,
                                 randomness=self._randomness, out=out)

        return per_batch

    def _check_batch(self, index: int, batch: Batch) -> None:
        if index not in self._checked:
            with torch.no_grad():
                self.loss_of(index, batch, 1.0)({})

    # ----------------------------------------------------------------- first order
    def loss_and_gradient(self, names: Sequence[str]) -> tuple[float, Tensor]:
        """The mean loss and its gradient (flat) with respect to ``names``."""
        total = [torch.zeros((), dtype=torch.float64, device=self.model.device)]
        grads = [torch.zeros_like(self.model.params[n]) for n in names]

        def body() -> None:
            for i, batch, weight in self.batches():
                loss, g = products.gradient(self.loss_of(i, batch, weight), self.model.params,
                                            names)
                total[0] += loss.double()
                for acc, gi in zip(grads, g):
                    acc += gi

        reduced = self.reduce([*total, *grads], self._loop(body))
        return float(reduced[0]), join_flat([g.unsqueeze(0) for g in reduced[1:]])[0]

    def agree(self, failure: BaseException | None) -> None:
        """Under torch.distributed, one all-reduce of the ranks' failure flags: every rank
        raises if one failed (a check of its own shard); alone, raise ``failure`` if given."""
        self.reduce([torch.zeros(0, dtype=torch.float64)], failure)

    def first_batch_probe(self, wanted_modules: set[str]) -> dict[str, int]:
        """Check the loss of a couple of samples of the first batch (a finite scalar, a mean
        over its terms) and return the order in which ``wanted_modules`` run: one small
        forward pass, plus two single-sample ones for the mean check."""
        batch = next(self.batches())[1]
        head = take_rows(batch, slice(0, 2))
        holder: dict[str, Tensor] = {}

        def run() -> None:
            with torch.no_grad():
                holder["loss"] = self.loss.loss(self.loss.call(self.model.bind({}), head), head)

        with products.named_derivative_errors():
            order = self.model.call_order(run, wanted_modules)
        check_loss(holder["loss"])
        self._check_mean(head, holder["loss"])
        return order

    def _check_mean(self, head: Batch, loss: Tensor) -> None:
        """Refuse a loss that adds its terms up instead of averaging them (the weighting of
        several batches assumes a mean): compare the loss of two samples with the losses of
        each. Skipped where single samples cannot be evaluated alone (batch statistics,
        dropout) or carry no loss term."""
        if self.model.batchnorm == "batch" or getattr(self.model, "random", False):
            return
        rows = _rows(head)
        if rows < 2:
            return
        try:
            parts = []
            for r in range(2):
                one = take_rows(head, slice(r, r + 1))
                n = self.loss.terms(one)
                with torch.no_grad():
                    value = self.loss.loss(self.loss.call(self.model.bind({}), one), one)
                parts.append((n, float(value)))
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


def _rows(batch: Batch) -> int:
    from hesslens.curvature.data import leading_size

    return leading_size(batch)


def _is_traced(t: Tensor) -> bool:
    """Whether ``t`` is a functorch-wrapped tensor (inside vmap/grad/jvp), whose value cannot
    be read."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_finite(parts: list[Tensor]) -> None:
    # min and max in one pass, no temporary: torch.isfinite(p) made a float copy of p (abs)
    # and two bool ones, 8 parameter copies for a batch of 6 products of a 10M network
    for p in parts:
        if p.numel() == 0:
            continue
        lo, hi = torch.aminmax(p)
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
    # views where V is contiguous (always for the engine's own results): products added
    # into them land in V
    return [p.reshape(V.shape[0], *s) for p, s in zip(parts, shapes)]


def join_flat(parts: Sequence[Tensor]) -> Tensor:
    """Join per-parameter (k, *shape) tensors into a (k, n) batch of flat vectors."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
