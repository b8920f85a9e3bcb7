"""Per-batch curvature products: each function multiplies the matrix of ONE batch's (already
weighted) loss with a batch of vectors, given per parameter as ``(k, *shape)`` tensors.

``loss_of(params)`` is the weighted loss of the batch with ``params`` (a dict over the
parameters differentiated) overriding the model's snapshot. The engine
(:mod:`hesslens.curvature.engine`) owns the data loop around these, the weighting, the graph
cache and the sum over batches.

* :func:`hvp_reverse` -- ``Hv = d/dθ (g · v)`` by double backward on a kept first-order graph.
* :func:`hvp_forward` -- ``Hv = jvp(grad(loss), v)``, forward-over-reverse, vmapped.
* :func:`hvp_fd` -- ``Hv ≈ (g(θ + hv) - g(θ - hv)) / 2h``, first-order autograd only.
* :func:`ggn_vmapped`, :func:`ggn_reverse` -- ``Gv = J^T (d2 loss / dz2) J v``.

Each adds its products into ``out`` (per-parameter ``(k, *shape)`` tensors, e.g. views of one
flat result) when given, so that a sum over batches holds one result, not one per batch.

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> loss_of = lambda p: (p["w"] ** 3).sum() / 6          # Hessian diag(w)
    >>> graph = build_graph(loss_of, {"w": w}, ["w"])
    >>> hvp_reverse(graph, ["w"], [torch.ones(1, 2, dtype=torch.float64)])[0]
    tensor([[1., 2.]], dtype=torch.float64)
    >>> fd = hvp_fd(loss_of, {"w": w}, ["w"], [torch.ones(1, 2, dtype=torch.float64)])[0]
    >>> [round(x, 8) for x in fd[0].tolist()]
    [1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hesslens.errors import HesslensInputError

LossOf = Callable[[dict[str, Tensor]], Tensor]


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Attention kernels that have the derivatives double backward and forward mode need.

    PyTorch's default ``scaled_dot_product_attention`` picks fused kernels (flash attention on
    CPU and GPU) whose backward has no derivative of its own; the math kernel is composed of
    differentiable operations. Used around second-order products only: first-order passes
    (gradients, finite differences) keep the fast kernels."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no sdpa_kernel: nothing to select
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class named_derivative_errors:
    """Turn PyTorch's 'derivative not implemented' errors (an operation without double
    backward or forward mode, e.g. a fused attention kernel) into a named input error that says
    what to do (``hint``, default: the operators' options)."""

    def __init__(self, hint: str | None = None) -> None:
        self.hint = hint or (
            "pass path='fd' (finite-difference products that need gradients only), or use a "
            "kernel with double backward (e.g. attn_implementation='sdpa' or 'eager' for a "
            "Hugging Face model)")

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, (RuntimeError, NotImplementedError)):
            return False
        text = str(exc)
        if ("derivative for" in text and "not implemented" in text) or (
                "forward AD" in text and "not implemented" in text):
            raise HesslensInputError(
                "an operation of this model has no second derivative in PyTorch "
                f"({text.splitlines()[0][:160]}): {self.hint}") from exc
        return False


@dataclass
class BatchGraph:
    """One batch's first-order graph: the leaves it was built on, the gradient (with its
    graph) and the bytes the graph saved for backward."""

    leaves: dict[str, Tensor]
    grads: dict[str, Tensor]
    nbytes: int


def build_graph(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str]) -> BatchGraph:
    """The gradient of ``loss_of`` with respect to ``names`` with its graph kept for double
    backward; counts the bytes the graph saves."""
    # detached views of the snapshot, not copies: nothing writes to them
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad(), second_order_kernels(), saved_bytes(params.values()) as saved:
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                    allow_unused=True)
    grads_map = {n: (g if g is not None else torch.zeros_like(leaves[n]))
                 for n, g in zip(leaves, grads)}
    return BatchGraph(leaves, grads_map, saved[0])


@contextlib.contextmanager
def saved_bytes(exclude: Iterable[Tensor] = ()) -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block
    (in ``[0]``), leaving out those of ``exclude`` (the parameters: saving them costs no
    memory). The engine sizes its cache and its product chunks with this."""
    saved = [0]
    seen = {_storage_of(t)[0] for t in exclude}

    def pack(t: Tensor) -> Tensor:
        ptr, nbytes = _storage_of(t)
        if ptr not in seen:
            seen.add(ptr)
            saved[0] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _storage_of(t: Tensor) -> tuple[int, int]:
    """``(address, bytes)`` of ``t``'s storage; a tensor without one (a wrapper subclass)
    counts as its own elements."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return id(t), t.numel() * t.element_size()


