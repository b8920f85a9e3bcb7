r"""The curvature forms the Hessian-trace penalty adds to the loss: one small class each, on the
second-order primitives of :mod:`hesslens.curvature.products`.

For a batch of ``N`` samples with outputs ``z = f(theta)``, batch-mean loss ``L = ell(z) =
(1/N) sum_i l_i`` and ``theta_S`` the chosen layers' parameters, every form is an ordinary
differentiable scalar whose expectation (over probes ``v`` with ``E[v v^T] = I``) is a trace:

* :class:`HessianForm` -- ``mean_v v^T H_SS v`` by double backward (``H v = d/dθ (g · v)``
  with ``create_graph``), ``E = tr(H_SS)``;
* :class:`SecondDifferenceForm` -- the same from losses alone,
  ``(L(θ + hv) - 2 L(θ) + L(θ - hv)) / h^2`` (no second-order autograd);
* :class:`GaussNewtonForm` -- ``G_SS = J_S^T H_z J_S``: output-space forms ``||J_S^T S u||^2``
  where ``H_z = S S^T`` has a closed form (softmax cross-entropy, MSE:
  :func:`output_sqrt_hessian`), else parameter-space forms ``(J_S v)^T H_z (J_S v)``;
* :class:`FisherForm` -- ``(1/N) sum_i ||d l_i / dθ_S||^2``, the empirical Fisher's trace,
  exact from per-sample gradients (no probes).

The forms that re-evaluate the model do so through :class:`SidePass`: running statistics on
copies, the random-number stream forked, normalisation written out (:mod:`.norms`), attention on
kernels with double backward.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    >>> z = net(x)
    >>> loss = nn.functional.cross_entropy(z, y)
    >>> w = list(net[2].parameters())
    >>> e = [torch.zeros_like(p) for p in w]
    >>> e[0][0, 0] = 1.0                  # a probe along one coordinate: one diagonal entry of G
    >>> bool(gauss_newton_forms(z, loss, w, [e]) >= 0)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.curvature import products
from hesslens.curvature.checkpointing import checkpointing_off
from hesslens.errors import HesslensInputError
from hesslens.training.norms import DecomposedNorms

__all__ = ["FisherForm", "GaussNewtonForm", "HessianForm", "SecondDifferenceForm", "SidePass",
           "batch_statistics_modules", "check_samples", "coupled_fisher_trace",
           "empirical_fisher_trace", "gauss_newton_forms", "gauss_newton_output_forms",
           "output_sqrt_hessian"]

Probe = Sequence[Tensor]


# ---------------------------------------------------------------------- the model's own passes
class SidePass:
    """A forward pass of the penalty's own beside the training pass, on the live model.

    Normalisation statistics a training-mode pass updates in place are given as copies (the
    model's stay untouched); the global random-number stream is forked (left where the
    training pass left it); ``slots`` (``(name, index)`` of every distinct place that holds
    the ``index``-th chosen parameter) say where moved parameters go."""

    def __init__(self, model: nn.Module, slots: Sequence[tuple[str, int]]) -> None:
        self.model = model
        self.slots = list(slots)
        self._stat_slots = _stat_buffer_slots(model)

    def buffers(self) -> dict[str, Tensor]:
        """Copies of the buffers a training-mode pass updates in place (none in eval mode)."""
        buffers: dict[str, Tensor] = {}
        if self.model.training:
            for full_name, module, attr in self._stat_slots:
                b = getattr(module, attr, None)
                if isinstance(b, Tensor):
                    buffers[full_name] = b.clone()
        return buffers

    @staticmethod
    def devices(params: Sequence[Tensor]) -> list[torch.device]:
        """The CUDA devices whose random state a side pass forks."""
        return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)

    def outputs(self, params: Sequence[Tensor], inputs: Any,
                moved: Sequence[Tensor] | None = None) -> Any:
        """The model's outputs on ``inputs`` with differentiable normalisation and double
        backward kernels, the chosen parameters replaced by ``moved`` when given."""
        state = self.buffers()
        if moved is not None:
            state.update({name: moved[i] for name, i in self.slots})
        # Hugging Face layers would checkpoint, and rerun in backward outside these modes
        with torch.random.fork_rng(devices=self.devices(params)), DecomposedNorms(), \
                products.second_order_kernels(), checkpointing_off(self.model):
            return torch.func.functional_call(self.model, state, (inputs,), tie_weights=False)


def _stat_buffer_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Normalisation-statistics buffers a training-mode forward pass updates in place."""
    out = []
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for b_name, b in m.named_buffers(recurse=False):
                if b is not None:
                    out.append((f"{mod_name}.{b_name}" if mod_name else b_name, m, b_name))
    return out


