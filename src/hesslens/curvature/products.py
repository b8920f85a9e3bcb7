"""Second-order primitives, written once: Hessian-, Jacobian- and Gauss-Newton-vector products,
finite differences of gradients and of losses, per-sample gradients.

Plain functions that read like their equations; the bookkeeping (which batch, its weight, the
graph cache, chunks of vectors, the sum over batches and processes) lives in the callers: the
operators' data loop (:mod:`hesslens.curvature.loop`), the training penalty
(:mod:`hesslens.training.penalty`) and the sharded Hessian (:mod:`hesslens.curvature.sharded`).
Vectors are given per parameter, as lists aligned with the parameters.

* ``Hv = d/dθ (g · v)`` -- :func:`hvp` (double backward on a kept gradient graph; rows of
  vectors one at a time or in ``is_grads_batched`` chunks: :func:`hvp_rows`), :func:`hvp_forward`
  (``jvp(grad(loss), v)``, vmapped).
* ``J v = d/du (J^T u · v)``, ``J^T w``, ``H_z w`` -- :func:`jvp_reverse`, :func:`vjp`,
  :func:`output_hvp`; the Gauss-Newton product ``G v = J^T H_z J v`` is their composition
  (:func:`gauss_newton_vp`, or :func:`gauss_newton_vmapped` with forward mode).
* ``Hv ≈ (4 D(h/2) - D(h)) / 3``, ``D(h) = (g(θ + hv) - g(θ - hv)) / 2h`` --
  :func:`richardson_hvp`, from any ``gradient_at(t)``; its step (:func:`fd_step`) and the
  search that settles it (:class:`StepScale`) are shared by every finite difference here.
* ``v^T H v ≈ (L(θ + hv) - 2 L(θ) + L(θ - hv)) / h^2`` -- :func:`second_difference`.

Example:
    >>> import torch
    >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> loss_of = lambda p: (p["w"] ** 3).sum() / 6          # Hessian diag(w)
    >>> graph = first_order_graph(loss_of, {"w": w}, ["w"])
    >>> hvp(graph.grads, graph.leaves, [torch.ones(2, dtype=torch.float64)])[0]
    tensor([1., 2.], dtype=torch.float64)
    >>> gradient_at = lambda t: gradient(loss_of, {"w": w + t}, ["w"])[1]
    >>> [round(x, 8) for x in richardson_hvp(gradient_at, [torch.ones(2, dtype=torch.float64)],
    ...                                      theta_norm=float(w.norm()))[0].tolist()]
    [1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hesslens.errors import HesslensInputError

LossOf = Callable[[dict[str, Tensor]], Tensor]
Vectors = list[Tensor]

__all__ = [
    "FirstOrderGraph",
    "GaussNewtonGraph",
    "LossOf",
    "SavedTensors",
    "StepScale",
    "fd_step",
    "first_order_graph",
    "gauss_newton_graph",
    "gauss_newton_vmapped",
    "gauss_newton_vp",
    "gradient",
    "hvp",
    "hvp_forward",
    "hvp_rows",
    "jvp_reverse",
    "named_derivative_errors",
    "output_hvp",
    "relative_step",
    "richardson_hvp",
    "saved_bytes",
    "second_difference",
    "second_difference_step",
    "second_order_kernels",
    "vjp",
]


# ---------------------------------------------------------------------- kernels and errors
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
class SavedTensors:
    """What autograd saved for backward inside a :func:`saved_bytes` block: the bytes of the
    distinct storages and their addresses."""

    nbytes: int = 0
    storages: set[int] = field(default_factory=set)


@contextlib.contextmanager
def saved_bytes(exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the bytes of the distinct storages autograd saves for backward inside the block
    (``.nbytes``; their addresses: ``.storages``), leaving out those of ``exclude`` (the
    parameters: saving them costs no memory). The operators size their graph cache and product
    chunks with this."""
    saved = SavedTensors()
    seen = {_storage_of(t)[0] for t in exclude}

    def pack(t: Tensor) -> Tensor:
        ptr, nbytes = _storage_of(t)
        if ptr not in seen:
            seen.add(ptr)
            saved.storages.add(ptr)
            saved.nbytes += nbytes
        # detached: a saved output kept with its own grad_fn would hold its node, and the
        # node it, in a cycle that nothing frees (autograd puts the edge back on unpacking)
        return t.detach()

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


