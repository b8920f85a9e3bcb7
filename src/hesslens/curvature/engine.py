"""The product engine: Hessian- and Gauss-Newton-vector products of a model's mean loss.

Two ways to compute ``H v``, both over the same functional model:

``"reverse"``
    double backward on a first-order graph built once per batch and reused by every product
    (``autograd.grad(g, params, v, retain_graph=True)``), one vector at a time. (``"auto"``
    also tries ``is_grads_batched``, vmap over the backward pass, for batches of vectors.)
``"forward"``
    forward-over-reverse, ``jvp(grad(loss), v)`` with ``torch.func``, vmapped over a batch of
    vectors in memory-bounded chunks. Nothing is cached, so it suits data too large to keep
    graphs for.

Which is faster depends on the model and the device (on a CPU, double backward is cheaper for a
ResNet, and vmapped products help an MLP; on a GPU, batching helps both), so ``"auto"`` times
each candidate on the first batch of vectors it sees and keeps the fastest; ``.choice`` records
it. Pin ``path=`` for bitwise-identical products across runs.

Example:
    >>> import torch
    >>> from hesslens.curvature.data import BatchSource
    >>> from hesslens.curvature.functional_model import FunctionalModel
    >>> net = torch.nn.Linear(3, 1)
    >>> data = BatchSource((torch.randn(8, 3), torch.randn(8, 1)))
    >>> engine = ProductEngine(FunctionalModel(net), torch.nn.functional.mse_loss, data,
    ...                        path="reverse")
    >>> engine.hessian_products(["weight", "bias"], torch.eye(4)).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from hesslens.curvature.data import BatchSource, as_args, batch_device, move_batch
from hesslens.curvature.functional_model import FunctionalModel
from hesslens.errors import HesslensInputError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Path = Literal["auto", "reverse", "forward"]


class ProductEngine:
    """Products of the Hessian and the generalised Gauss-Newton matrix with batches of vectors.

    Parameters
    ----------
    model : FunctionalModel
        The frozen copy of the network.
    loss_fn : callable
        ``loss_fn(outputs, targets)``: the mean loss of a batch, a scalar.
    data : BatchSource
        The batches and their weights.
    path : {"auto", "reverse", "forward"}
        How Hessian products are computed (see the module docstring).
    reuse_graph : bool or None
        Keep the first-order graph of every batch between products (``"reverse"`` path). ``None``
        keeps it when the data is in memory and has at most ``max_cached_samples`` samples.
    chunk_size : int
        The most vectors pushed through one vmapped product, to bound memory.
    """

    def __init__(
        self,
        model: FunctionalModel,
        loss_fn: LossFn,
        data: BatchSource,
        *,
        path: Path = "auto",
        reuse_graph: bool | None = None,
        max_cached_samples: int = 2048,
        chunk_size: int = 32,
    ) -> None:
        if path not in ("auto", "reverse", "forward"):
            raise HesslensInputError(f"path must be 'auto', 'reverse' or 'forward', not {path!r}")
        if not callable(loss_fn):
            raise HesslensInputError("loss_fn must be callable as loss_fn(outputs, targets)")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.path = path
        self.chunk_size = max(1, int(chunk_size))
        if reuse_graph is None:
            reuse_graph = data.in_memory and data.num_samples <= max_cached_samples
        self.reuse_graph = reuse_graph
        self.choice: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self.calibration_products = 0
        self._graphs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] | None = None
        self._losses_checked = False
        # allow_dropout=True: each vector of a vmapped batch gets its own dropout mask, as a
        # looped product would (vmap's default refuses random operations).
        self._randomness = "different" if getattr(model, "random", False) else "error"
        self._gn_graphs: list[tuple] | None = None
        self._check_first_batch()

    # ----------------------------------------------------------------- helpers
    def _batches(self):
        for batch, weight in self.data:
            if batch_device(batch) != self.model.device and not self.model.device_requested:
                raise HesslensInputError(
                    f"the inputs are on {batch_device(batch)} but the model is on "
                    f"{self.model.device}: move the data, or pass device= to the operator"
                )
            yield move_batch(batch, self.model.device, self.model.dtype), weight

    def _checked_batches(self):
        """The batches, with each batch's loss checked (finite scalar) on the first pass: the
        vmapped paths cannot check inside the transform, and a NaN there would come out as a
        NaN trace or a scipy error far from its cause."""
        if self._losses_checked:
            yield from self._batches()
            return
        for batch, weight in self._batches():
            with torch.no_grad():
                check_loss(self._loss({}, batch))
            yield batch, weight
        self._losses_checked = True

    def _loss(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(self.model(params, as_args(inputs)), targets)

    def _check_first_batch(self) -> None:
        """Fail at construction, not at the first product: the loss of a couple of samples
        must be a finite scalar (every batch's loss is checked again when it is used)."""
        (inputs, targets), _ = next(iter(self._batches()))
        inputs = tuple(t[:2] for t in inputs) if isinstance(inputs, tuple) else inputs[:2]
        with torch.no_grad():
            loss = self._loss({}, (inputs, targets[:2]))
        check_loss(loss)

    # ----------------------------------------------------------------- reverse path
    def _graph_for(self, batch, weight: float):
        leaves = {
            n: self.model.params[n].clone().requires_grad_(True) for n in self.model.trainable
        }
        with torch.enable_grad():
            loss = self._loss(leaves, batch) * weight
            check_loss(loss)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                        allow_unused=True)
        grads = {
            n: (g if g is not None else torch.zeros_like(leaves[n]))
            for n, g in zip(leaves, grads)
        }
        return leaves, grads

    def _graphs_iter(self):
        if self._graphs is not None:
            yield from self._graphs
            return
        cache = [] if self.reuse_graph else None
        for batch, weight in self._batches():
            graph = self._graph_for(batch, weight)
            if cache is not None:
                cache.append(graph)
            yield graph
        if cache is not None:
            self._graphs = cache

    def _reverse(self, names: Sequence[str], vs: list[torch.Tensor], batched: bool) -> list:
        out = [torch.zeros_like(v) for v in vs]
        k = vs[0].shape[0]
        for leaves, grads in self._graphs_iter():
            # A parameter the loss does not use has a constant (zero) gradient: its rows and
            # columns of H are zero, and autograd must not be asked to differentiate it.
            used = [i for i, n in enumerate(names) if grads[n].requires_grad]
            if not used:
                continue
            g = [grads[names[i]] for i in used]
            x = [leaves[names[i]] for i in used]
            outs = [out[i] for i in used]
            vs_used = [vs[i] for i in used]
            if batched and k > 1:
                for start in range(0, k, self.chunk_size):
                    sl = slice(start, start + self.chunk_size)
                    hv = torch.autograd.grad(
                        g, x, [v[sl] for v in vs_used], retain_graph=True,
                        is_grads_batched=True, allow_unused=True,
                    )
                    for o, h in zip(outs, hv):
                        if h is not None:
                            o[sl] += h
            else:
                for i in range(k):
                    hv = torch.autograd.grad(g, x, [v[i] for v in vs_used], retain_graph=True,
                                             allow_unused=True)
                    for o, h in zip(outs, hv):
                        if h is not None:
                            o[i] += h
        return out

    # ----------------------------------------------------------------- forward path
    def _forward(self, names: Sequence[str], vs: list[torch.Tensor]) -> list:
        out = [torch.zeros_like(v) for v in vs]
        k = vs[0].shape[0]
        for batch, weight in self._checked_batches():
            def loss_of(sub, batch=batch):
                return self._loss(dict(zip(names, sub)), batch)

            primals = tuple(self.model.params[n] for n in names)

            def hvp_one(*tangents, primals=primals, loss_of=loss_of):
                grad_fn = torch.func.grad(loss_of)
                return torch.func.jvp(grad_fn, (primals,), (tangents,))[1]

            for start in range(0, k, self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                hv = torch.func.vmap(hvp_one, randomness=self._randomness)(*(v[sl] for v in vs))
                for o, h in zip(out, hv):
                    o[sl] += weight * h
        return out

    # ----------------------------------------------------------------- public
    def hessian_products(self, names: Sequence[str], V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a (k, n) batch of flat vectors over the parameters ``names``."""
        vs = split_flat(V, [self.model.params[n].shape for n in names])
        key = "batched" if V.shape[0] > 1 else "single"
        if key not in self.choice:
            return join_flat(self._choose(key, names, vs))
        return join_flat(self._run(self.choice[key], names, vs))

    def _run(self, candidate: str, names: Sequence[str], vs: list[torch.Tensor]) -> list:
        if candidate == "forward":
            return self._forward(names, vs)
        return self._reverse(names, vs, batched=candidate == "reverse-batched")

    def _candidates(self, k: int) -> list[str]:
        if self.path == "forward":
            return ["forward"]
        if self.path == "reverse":  # pinned: no timing, so products are bitwise repeatable
            return ["reverse-loop"]
        reverse = ["reverse-loop", "reverse-batched"] if k > 1 else ["reverse-loop"]
        if k == 1 and self.model.device.type == "cpu" and self.reuse_graph:
            # Measured on CPU: a single double backward on a kept graph beats a single
            # forward-over-reverse product on every model tried (MLP 6 ms vs 16, CNN-1D,
            # ResNet-20 0.7 s vs 1.3 s), so do not spend a product finding that out again.
            return reverse
        return [*reverse, "forward"]

    def _choose(self, key: str, names, vs) -> list:
        """Time every candidate path on the first few vectors of this batch, keep the fastest
        for the rest and for later calls, and return the products (the discarded candidates'
        products are counted in ``calibration_products``)."""
        k = vs[0].shape[0]
        candidates = self._candidates(k)
        if len(candidates) == 1:
            self.choice[key] = candidates[0]
            return self._run(candidates[0], names, vs)
        if self.reuse_graph:
            # Build the cached graphs first, so that their one-off cost is charged to no path.
            for _ in self._graphs_iter():
                pass
        m = min(k, 4)
        head = [v[:m] for v in vs]
        timings, results = {}, {}
        failures: list[BaseException] = []
        for candidate in candidates:
            start = time.perf_counter()
            try:
                results[candidate] = self._run(candidate, names, head)
            except (RuntimeError, NotImplementedError) as err:
                # e.g. forward-mode AD is not implemented for mse_loss's backward: that path
                # is simply not a candidate for this model and loss.
                failures.append(err)
                continue
            timings[candidate] = time.perf_counter() - start
        if not timings:
            raise failures[0]
        best = min(timings, key=timings.get)
        self.choice[key] = best
        self.timings[key] = timings
        self.calibration_products += (len(timings) - 1) * m
        if m == k:
            return results[best]
        rest = self._run(best, names, [v[m:] for v in vs])
        return [torch.cat([a, b]) for a, b in zip(results[best], rest)]

    def gauss_newton_products(self, names: Sequence[str], V: torch.Tensor) -> torch.Tensor:
        """``G V = J^T (d2 loss / d out2) J V`` for a (k, n) batch of flat vectors.

        A single vector goes through cached graphs (three backward passes, no forward); a
        batch is vmapped through ``jvp`` / ``vjp``, which is cheaper per vector."""
        vs = split_flat(V, [self.model.params[n].shape for n in names])
        if V.shape[0] == 1 and self.reuse_graph:
            return join_flat(self._gauss_newton_reverse(names, vs))
        out = [torch.zeros_like(v) for v in vs]
        k = V.shape[0]
        for batch, weight in self._checked_batches():
            inputs, targets = batch
            args = as_args(inputs)
            primals = tuple(self.model.params[n] for n in names)

            def forward(*p, args=args):
                return self.model(dict(zip(names, p)), args)

            outputs, vjp_fn = torch.func.vjp(forward, *primals)
            outputs = outputs.detach()

            def loss_grad(o, targets=targets):
                return torch.func.grad(lambda z: self.loss_fn(z, targets))(o)

            # H_out w as a vector-Jacobian product of the loss gradient (H_out is symmetric):
            # reverse over reverse works for every loss, while forward-mode AD is missing for
            # some (mse_loss, huber_loss).
            _, hess_out = torch.func.vjp(loss_grad, outputs)

            def ggn_one(*tangents, primals=primals, vjp_fn=vjp_fn, forward=forward,
                        hess_out=hess_out):
                _, jv = torch.func.jvp(forward, primals, tangents)
                return vjp_fn(hess_out(jv)[0])

            for start in range(0, k, self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                gv = torch.func.vmap(ggn_one, randomness=self._randomness)(*(v[sl] for v in vs))
                for o, g in zip(out, gv):
                    o[sl] += weight * g
        return join_flat(out)

    def _gn_graph_for(self, batch, weight: float):
        """Graphs for reverse-mode Gauss-Newton products on one batch: the outputs, ``J^T u``
        as a function of a dummy ``u`` (its derivative in ``u`` gives ``J v``), and the
        gradient of the weighted loss in the outputs (its derivative gives ``H_out w``)."""
        inputs, targets = batch
        leaves = {
            n: self.model.params[n].clone().requires_grad_(True) for n in self.model.trainable
        }
        with torch.enable_grad():
            out = self.model(leaves, as_args(inputs))
            u = torch.zeros_like(out, requires_grad=True)
            jt_u = torch.autograd.grad(out, list(leaves.values()), u, create_graph=True,
                                       allow_unused=True)
            z = out.detach().requires_grad_(True)
            loss_grad = torch.autograd.grad(self.loss_fn(z, targets) * weight, z,
                                            create_graph=True)[0]
        return leaves, out, u, dict(zip(leaves, jt_u)), z, loss_grad

    def _gauss_newton_reverse(self, names: Sequence[str], vs: list[torch.Tensor]) -> list:
        if self._gn_graphs is None:
            self._gn_graphs = [self._gn_graph_for(b, w) for b, w in self._batches()]
        out = [torch.zeros_like(v) for v in vs]
        for leaves, outputs, u, jt_u, z, loss_grad in self._gn_graphs:
            pairs = [(jt_u[n], v[0]) for n, v in zip(names, vs) if jt_u[n] is not None]
            if not pairs:
                continue
            jv = torch.autograd.grad([p for p, _ in pairs], u, [t for _, t in pairs],
                                     retain_graph=True)[0]
            hjv = torch.autograd.grad(loss_grad, z, jv, retain_graph=True)[0]
            gv = torch.autograd.grad(outputs, [leaves[n] for n in names], hjv,
                                     retain_graph=True, allow_unused=True)
            for o, g in zip(out, gv):
                if g is not None:
                    o[0] += g
        return out

    def loss_and_gradient(self, names: Sequence[str]) -> tuple[float, torch.Tensor]:
        """The mean loss and its gradient (flat) with respect to ``names``."""
        total = 0.0
        grads = [torch.zeros_like(self.model.params[n]) for n in names]
        for batch, weight in self._batches():
            leaves = {n: self.model.params[n].clone().requires_grad_(True) for n in names}
            with torch.enable_grad():
                loss = self._loss(leaves, batch) * weight
                g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            total += float(loss.detach())
            for acc, gi in zip(grads, g):
                if gi is not None:
                    acc += gi
        return total, join_flat([g.unsqueeze(0) for g in grads])[0]


def check_loss(loss: torch.Tensor) -> None:
    """Raise a clear error unless ``loss`` is a finite scalar tensor."""
    if not isinstance(loss, torch.Tensor):
        raise HesslensInputError(
            f"loss_fn returned a {type(loss).__name__}, not a tensor: it must return the mean "
            "loss of the batch as a scalar tensor"
        )
    if loss.numel() != 1:
        raise HesslensInputError(
            f"loss_fn returned a tensor of shape {tuple(loss.shape)}, not a scalar: use a mean "
            "reduction (e.g. reduction='mean')"
        )
    if not torch.isfinite(loss.detach()).all():
        raise HesslensInputError(
            f"the loss is not finite ({float(loss.detach()):g}): check the inputs, the targets "
            "and the model's weights"
        )


def split_flat(V: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split a (k, n) batch of flat vectors into per-parameter (k, *shape) views."""
    sizes = [math.prod(s) for s in shapes]
    parts = torch.split(V, sizes, dim=1)
    return [p.reshape(V.shape[0], *s) for p, s in zip(parts, shapes)]


def join_flat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join per-parameter (k, *shape) tensors into a (k, n) batch of flat vectors."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
