r"""The Gauss-Newton and empirical-Fisher traces as differentiable penalties.

For a batch of ``N`` samples with outputs ``z = f(theta)``, batch-mean loss ``L = ell(z) =
(1/N) sum_i l_i`` and ``theta_S`` the chosen layers' parameters:

* Gauss-Newton: ``G_SS = J_S^T H_z J_S`` with ``J_S = dz / dtheta_S`` and ``H_z = d2 ell / dz2``
  (positive semi-definite for a convex loss in the outputs). :func:`gauss_newton_forms` gives
  the Hutchinson forms ``v^T G_SS v = (J_S v)^T H_z (J_S v)``, so ``E[v^T G_SS v] = tr(G_SS)``,
  the sum of the chosen layers' diagonal-block traces of the Gauss-Newton matrix.
* Empirical Fisher: ``tr(F_SS) = (1/N) sum_i ||d l_i / dtheta_S||^2`` with ``l_i`` the loss of
  sample ``i`` on its true label. :func:`empirical_fisher_trace` computes it exactly (no
  probes) from per-sample gradients; :func:`coupled_fisher_trace` where BatchNorm's batch
  statistics couple the samples (``l_i`` the ``i``-th loss term of one batch pass).

Both are ordinary differentiable scalars: their gradients reach every parameter.

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
    >>> # a probe along one coordinate: one diagonal entry of G, never negative
    >>> e = [torch.zeros_like(p) for p in w]
    >>> e[0][0, 0] = 1.0
    >>> bool(gauss_newton_forms(z, loss, w, [e]) >= 0)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.errors import HesslensInputError

__all__ = ["batch_statistics_modules", "check_samples", "coupled_fisher_trace",
           "empirical_fisher_trace", "gauss_newton_forms", "gauss_newton_output_forms",
           "output_sqrt_hessian"]


def gauss_newton_forms(outputs: Tensor, loss: Tensor, params: Sequence[Tensor],
                       probes: Sequence[Sequence[Tensor]]) -> Tensor:
    """Mean over ``probes`` of ``(J v)^T H_z (J v)``, differentiable in every parameter.

    ``outputs`` is the tensor ``z`` the ``loss`` was computed from; ``params`` the chosen
    parameters (``J = dz / d params``) and each probe a list shaped like ``params``. ``J v``
    is the derivative in ``u`` of ``J^T u`` (two reverse passes, no forward mode) and ``H_z w``
    a reverse pass through the loss's gradient in ``z``; every pass keeps its graph.
    """
    params = list(params)
    u = torch.zeros_like(outputs, requires_grad=True)
    jt_u = torch.autograd.grad(outputs, params, u, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
    (dloss_dz,) = torch.autograd.grad(loss, outputs, create_graph=True)
    if not used or not dloss_dz.requires_grad:
        # the outputs do not depend on the chosen parameters, or the loss is linear in them
        return loss * 0.0
    total: Tensor | None = None
    for v in probes:
        (jv,) = torch.autograd.grad([jt_u[i] for i in used], u, [v[i] for i in used],
                                    create_graph=True)
        (hjv,) = torch.autograd.grad(dloss_dz, outputs, jv, create_graph=True,
                                     allow_unused=True)
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
    probe, with its graph kept for the penalty's gradient. ``masks`` restricts the norm to the
    entries of sliced blocks."""
    params = list(params)
    total: Tensor | None = None
    for u in probes:
        w = torch.autograd.grad(outputs, params, sqrt_h(u), create_graph=True,
                                allow_unused=True)
        if masks is not None:
            w = tuple(g if g is None or m is None else g * m.to(g.device, g.dtype)
                      for g, m in zip(w, masks))
        squares = [g.pow(2).sum() for g in w if g is not None]
        q = torch.stack(squares).sum() if squares else outputs.sum() * 0.0
        total = q if total is None else total + q
    assert total is not None
    return total / len(probes)


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