# ---------------------------------------------------------------------- the Hessian
class HessianForm:
    """``mean_v v^T H v`` over ``probes``, ``H v`` by double backward with its graph kept, so
    the form's gradient (a third derivative) reaches every parameter."""

    def __call__(self, loss: Tensor, params: Sequence[Tensor], probes: Sequence[Probe]
                 ) -> Tensor:
        grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:
            # The loss is at most linear in the chosen parameters: the block is zero.
            return loss * 0.0
        g = [grads[i] for i in used]
        p = [params[i] for i in used]
        total: Tensor | None = None
        for v in probes:
            vs = [v[i] for i in used]
            hv = products.hvp(g, p, vs, create_graph=True)
            q = sum((h * vi).sum() for h, vi in zip(hv, vs))
            if not q.requires_grad:  # a constant: keep the penalty a node of the loss's graph
                q = q + loss * 0.0
            total = q if total is None else total + q
        assert total is not None
        return total / len(probes)


class SecondDifferenceForm:
    """``mean_v (L(θ + hv) - 2 L(θ) + L(θ - hv)) / h^2``: the Hessian's quadratic forms from
    losses alone, differentiable in every parameter. The step moves the chosen parameters by
    ``relative * ||θ_S||`` (:func:`hesslens.curvature.products.fd_step`); both perturbed
    passes run under the same random-number state. ``last_steps`` keeps the steps of the last
    call."""

    def __init__(self, side_pass: SidePass, loss_fn: Callable[[Any, Any], Tensor]) -> None:
        self.side_pass = side_pass
        self.loss_fn = loss_fn
        self.last_steps: list[float] = []

    def __call__(self, loss: Tensor, params: Sequence[Tensor], probes: Sequence[Probe],
                 inputs: Any, targets: Any, relative: float,
                 unit_norm: float | None = None) -> Tensor:
        """``unit_norm``: every probe's norm when known (Rademacher: ``sqrt(n)``)."""
        with torch.no_grad():
            theta_norm = float(torch.stack([p.detach().pow(2).sum() for p in params]).sum()
                               .sqrt())
        self.last_steps = []
        total: Tensor | None = None
        for v in probes:
            if unit_norm is not None:
                v_norm = unit_norm
            else:
                with torch.no_grad():
                    v_norm = float(torch.stack([vi.pow(2).sum() for vi in v]).sum().sqrt())
            if v_norm == 0:
                continue
            h = products.fd_step(theta_norm, v_norm, relative, floor=0.0)
            self.last_steps.append(h)
            q = products.second_difference(self._loss_along(params, v, inputs, targets), loss, h)
            total = q if total is None else total + q
        if total is None:
            return loss * 0.0
        return total / len(probes)

    def _loss_along(self, params: Sequence[Tensor], v: Probe, inputs: Any, targets: Any
                    ) -> Callable[[float], Tensor]:
        """``t -> L(θ + t v)`` on the live model, every call under the same random state."""
        devices = SidePass.devices(params)
        buffers = self.side_pass.buffers()
        with torch.random.fork_rng(devices=devices):
            cpu_state = torch.get_rng_state()
            cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def loss_at(t: float) -> Tensor:
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(cpu_state)
                for d, s in zip(devices, cuda_states):
                    torch.cuda.set_rng_state(s, d)
                shifted = [torch.add(p, vi, alpha=t) for p, vi in zip(params, v)]
                moved = {name: shifted[i] for name, i in self.side_pass.slots}
                moved.update(buffers)
                # a checkpointed layer would rerun in backward with the live parameters
                with checkpointing_off(self.side_pass.model):
                    out = torch.func.functional_call(self.side_pass.model, moved, (inputs,),
                                                     tie_weights=False)
                return self.loss_fn(out, targets)

        return loss_at