def _leaves(params: dict[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    # detached views of the snapshot, not copies: nothing writes to them
    return {n: params[n].detach().requires_grad_(True) for n in names}


# ---------------------------------------------------------------------- first order
def gradient(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str]
             ) -> tuple[Tensor, Vectors]:
    """The loss and its gradient ``g = dL/dθ`` with respect to ``names`` (first order only)."""
    leaves = _leaves(params, names)
    with torch.enable_grad():
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(leaves[n])
                           for n, g in zip(names, grads)]


@dataclass
class FirstOrderGraph:
    """One batch's gradient with its graph kept for double backward: the leaves it was built
    on, the gradient ``g`` (a zero constant for a parameter the loss does not use) and the
    bytes the graph saved. Built with ``keep_values=False``, ``g``'s entries are freed: only
    its graph may be used (reading them fails)."""

    leaves: dict[str, Tensor]
    grads: dict[str, Tensor]
    nbytes: int


def first_order_graph(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str], *,
                      keep_values: bool = True) -> FirstOrderGraph:
    """``g = dL/dθ`` over ``names`` with ``create_graph=True``, and the bytes its graph saves.

    ``keep_values=False`` frees the memory of the gradient's entries (one copy of the
    parameters) and keeps its graph: double backward through ``g`` reads only ``g``'s shape,
    so the products stay exact. A gradient whose storage the graph itself saved keeps it."""
    leaves = _leaves(params, names)
    with torch.enable_grad(), second_order_kernels(), saved_bytes(params.values()) as saved:
        loss = loss_of(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                    allow_unused=True)
    grads_map = {n: (g if g is not None else torch.zeros_like(leaves[n]))
                 for n, g in zip(leaves, grads)}
    if not keep_values:
        _free_values([g for g in grads_map.values() if g.requires_grad],
                     saved.storages | {_storage_of(t)[0] for t in params.values()})
    return FirstOrderGraph(leaves, grads_map, saved.nbytes)


def _free_values(tensors: Sequence[Tensor], keep: set[int]) -> None:
    """Free the storage of each tensor (its shape, dtype and autograd graph stay) unless its
    address is in ``keep`` (tensors that something else reads)."""
    for t in tensors:
        ptr, _ = _storage_of(t)
        if ptr not in keep and ptr != id(t):  # id(t): a tensor without a storage of its own
            t.untyped_storage().resize_(0)


# ---------------------------------------------------------------------- Hessian-vector
def _used(grads: Sequence[Tensor]) -> list[int]:
    """The parameters the gradient depends on: a parameter the loss does not use has a constant
    (zero) gradient, so its rows and columns of ``H`` are zero and autograd must not be asked to
    differentiate it."""
    return [i for i, g in enumerate(grads) if g is not None and g.requires_grad]


def hvp(grads: Sequence[Tensor] | dict[str, Tensor], leaves: Sequence[Tensor] | dict,
        v: Sequence[Tensor], *, create_graph: bool = False) -> Vectors:
    """``H v = d/dθ (g · v)``: the vector-Jacobian product of the gradient ``g`` (with its
    graph) and ``v``, by double backward (``H`` is symmetric). ``create_graph=True`` keeps the
    product differentiable (the training penalty); otherwise the gradient's graph is kept for
    the next vector. A parameter the loss does not use gets a zero product."""
    g = list(grads.values()) if isinstance(grads, dict) else list(grads)
    x = list(leaves.values()) if isinstance(leaves, dict) else list(leaves)
    out = [torch.zeros_like(t) for t in v]
    used = _used(g)
    if not used:
        return out
    with second_order_kernels():
        hv = torch.autograd.grad([g[i] for i in used], [x[i] for i in used],
                                 [v[i] for i in used], retain_graph=True,
                                 create_graph=create_graph, allow_unused=True)
    for i, h in zip(used, hv):
        if h is not None:
            out[i] = h
    return out