def hvp_reverse(graph: BatchGraph, names: Sequence[str], vs: list[Tensor], *,
                batched: bool = False, chunk_size: int = 32,
                out: list[Tensor] | None = None) -> list[Tensor]:
    """``H_b V`` by double backward on ``graph``: ``d/dθ (g · v)``, one vector at a time or
    ``is_grads_batched`` chunks of them."""
    out = out if out is not None else [torch.zeros_like(v) for v in vs]
    # A parameter the loss does not use has a constant (zero) gradient: its rows and columns
    # of H are zero, and autograd must not be asked to differentiate it.
    used = [i for i, n in enumerate(names) if graph.grads[n].requires_grad]
    if not used:
        return out
    g = [graph.grads[names[i]] for i in used]
    x = [graph.leaves[names[i]] for i in used]
    k = vs[0].shape[0]
    with second_order_kernels():
        if batched and k > 1:
            for start in range(0, k, chunk_size):
                sl = slice(start, start + chunk_size)
                hv = torch.autograd.grad(g, x, [vs[i][sl] for i in used], retain_graph=True,
                                         is_grads_batched=True, allow_unused=True)
                for i, h in zip(used, hv):
                    if h is not None:
                        out[i][sl] += h
        else:
            for j in range(k):
                hv = torch.autograd.grad(g, x, [vs[i][j] for i in used], retain_graph=True,
                                         allow_unused=True)
                for i, h in zip(used, hv):
                    if h is not None:
                        out[i][j] += h
    return out


def hvp_forward(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str],
                vs: list[Tensor], *, chunk_size: int = 32,
                randomness: str = "error", out: list[Tensor] | None = None) -> list[Tensor]:
    """``H_b V`` as ``jvp(grad(loss), v)`` (forward over reverse), vmapped over chunks."""
    primals = tuple(params[n] for n in names)

    def loss_of_tuple(sub: tuple[Tensor, ...]) -> Tensor:
        return loss_of(dict(zip(names, sub)))

    def hvp_one(*tangents: Tensor) -> tuple[Tensor, ...]:
        return torch.func.jvp(torch.func.grad(loss_of_tuple), (primals,), (tangents,))[1]

    out = out if out is not None else [torch.zeros_like(v) for v in vs]
    k = vs[0].shape[0]
    with second_order_kernels():
        for start in range(0, k, chunk_size):
            sl = slice(start, start + chunk_size)
            hv = torch.func.vmap(hvp_one, randomness=randomness)(*(v[sl] for v in vs))
            for o, h in zip(out, hv):
                o[sl] += h
    return out


def gradient(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str]
             ) -> tuple[Tensor, list[Tensor]]:
    """The loss and its gradient with respect to ``names`` (first-order autograd only)."""
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad():
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(leaves[n])
                           for n, g in zip(names, grads)]


def fd_step(params: dict[str, Tensor], names: Sequence[str], v: Sequence[Tensor],
            order: int) -> float:
    """The starting step ``h`` of a finite-difference product along ``v``: the perturbation
    ``h v`` has norm ``eps^(1/(order+1)) * max(|θ|, 1)``, which balances the truncation error
    (``O(h^order)``) against the rounding error of the gradients (``O(eps / h)``) when the loss
    varies on the scale of the weights."""
    dtype = v[0].dtype
    eps = torch.finfo(dtype).eps
    theta = math.sqrt(sum(float(params[n].detach().double().pow(2).sum()) for n in names))
    vnorm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v))
    if vnorm == 0.0:
        return 0.0
    return eps ** (1.0 / (order + 1)) * max(theta, 1.0) / vnorm


class StepScale:
    """The factor applied to :func:`fd_step`, learned across products: a loss that curves on a
    finer scale than its weights (attention, normalisation) needs smaller steps, found once by
    halving and then kept. ``tol``: the relative change between ``D(h)`` and ``D(h/2)`` below
    which a step is accepted (default ``sqrt(eps)``); ``max_halvings`` bounds the search."""

    def __init__(self, tol: float | None = None, max_halvings: int = 6) -> None:
        self.factor = 1.0
        self.tol = tol
        self.max_halvings = max_halvings
        self.unsettled = 0.0  # the largest relative change D(h) vs D(h/2) accepted so far
        self.warned = False
        self.gave_up = False  # a search did not settle: later products keep the step found


