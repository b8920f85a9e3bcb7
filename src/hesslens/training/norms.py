"""Normalisation layers whose fused kernels give wrong third derivatives, and a way around them.

The Hessian-trace penalty's gradient is a third derivative of the loss. PyTorch's fused
``native_batch_norm`` (BatchNorm in training mode, InstanceNorm) and ``native_layer_norm``
compute first and second derivatives correctly, but their double-backward formulas take the
batch mean and inverse standard deviation as saved tensors without autograd history, so a third
derivative treats them as constants and comes out wrong without an error (pytorch/pytorch#186256
for batch norm, #175754 for layer norm; later PyTorch versions raise an error instead). GroupNorm
and RMSNorm are not affected; BatchNorm in eval mode (running statistics, an affine map) is not
either.

:func:`fused_norms_in_graph` finds such nodes in a loss's autograd graph, and
:class:`DecomposedNorms` is a ``TorchFunctionMode`` under which ``F.batch_norm`` (batch
statistics), ``F.instance_norm`` and ``F.layer_norm`` are computed from primitive operations
(mean, variance, ``rsqrt``), whose derivatives of every order are right.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    >>> x = torch.randn(8, 3)
    >>> fused_norms_in_graph(net(x).sum())
    ['NativeBatchNormBackward0']
    >>> with DecomposedNorms():
    ...     out = net(x)
    >>> fused_norms_in_graph(out.sum()), torch.allclose(out, net(x), atol=1e-5)
    ([], True)
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DecomposedNorms", "fused_norms_in_graph"]


def fused_norms_in_graph(loss: Tensor) -> list[str]:
    """Names of the autograd nodes behind ``loss`` whose third derivatives PyTorch gets wrong.

    Batch-norm nodes that normalise with running statistics (eval mode) are left out.
    """
    found: list[str] = []
    root = loss.grad_fn
    if root is None:
        return found
    stack, seen = [root], {id(root)}
    while stack:
        node = stack.pop()
        name = node.name()
        if "LayerNorm" in name or (
            "BatchNorm" in name and getattr(node, "_saved_training", True) is not False
        ):
            found.append(name)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return sorted(set(found))


def _affine(out: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _normalise(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).pow(2).mean(dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1,
                eps: float = 1e-5) -> Tensor | None:
    if not training and running_mean is not None and running_var is not None:
        return None  # running statistics: the fused kernel is an affine map, exact
    shape = [1, -1] + [1] * (input.dim() - 2)
    dims = (0, *range(2, input.dim()))
    out = _normalise(input, dims, eps)
    if running_mean is not None and running_var is not None:
        # Keep the module's running statistics as the fused kernel would.
        with torch.no_grad():
            n = input.numel() // input.shape[1]
            flat = input.detach().transpose(0, 1).reshape(input.shape[1], -1)
            m = 0.1 if momentum is None else momentum
            running_mean.mul_(1 - m).add_(flat.mean(1), alpha=m)
            running_var.mul_(1 - m).add_(flat.var(1, unbiased=True) if n > 1
                                         else flat.var(1, unbiased=False), alpha=m)
    return _affine(out, weight, bias, shape)


def _instance_norm(input: Tensor, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, weight: Tensor | None = None,
                   bias: Tensor | None = None, use_input_stats: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor | None:
    if not use_input_stats:
        return None
    shape = [1, -1] + [1] * (input.dim() - 2)
    out = _normalise(input, tuple(range(2, input.dim())), eps)
    return _affine(out, weight, bias, shape)


def _layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    k = len(tuple(normalized_shape)) if not isinstance(normalized_shape, int) else 1
    out = _normalise(input, tuple(range(input.dim() - k, input.dim())), eps)
    shape = list(input.shape[input.dim() - k:])
    return _affine(out, weight, bias, shape)


_REPLACEMENTS = {
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _layer_norm,
}
_SIGNATURES = {f: inspect.signature(f) for f in _REPLACEMENTS}


class DecomposedNorms(TorchFunctionMode):
    """Evaluate batch, instance and layer normalisation from primitive operations.

    Inside ``with DecomposedNorms():`` a forward pass computes the same function, but its
    autograd graph has derivatives of every order right (see the module docstring). It is slower
    than the fused kernels, so hesslens uses it only where a third derivative is taken.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        replacement = _REPLACEMENTS.get(func)
        if replacement is not None:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
            out = replacement(*bound.args, **bound.kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