# ---------------------------------------------------------------------- Gauss-Newton
class GaussNewtonForm:
    """The Gauss-Newton forms on a re-evaluation of the batch: output-space ``||J_S^T S u||^2``
    where ``H_z = S S^T`` has a closed form (:func:`output_sqrt_hessian`), else (and for given
    parameter-space probes) ``(J_S v)^T H_z (J_S v)``."""

    def __init__(self, side_pass: SidePass, loss_fn: Callable[[Any, Any], Tensor]) -> None:
        self.side_pass = side_pass
        self.loss_fn = loss_fn

    def __call__(self, params: Sequence[Tensor], inputs: Any, targets: Any,
                 output_probes: Callable[[Tensor], list[Tensor]],
                 param_probes: Callable[[], list[Probe]], probes: Sequence[Probe] | None,
                 masks: Sequence[Tensor | None] | None) -> Tensor:
        outputs = self.side_pass.outputs(params, inputs)
        if not isinstance(outputs, Tensor):
            raise HesslensInputError(
                "curvature='gauss_newton' needs the model's output as one tensor, got "
                f"{type(outputs).__name__}; wrap the model so that it returns its logits")
        with DecomposedNorms(), products.second_order_kernels():
            loss = self.loss_fn(outputs, targets)
        sqrt_h = output_sqrt_hessian(self.loss_fn, outputs, targets) if probes is None else None
        if sqrt_h is not None:
            return gauss_newton_output_forms(outputs, params, sqrt_h, output_probes(outputs),
                                             masks)
        return gauss_newton_forms(outputs, loss, params,
                                  param_probes() if probes is None else probes)


def gauss_newton_forms(outputs: Tensor, loss: Tensor, params: Sequence[Tensor],
                       probes: Sequence[Probe]) -> Tensor:
    """Mean over ``probes`` of ``(J v)^T H_z (J v)``, differentiable in every parameter.

    ``outputs`` is the tensor ``z`` the ``loss`` was computed from; ``params`` the chosen
    parameters (``J = dz / d params``) and each probe a list shaped like ``params``. ``J v``
    is the derivative in ``u`` of ``J^T u`` and ``H_z w`` a reverse pass through the loss's
    gradient in ``z`` (:mod:`hesslens.curvature.products`); every pass keeps its graph."""
    params = list(params)
    u = torch.zeros_like(outputs, requires_grad=True)
    jt_u = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
    (dloss_dz,) = torch.autograd.grad(loss, outputs, create_graph=True)
    if not any(g is not None and g.requires_grad for g in jt_u) or not dloss_dz.requires_grad:
        # the outputs do not depend on the chosen parameters, or the loss is linear in them
        return loss * 0.0
    total: Tensor | None = None
    for v in probes:
        jv = products.jvp_reverse(jt_u, u, v, create_graph=True)
        hjv = products.output_hvp(dloss_dz, outputs, jv, create_graph=True)
        q = (jv * hjv).sum() if hjv is not None else loss * 0.0
        total = q if total is None else total + q
    assert total is not None
    return total / len(probes)


def output_sqrt_hessian(loss_fn: Any, outputs: Tensor,
                        targets: Any) -> Callable[[Tensor], Tensor] | None:
    """``u -> S u`` with ``S S^T = H_z`` for the losses whose ``H_z`` has a closed form, else
    ``None``; ``S`` is a function of ``outputs`` (differentiable).

    * softmax cross-entropy, batch mean over ``N`` rows of ``(N, C)`` logits, with class indices
      or probability targets (rows summing to 1; label smoothing allowed), no class weights:
      ``H_i = (diag p_i - p_i p_i^T) / N`` and ``S_i = (diag sqrt(p_i) - p_i sqrt(p_i)^T) /
      sqrt(N)``, with ``sqrt(p) = exp(log_softmax(z) / 2)`` (finite derivatives where ``p``
      underflows);
    * mean squared error over ``M`` entries: ``H_z = 2 I / M``, ``S = sqrt(2 / M) I``.
    """
    F = nn.functional
    if outputs.dim() != 2 or not isinstance(targets, Tensor):
        return None
    ce = loss_fn is F.cross_entropy or (
        type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None
        and loss_fn.reduction == "mean")
    mse = loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean")
    if ce:
        n, c = outputs.shape
        if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            ignored = getattr(loss_fn, "ignore_index", -100)
            if targets.shape != (n,) or not bool(
                    ((targets >= 0) & (targets < c) & (targets != ignored)).all()):
                return None  # ignored labels (ignore_index) weight the rows differently
        elif targets.shape != outputs.shape or not torch.allclose(
                targets.detach().sum(1), torch.ones((), dtype=targets.dtype), atol=1e-5):
            return None
        log_p = F.log_softmax(outputs, dim=1)
        p, sqrt_p = log_p.exp(), (0.5 * log_p).exp()

        def ce_sqrt(u: Tensor) -> Tensor:
            return (sqrt_p * u - p * (sqrt_p * u).sum(1, keepdim=True)) / math.sqrt(n)

        return ce_sqrt
    if mse and isinstance(targets, Tensor) and targets.shape == outputs.shape:
        scale = math.sqrt(2.0 / outputs.numel())
        return lambda u: scale * u
    return None