def hvp_fd(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str],
           vs: list[Tensor], *, order: int = 4, scale: StepScale | None = None,
           out: list[Tensor] | None = None) -> list[Tensor]:
    """``H_b V`` by central differences of the gradient, ``D(h) = (g(θ+hv) - g(θ-hv)) / 2h``
    (``order=2``: two gradients a vector), or with one Richardson extrapolation step
    ``(4 D(h/2) - D(h)) / 3`` (``order=4``, the default: four gradients, error ``O(h^4)``),
    differences accumulated in float64. With ``order=4`` the change between ``D(h)`` and
    ``D(h/2)`` measures the truncation error for free: while it exceeds ``scale.tol`` the step
    is halved (two more gradients each time) and the smaller factor kept for later products.
    Exact for a quadratic loss; needs only gradients, so it runs with any kernel, compiled
    models and sharded parameters. Where the halvings do not settle (ReLU or max-pooling kinks
    within the step), the step of plain central differences, ``sqrt(eps)`` relative, is tried
    and kept if ``D(h)`` and ``D(h/2)`` agree better there: in float64 it crosses almost no kink
    and matches the exact products; in float32 no step does, and a warning says so."""
    if order not in (2, 4):
        raise ValueError(f"order must be 2 or 4, not {order}")
    scale = scale if scale is not None else StepScale()
    out = out if out is not None else [torch.zeros_like(v) for v in vs]
    k = vs[0].shape[0]
    base = {n: params[n].detach() for n in names}
    tol = scale.tol if scale.tol is not None else math.sqrt(torch.finfo(vs[0].dtype).eps)

    def central(v: list[Tensor], h: float) -> list[Tensor]:
        plus = gradient(loss_of, {n: base[n] + h * t for n, t in zip(names, v)}, names)[1]
        minus = gradient(loss_of, {n: base[n] - h * t for n, t in zip(names, v)}, names)[1]
        return [(p.double() - m.double()) / (2.0 * h) for p, m in zip(plus, minus)]

    def norm(parts: list[Tensor]) -> float:
        return math.sqrt(sum(float(p.pow(2).sum()) for p in parts))

    for j in range(k):
        v = [t[j] for t in vs]
        h = fd_step(base, names, v, order) * scale.factor
        if h == 0.0:
            continue
        if order == 2:
            parts = central(v, h)
        elif scale.gave_up:  # searching again would cost as much and settle no better
            coarse, fine = central(v, h), central(v, h / 2)
            best_change = norm([f - c for f, c in zip(fine, coarse)]) / max(norm(fine), 1e-300)
            parts = [(4.0 * f - c) / 3.0 for f, c in zip(fine, coarse)]
            scale.unsettled = max(scale.unsettled, best_change)
        else:
            coarse = central(v, h)
            best, best_change, best_h = None, math.inf, h
            for halving in range(scale.max_halvings + 1):
                fine = central(v, h / 2)
                change = norm([f - c for f, c in zip(fine, coarse)]) / max(norm(fine), 1e-300)
                if change < best_change:
                    best = [(4.0 * f - c) / 3.0 for f, c in zip(fine, coarse)]
                    best_change, best_h = change, h
                    scale.factor = h / fd_step(base, names, v, order)
                elif halving > 0:
                    break  # rounding has taken over from truncation: keep the best step
                if change <= tol:
                    break
                h, coarse = h / 2, fine
            if best_change > tol:
                # Still unsettled: the loss is not smooth on the scale of the step (ReLU or
                # max-pooling kinks). Plain central differences' step, sqrt(eps) relative,
                # crosses far fewer kinks; keep it where D(h) and D(h/2) agree better there.
                small = fd_step(base, names, v, 1)
                if small < best_h / 2:
                    coarse, fine = central(v, small), central(v, small / 2)
                    change = norm([f - c for f, c in zip(fine, coarse)]) / max(norm(fine), 1e-300)
                    if change < best_change:
                        best = [(4.0 * f - c) / 3.0 for f, c in zip(fine, coarse)]
                        best_change = change
                        scale.factor = small / fd_step(base, names, v, order)
                scale.gave_up = best_change > tol
            parts = best
            scale.unsettled = max(scale.unsettled, best_change)
        if order == 4 and best_change > max(1e-2, 100 * tol) and not scale.warned:
            scale.warned = True
            warnings.warn(
                f"finite-difference products did not settle: D(h) and D(h/2) still differ "
                f"by {best_change:.1%} at the best step, so the loss is not smooth on the "
                "scale of the step (ReLU or max-pooling kinks, or too little precision) and "
                "these products can be far from the Hessian's; use an exact path (path="
                "'reverse' or 'forward')", stacklevel=2)
        for o, p in zip(out, parts):
            o[j] += p.to(o.dtype)
    return out