def hvp_rows(grads: Sequence[Tensor] | dict[str, Tensor], leaves: Sequence[Tensor] | dict,
             V: Sequence[Tensor], *, batched: bool = False, chunk_size: int = 32,
             out: Vectors | None = None) -> Vectors:
    """:func:`hvp` for each row of the ``(k, *shape)`` tensors ``V``: one double backward a
    row, or ``batched`` chunks of rows at once (``is_grads_batched``). The products are added
    into ``out`` when given (e.g. views of one result summed over batches)."""
    g = list(grads.values()) if isinstance(grads, dict) else list(grads)
    x = list(leaves.values()) if isinstance(leaves, dict) else list(leaves)
    out = out if out is not None else [torch.zeros_like(t) for t in V]
    used = _used(g)
    if not used:
        return out
    g, x = [g[i] for i in used], [x[i] for i in used]
    k = V[0].shape[0]
    with second_order_kernels():
        if batched and k > 1:
            for start in range(0, k, chunk_size):
                rows = slice(start, start + chunk_size)
                hv = torch.autograd.grad(g, x, [V[i][rows] for i in used], retain_graph=True,
                                         is_grads_batched=True, allow_unused=True)
                for i, h in zip(used, hv):
                    if h is not None:
                        out[i][rows] += h
        elif any(out[i].dtype != leaf.dtype for i, leaf in zip(used, x)):
            # products summed in a wider dtype than the model's (half precision)
            for j in range(k):
                hv = torch.autograd.grad(g, x, [V[i][j] for i in used], retain_graph=True,
                                         allow_unused=True)
                for i, h in zip(used, hv):
                    if h is not None:
                        out[i][j] += h
        else:
            # each row's products accumulate into out[.][j] as the leaves' gradients, one
            # parameter at a time (no whole-vector temporary): 0 + h, as out += h would be
            for j in range(k):
                for i, leaf in zip(used, x):
                    leaf.grad = out[i][j]
                try:
                    torch.autograd.backward(g, [V[i][j] for i in used], retain_graph=True,
                                            inputs=x)
                finally:
                    for leaf in x:
                        leaf.grad = None
    return out


def hvp_forward(loss_of: LossOf, params: dict[str, Tensor], names: Sequence[str],
                V: Sequence[Tensor], *, chunk_size: int = 32, randomness: str = "error",
                out: Vectors | None = None) -> Vectors:
    """``H v = jvp(grad(L), v)`` (forward over reverse) for each row of the ``(k, *shape)``
    tensors ``V``, vmapped over chunks of rows; added into ``out`` when given."""
    primals = tuple(params[n] for n in names)

    def loss_of_tuple(sub: tuple[Tensor, ...]) -> Tensor:
        return loss_of(dict(zip(names, sub)))

    def hvp_one(*tangents: Tensor) -> tuple[Tensor, ...]:
        return torch.func.jvp(torch.func.grad(loss_of_tuple), (primals,), (tangents,))[1]

    out = out if out is not None else [torch.zeros_like(t) for t in V]
    with second_order_kernels():
        for start in range(0, V[0].shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hv = torch.func.vmap(hvp_one, randomness=randomness)(*(t[rows] for t in V))
            for o, h in zip(out, hv):
                o[rows] += h
    return out


# ---------------------------------------------------------------------- Jacobians, Gauss-Newton
def jvp_reverse(jt_u: Sequence[Tensor | None], u: Tensor, v: Sequence[Tensor], *,
                create_graph: bool = False) -> Tensor | None:
    """``J v`` as ``d/du (J^T u · v)``: ``jt_u`` is ``J^T u`` computed with ``create_graph``
    for a dummy ``u`` (zeros shaped like the outputs); reverse mode only. ``None`` when no
    parameter of ``v`` reaches the outputs."""
    pairs = [(j, t) for j, t in zip(jt_u, v) if j is not None and j.requires_grad]
    if not pairs:
        return None
    (jv,) = torch.autograd.grad([j for j, _ in pairs], u, [t for _, t in pairs],
                                retain_graph=True, create_graph=create_graph)
    return jv


def vjp(outputs: Tensor, leaves: Sequence[Tensor], w: Tensor, *, create_graph: bool = False
        ) -> list[Tensor | None]:
    """``J^T w``: the outputs' vector-Jacobian product with ``w`` (``None`` for a parameter
    the outputs do not depend on)."""
    return list(torch.autograd.grad(outputs, list(leaves), w, retain_graph=True,
                                    create_graph=create_graph, allow_unused=True))


def output_hvp(loss_grad: Tensor, z: Tensor, w: Tensor, *, create_graph: bool = False
               ) -> Tensor | None:
    """``H_z w``: the Hessian of the loss in the outputs ``z`` times ``w``, as the
    vector-Jacobian product of the loss's gradient in ``z`` (``H_z`` is symmetric; reverse over
    reverse works for every loss, forward mode is missing for some)."""
    if not loss_grad.requires_grad:
        return None  # the loss is linear in z
    (hw,) = torch.autograd.grad(loss_grad, z, w, retain_graph=True,
                                create_graph=create_graph, allow_unused=True)
    return hw


@dataclass
class GaussNewtonGraph:
    """Graphs for ``G v = J^T H_z J v`` on one batch: the outputs ``z`` (with their graph to
    the leaves), ``J^T u`` for a dummy ``u`` (its derivative in ``u`` gives ``J v``), and the
    loss's gradient in a detached copy of ``z`` (its derivative gives ``H_z w``)."""

    leaves: dict[str, Tensor]
    outputs: Tensor
    u: Tensor
    jt_u: dict[str, Tensor | None]
    z: Tensor
    loss_grad: Tensor
    nbytes: int


def gauss_newton_graph(forward: Callable[[dict[str, Tensor]], Tensor],
                       loss_of_outputs: Callable[[Tensor], Tensor], params: dict[str, Tensor],
                       names: Sequence[str]) -> GaussNewtonGraph:
    """The graphs :func:`gauss_newton_vp` multiplies through."""
    leaves = _leaves(params, names)
    with torch.enable_grad(), second_order_kernels(), saved_bytes(params.values()) as saved:
        out = forward(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(out, list(leaves.values()), u, create_graph=True,
                                   allow_unused=True)
        z = out.detach().requires_grad_(True)
        loss_grad = torch.autograd.grad(loss_of_outputs(z), z, create_graph=True)[0]
    return GaussNewtonGraph(leaves, out, u, dict(zip(leaves, jt_u)), z, loss_grad, saved.nbytes)


def gauss_newton_vp(graph: GaussNewtonGraph, names: Sequence[str], V: Sequence[Tensor],
                    out: Vectors | None = None) -> Vectors:
    """``G v = J^T (H_z (J v))`` for each row of the ``(k, *shape)`` tensors ``V`` through
    the kept graphs (no forward pass); added into ``out`` when given."""
    out = out if out is not None else [torch.zeros_like(t) for t in V]
    leaves = [graph.leaves[n] for n in names]
    with second_order_kernels():
        for j in range(V[0].shape[0]):
            jv = jvp_reverse([graph.jt_u[n] for n in names], graph.u, [t[j] for t in V])
            if jv is None:
                continue
            hjv = output_hvp(graph.loss_grad, graph.z, jv)
            if hjv is None:
                continue
            for o, g in zip(out, vjp(graph.outputs, leaves, hjv)):
                if g is not None:
                    o[j] += g
    return out


def gauss_newton_vmapped(forward: Callable[[dict[str, Tensor]], Tensor],
                         loss_of_outputs: Callable[[Tensor], Tensor],
                         params: dict[str, Tensor], names: Sequence[str],
                         V: Sequence[Tensor], *, chunk_size: int = 32,
                         randomness: str = "error", out: Vectors | None = None) -> Vectors:
    """``G v = J^T H_z J v`` for each row of the ``(k, *shape)`` tensors ``V``: ``J v`` by
    ``jvp``, ``J^T w`` by ``vjp``, vmapped over chunks of rows; added into ``out`` when
    given."""
    primals = tuple(params[n] for n in names)

    def fwd(*p: Tensor) -> Tensor:
        return forward(dict(zip(names, p)))

    out = out if out is not None else [torch.zeros_like(t) for t in V]
    with second_order_kernels():
        outputs, vjp_fn = torch.func.vjp(fwd, *primals)
        outputs = outputs.detach()
        _, hess_out = torch.func.vjp(torch.func.grad(loss_of_outputs), outputs)

        def ggn_one(*tangents: Tensor) -> tuple[Tensor, ...]:
            _, jv = torch.func.jvp(fwd, primals, tangents)
            return vjp_fn(hess_out(jv)[0])

        for start in range(0, V[0].shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            gv = torch.func.vmap(ggn_one, randomness=randomness)(*(t[rows] for t in V))
            for o, g in zip(out, gv):
                o[rows] += g
    return out


# ---------------------------------------------------------------------- finite differences
def fd_step(theta_norm: float, v_norm: float, relative: float, floor: float = 1.0) -> float:
    """The step ``h`` of a finite difference along ``v``: the perturbation ``h v`` has norm
    ``relative * max(||θ||, floor)`` (``1`` in place of a zero ``||θ||``), the loss varying on
    the scale of the weights. ``0`` for a zero vector.

    Example:
        >>> fd_step(4.0, 2.0, 0.01)
        0.02
    """
    if v_norm == 0.0:
        return 0.0
    return relative * (max(theta_norm, floor) or 1.0) / v_norm


def relative_step(dtype: torch.dtype, order: int) -> float:
    """``eps^(1/(order+1))``: the relative step of a difference of gradients whose truncation
    error is ``O(h^order)``, balanced against the rounding error ``O(eps / h)`` (``order=4``:
    central differences with one Richardson step; ``order=1``: the small ``sqrt(eps)`` step
    that crosses few ReLU kinks)."""
    return torch.finfo(dtype).eps ** (1.0 / (order + 1))


def second_difference_step(dtype: torch.dtype) -> float:
    """``(48 u)^(1/4)``, ``u`` the unit round-off: the relative step of the second difference of
    losses, balancing its truncation ``h^2/12`` against its rounding ``4 u / h^2`` (relative,
    for a loss that curves on the scale of the weights).

    Example:
        >>> round(second_difference_step(torch.float32), 3)
        0.041
    """
    u = torch.finfo(dtype).eps / 2.0
    return (48.0 * u) ** 0.25


def norm(parts: Sequence[Tensor]) -> float:
    """The Euclidean norm of a vector given in parts (accumulated in float64)."""
    return math.sqrt(sum(float(p.double().pow(2).sum()) for p in parts))


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


def richardson_hvp(gradient_at: Callable[[float], Sequence[Tensor]], v: Sequence[Tensor], *,
                   theta_norm: float, order: int = 4, scale: StepScale | None = None,
                   dtype: torch.dtype | None = None) -> Vectors:
    """``H v`` from gradients alone: ``gradient_at(t)`` is the gradient at ``θ + t v``.

    ``D(h) = (g(θ + hv) - g(θ - hv)) / 2h`` (``order=2``: two gradients), or one Richardson
    step ``(4 D(h/2) - D(h)) / 3`` (``order=4``, the default: four gradients, error
    ``O(h^4)``), differences in float64. With ``order=4`` the change between ``D(h)`` and
    ``D(h/2)`` measures the truncation error for free: while it exceeds ``scale.tol`` the step
    is halved (two more gradients each time) and the smaller factor kept in ``scale`` for later
    products. Where the halvings do not settle (ReLU or max-pooling kinks within the step), the
    step of plain central differences, ``sqrt(eps)`` relative, is tried and kept where ``D(h)``
    and ``D(h/2)`` agree better; in float64 it crosses almost no kink, in float32 no step does
    and a warning says so. ``dtype``: the precision the gradients are computed in (default:
    ``v``'s). Returns float64 parts."""
    if order not in (2, 4):
        raise ValueError(f"order must be 2 or 4, not {order}")
    scale = scale if scale is not None else StepScale()
    dtype = dtype or v[0].dtype
    v_norm = norm(v)
    unit = fd_step(theta_norm, v_norm, relative_step(dtype, order))  # the step at factor 1
    h = unit * scale.factor
    if h == 0.0:
        return [torch.zeros_like(t, dtype=torch.float64) for t in v]
    tol = scale.tol if scale.tol is not None else math.sqrt(torch.finfo(dtype).eps)

    def central(step: float) -> Vectors:
        plus, minus = gradient_at(step), gradient_at(-step)
        return [(p.double() - m.double()) / (2.0 * step) for p, m in zip(plus, minus)]

    def settled(step: float) -> tuple[Vectors, float]:
        """The Richardson estimate at ``step`` and its relative change ``|D(h/2) - D(h)|``."""
        coarse, fine = central(step), central(step / 2)
        return _richardson(coarse, fine), _change(coarse, fine)

    if order == 2:
        return central(h)
    if scale.gave_up:  # searching again would cost as much and settle no better
        best, change = settled(h)
    else:
        best, change, best_h = _search(central, h, tol, scale, unit)
        if change > tol:
            # Still unsettled: the loss is not smooth on the scale of the step (ReLU or
            # max-pooling kinks). Plain central differences' step, sqrt(eps) relative,
            # crosses far fewer kinks; keep it where D(h) and D(h/2) agree better there.
            small = fd_step(theta_norm, v_norm, relative_step(dtype, 1))
            if small < best_h / 2:
                fallback, small_change = settled(small)
                if small_change < change:
                    best, change = fallback, small_change
                    scale.factor = small / unit
            scale.gave_up = change > tol
    scale.unsettled = max(scale.unsettled, change)
    if change > max(1e-2, 100 * tol) and not scale.warned:
        scale.warned = True
        warnings.warn(
            f"finite-difference products did not settle: D(h) and D(h/2) still differ "
            f"by {change:.1%} at the best step, so the loss is not smooth on the "
            "scale of the step (ReLU or max-pooling kinks, or too little precision) and "
            "these products can be far from the Hessian's; use an exact path (path="
            "'reverse' or 'forward')", stacklevel=3)
    return best


def _richardson(coarse: Vectors, fine: Vectors) -> Vectors:
    return [(4.0 * f - c) / 3.0 for f, c in zip(fine, coarse)]


def _change(coarse: Vectors, fine: Vectors) -> float:
    return norm([f - c for f, c in zip(fine, coarse)]) / max(norm(fine), 1e-300)


def _search(central: Callable[[float], Vectors], h: float, tol: float, scale: StepScale,
            unit: float) -> tuple[Vectors, float, float]:
    """Halve the step from ``h`` while ``D(h)`` and ``D(h/2)`` differ by more than ``tol``;
    keep the best estimate (rounding takes over from truncation once the change grows again),
    its change and its step, and record the step's factor (over ``unit``) in ``scale``."""
    coarse = central(h)
    best, best_change, best_h = None, math.inf, h
    for halving in range(scale.max_halvings + 1):
        fine = central(h / 2)
        change = _change(coarse, fine)
        if change < best_change:
            best, best_change, best_h = _richardson(coarse, fine), change, h
            scale.factor = h / unit
        elif halving > 0:
            break
        if change <= tol:
            break
        h, coarse = h / 2, fine
    return best, best_change, best_h


def second_difference(loss_at: Callable[[float], Tensor], loss: Tensor, h: float) -> Tensor:
    """``v^T H v ≈ (L(θ + hv) - 2 L(θ) + L(θ - hv)) / h^2``: the second derivative of the loss
    along ``v`` from losses alone (``loss_at(t)`` is ``L(θ + t v)``, differentiable; ``loss`` is
    ``L(θ)``). Truncation ``O(h^2)``, rounding ``O(eps |L| / h^2)``."""
    return (loss_at(h) - 2.0 * loss + loss_at(-h)) / (h * h)