def gauss_newton_output_forms(outputs: Tensor, params: Sequence[Tensor],
                              sqrt_h: Callable[[Tensor], Tensor], probes: Sequence[Tensor],
                              masks: Sequence[Tensor | None] | None = None) -> Tensor:
    """Mean over output-space probes ``u`` (``E[u u^T] = I``, shaped like ``outputs``) of
    ``||J^T S u||^2``, whose expectation is ``tr(J^T S S^T J) = tr(G)``: one reverse pass per
    probe (:func:`hesslens.curvature.products.vjp`), with its graph kept for the penalty's
    gradient. ``masks`` restricts the norm to the entries of sliced blocks."""
    params = list(params)
    total: Tensor | None = None
    for u in probes:
        w = products.vjp(outputs, params, sqrt_h(u), create_graph=True)
        if masks is not None:
            w = [g if g is None or m is None else g * m.to(g.device, g.dtype)
                 for g, m in zip(w, masks)]
        squares = [g.pow(2).sum() for g in w if g is not None]
        q = torch.stack(squares).sum() if squares else outputs.sum() * 0.0
        total = q if total is None else total + q
    assert total is not None
    return total / len(probes)


# ---------------------------------------------------------------------- the empirical Fisher
class FisherForm:
    """``(1/N) sum_i ||d l_i / dθ_S||^2`` from per-sample gradients of a re-evaluation of the
    batch; checks that the batch's loss is the mean of the per-sample losses. Where BatchNorm's
    batch statistics couple the samples, ``l_i`` is the ``i``-th loss term of one pass
    (:func:`coupled_fisher_trace`)."""

    def __init__(self, side_pass: SidePass, loss_fn: Callable[[Any, Any], Tensor]) -> None:
        self.side_pass = side_pass
        self.loss_fn = loss_fn

    def __call__(self, loss: Tensor, params: Sequence[Tensor], inputs: Any, targets: Any,
                 masks: Sequence[Tensor | None] | None, dropout: bool,
                 on_coupled: Callable[[list[str]], None]) -> Tensor:
        model = self.side_pass.model
        coupled = batch_statistics_modules(model)
        if coupled:
            on_coupled(coupled)
            outputs = self.side_pass.outputs(params, inputs)
            with torch.random.fork_rng(devices=SidePass.devices(params)), DecomposedNorms(), \
                    products.second_order_kernels():
                trace, mean_loss = coupled_fisher_trace(outputs, targets, self.loss_fn, params,
                                                        masks)
        else:
            with torch.random.fork_rng(devices=SidePass.devices(params)), DecomposedNorms(), \
                    products.second_order_kernels():
                trace, mean_loss = empirical_fisher_trace(
                    model, self.side_pass.slots, params, inputs, targets, self.loss_fn, masks)
        batch_loss = float(loss.detach().reshape(()))
        per_sample = float(mean_loss)
        # loose enough for the rounding of half-precision losses, tight enough for a sum or
        # class weights
        tol = max(1e-3, 8 * torch.finfo(loss.dtype).eps) * max(1.0, abs(batch_loss))
        if not dropout and not abs(per_sample - batch_loss) <= tol:
            raise HesslensInputError(
                f"the loss ({batch_loss:.6g}) is not the mean of the per-sample losses "
                f"loss_fn(outputs[i:i+1], y[i:i+1]) ({per_sample:.6g}); curvature='fisher' "
                "needs a batch-mean loss (reduction='mean', no class weights, no ignored "
                "labels) and the loss of this batch")
        return trace


def batch_statistics_modules(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers that normalise with the batch's statistics (training mode,
    or no running statistics): there a sample's loss depends on the other samples."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]