def ggn_vmapped(forward: Callable[[dict[str, Tensor]], Tensor],
                loss_of_outputs: Callable[[Tensor], Tensor], params: dict[str, Tensor],
                names: Sequence[str], vs: list[Tensor], *, chunk_size: int = 32,
                randomness: str = "error", out: list[Tensor] | None = None) -> list[Tensor]:
    """``G_b V = J^T (d2 loss / dz2) J V`` with ``jvp`` / ``vjp``, vmapped over chunks;
    ``forward(params)`` is the output tensor ``z``, ``loss_of_outputs(z)`` the weighted loss."""
    primals = tuple(params[n] for n in names)

    def fwd(*p: Tensor) -> Tensor:
        return forward(dict(zip(names, p)))

    with second_order_kernels():
        outputs, vjp_fn = torch.func.vjp(fwd, *primals)
        outputs = outputs.detach()
        # H_out w as a vector-Jacobian product of the loss gradient (H_out is symmetric):
        # reverse over reverse works for every loss, forward mode is missing for some (mse).
        _, hess_out = torch.func.vjp(torch.func.grad(loss_of_outputs), outputs)

        def ggn_one(*tangents: Tensor) -> tuple[Tensor, ...]:
            _, jv = torch.func.jvp(fwd, primals, tangents)
            return vjp_fn(hess_out(jv)[0])

        out = out if out is not None else [torch.zeros_like(v) for v in vs]
        k = vs[0].shape[0]
        for start in range(0, k, chunk_size):
            sl = slice(start, start + chunk_size)
            gv = torch.func.vmap(ggn_one, randomness=randomness)(*(v[sl] for v in vs))
            for o, g in zip(out, gv):
                o[sl] += g
    return out


@dataclass
class GaussNewtonGraph:
    """Graphs for reverse-mode Gauss-Newton products on one batch: the outputs ``z``, ``J^T u``
    as a function of a dummy ``u`` (its derivative in ``u`` gives ``J v``), and the gradient
    of the weighted loss in ``z`` (its derivative gives ``H_out w``)."""

    leaves: dict[str, Tensor]
    outputs: Tensor
    u: Tensor
    jt_u: dict[str, Tensor | None]
    z: Tensor
    loss_grad: Tensor
    nbytes: int


def build_ggn_graph(forward: Callable[[dict[str, Tensor]], Tensor],
                    loss_of_outputs: Callable[[Tensor], Tensor], params: dict[str, Tensor],
                    names: Sequence[str]) -> GaussNewtonGraph:
    """The graphs :func:`ggn_reverse` multiplies through."""
    # detached views of the snapshot, not copies: nothing writes to them
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    with torch.enable_grad(), second_order_kernels(), saved_bytes(params.values()) as saved:
        out = forward(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, list(leaves.values()), u, create_graph=True,
                                   allow_unused=True)
        z = out.detach().requires_grad_(True)
        loss_grad = torch.autograd.grad(loss_of_outputs(z), z, create_graph=True)[0]
    return GaussNewtonGraph(leaves, out, u, dict(zip(leaves, jt_u)), z, loss_grad, saved[0])


def ggn_reverse(graph: GaussNewtonGraph, names: Sequence[str], vs: list[Tensor],
                out: list[Tensor] | None = None) -> list[Tensor]:
    """``G_b v`` for each vector through the kept graphs: ``J v`` (a derivative of ``J^T u``
    in ``u``), ``H_out J v``, then ``J^T (H_out J v)``; no forward pass."""
    out = out if out is not None else [torch.zeros_like(v) for v in vs]
    with second_order_kernels():
        for j in range(vs[0].shape[0]):
            pairs = [(graph.jt_u[n], v[j]) for n, v in zip(names, vs)
                     if graph.jt_u[n] is not None]
            if not pairs:
                continue
            jv = torch.autograd.grad([p for p, _ in pairs], graph.u, [t for _, t in pairs],
                                     retain_graph=True)[0]
            hjv = torch.autograd.grad(graph.loss_grad, graph.z, jv, retain_graph=True)[0]
            gv = torch.autograd.grad(graph.outputs, [graph.leaves[n] for n in names], hjv,
                                     retain_graph=True, allow_unused=True)
            for o, g in zip(out, gv):
                if g is not None:
                    o[j] += g
    return out