def empirical_fisher_trace(
    model: nn.Module,
    slots: Sequence[tuple[str, int]],
    params: Sequence[Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Any, Any], Tensor],
    masks: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(1/N) sum_i ||d l_i / d params||^2`` and the mean per-sample loss ``(1/N) sum_i l_i``.

    ``l_i = loss_fn(model(inputs[i:i+1]), targets[i:i+1])``; the per-sample gradients come from
    ``torch.func.vmap(torch.func.grad(...))`` over ``functional_call``, with ``slots`` the
    ``(name, index into params)`` pairs to replace (a shared parameter under all its names).
    ``masks`` (per parameter, 0/1 or ``None``) restricts the sum to the entries of sliced
    blocks. Differentiable in every parameter of the model (the outer autograd records the
    vmapped passes).
    """
    check_samples(inputs, targets)

    def sample_loss(p: tuple[Tensor, ...], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        moved = {name: p[i] for name, i in slots}
        out = torch.func.functional_call(model, moved, (x.unsqueeze(0),), tie_weights=False)
        li = loss_fn(out, y.unsqueeze(0))
        return li, li.detach()

    per_sample = torch.func.vmap(torch.func.grad(sample_loss, has_aux=True),
                                 in_dims=(None, 0, 0), randomness="different")
    with checkpointing_off(model):  # torch.func refuses checkpointing's saved-tensor hooks
        grads, losses = per_sample(tuple(params), inputs, targets)
    return _mean_square_norm(grads, masks, inputs.shape[0]), losses.mean()


def coupled_fisher_trace(
    outputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Any, Any], Tensor],
    params: Sequence[Tensor],
    masks: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """The same trace where the samples are coupled (BatchNorm with batch statistics):
    ``l_i = loss_fn(outputs[i:i+1], targets[i:i+1])`` are the loss terms of ONE pass over the
    whole batch and ``g_i = d l_i / d params`` reaches through everything that couples them.
    The ``N x n_S`` Jacobian comes from one reverse pass vmapped over the ``N`` unit vectors
    (``is_grads_batched``): ``N`` times the arithmetic of a backward pass. Returns the trace
    and the mean loss term.
    """
    check_samples(outputs, targets)
    losses = torch.func.vmap(lambda z, y: loss_fn(z.unsqueeze(0), y.unsqueeze(0)))(outputs,
                                                                                  targets)
    n = outputs.shape[0]
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(losses, list(params), eye, is_grads_batched=True,
                                create_graph=True, allow_unused=True)
    return _mean_square_norm(grads, masks, n), losses.detach().mean()


def check_samples(inputs: Any, targets: Any) -> None:
    """Per-sample gradients need the samples first in tensors of one length."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise HesslensInputError(
            "curvature='fisher' takes per-sample gradients over the batch and needs inputs "
            f"and targets as tensors with the samples first, got {type(inputs).__name__} and "
            f"{type(targets).__name__}")
    if inputs.shape[0] != targets.shape[0]:
        raise HesslensInputError(
            f"inputs and targets have {inputs.shape[0]} and {targets.shape[0]} samples; "
            "curvature='fisher' needs one target per sample")


def _mean_square_norm(grads: Sequence[Tensor | None], masks: Sequence[Tensor | None] | None,
                      n: int) -> Tensor:
    """``(1/n) sum_i ||g_i||^2`` over per-sample gradients ``(n, *shape)``, masked."""
    squares = []
    for j, g in enumerate(grads):
        if g is None:
            continue
        m = None if masks is None else masks[j]
        if m is not None:
            g = g * m.to(g.device, g.dtype)
        squares.append(g.pow(2).sum())
    return torch.stack(squares).sum() / n


def slice_masks(model: nn.Module, blocks: Mapping[str, Sequence[Any]],
                names: Sequence[str]) -> list[Tensor | None] | None:
    """Per chosen parameter, a 0/1 mask of the elements the blocks cover (``None``: all of
    them); ``None`` when every block takes whole parameters."""
    params = dict(model.named_parameters())
    covered: dict[str, list[Any]] = {n: [] for n in names}
    for pieces in blocks.values():
        for piece in pieces:
            covered[piece.param].append(piece)
    masks: list[Tensor | None] = []
    for n in names:
        if any(piece.dim is None for piece in covered[n]):
            masks.append(None)
            continue
        mask = torch.zeros(params[n].numel())
        for piece in covered[n]:
            mask[piece.flat_indices(params[n].shape)] = 1.0
        masks.append(mask.view(params[n].shape))
    return None if all(m is None for m in masks) else masks


def parameter_slots(model: nn.Module, chosen: Sequence[str]) -> list[tuple[str, int]]:
    """``(name, i)`` for every distinct slot holding the ``i``-th chosen parameter.

    A parameter shared by two modules (``b.weight = a.weight``) appears under both names, so a
    functional call moves both uses; a module registered twice (``self.again = self.layer``)
    appears once, since replacing the attribute of that one module moves both uses and a second
    name would make ``functional_call`` restore the wrong tensor afterwards. The slots are passed
    to ``functional_call(..., tie_weights=False)``, which then has nothing left to re-tie.
    """
    named = dict(model.named_parameters())
    index = {id(named[n]): i for i, n in enumerate(chosen)}
    slots, seen = [], set()
    for name, param in model.named_parameters(remove_duplicate=False):
        module, attr = owning_slot(model, name)
        key = (id(module), attr)
        if key in seen or id(param) not in index:
            continue
        seen.add(key)
        slots.append((name, index[id(param)]))
    return slots


def owning_slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module owning the parameter or buffer ``name``, and its attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr
