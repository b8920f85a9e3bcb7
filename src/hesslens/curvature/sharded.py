"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): finite-difference Hessian
products through the sharded model, and the named error the other operators give.

Double backward through FSDP2 fails (pytorch/pytorch#172543), and the operators' functional
calls cannot replace parameters that FSDP2 all-gathers in its own hooks. A finite-difference
product needs gradients only, so :class:`ShardedHessian` computes

    ``D(h) = (g(θ + h v) - g(θ - h v)) / 2h``,   ``H v ≈ (4 D(h/2) - D(h)) / 3``

by moving each rank's shard of the parameters in place (``θ_local += h v_local``), running the
model's own forward and backward (FSDP2 all-gathers the parameters and reduce-scatters the
gradients), and all-gathering the gradient shards. Vectors are full-length and the same on every
rank (one full-parameter gather per gradient), so every algorithm of :mod:`hesslens.linalg`
works on it unchanged. The product is :func:`hesslens.curvature.products.richardson_hvp`, the
same finite difference as the operators' ``path="fd"``: its step search (halving until ``D(h)``
and ``D(h/2)`` agree) and its fallback for ReLU kinks included, learned once per operator.

Data: as the data-parallel operators, ``data`` is this rank's shard (a batch or a list of
batches); the operator is the Hessian of the mean loss over every rank's samples. FSDP2's
gradient is the mean over ranks (its default division by the world size), so each rank weights
its batch ``b`` by ``n_b * world / N``. Every rank runs the same number of forward passes (its
collectives must match): a rank with fewer batches repeats its first one with weight zero.

Verified (tests/curvature/test_sharded_fsdp2.py, 2 gloo CPU processes, torch 2.13): products,
the top eigenvalue and a Hutchinson trace equal the dense float64 Hessian of all the data, with
uneven shards. Not supported: parameters that FSDP2 does not manage (their gradients would not
be summed: named error), BatchNorm in training mode (products run in eval mode).

Example:
    >>> from torch import nn
    >>> is_fsdp2(nn.Linear(2, 2))
    False
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hesslens.curvature import products
from hesslens.errors import HesslensInputError

__all__ = ["ShardedHessian", "check_not_fsdp2", "is_fsdp2"]


def _is_dtensor(t: Any) -> bool:
    # a DTensor exists only once torch.distributed.tensor is imported (FSDP2 imports it); it
    # is not imported here, since it alone takes over a second of every start-up
    tensors = sys.modules.get("torch.distributed.tensor")
    return tensors is not None and isinstance(t, tensors.DTensor)


def is_fsdp2(model: Any) -> bool:
    """Whether ``model`` has parameters sharded by FSDP2 (DTensor parameters)."""
    params = getattr(model, "parameters", None)
    return callable(params) and any(_is_dtensor(p) for p in params())


def check_not_fsdp2(model: Any) -> None:
    """Refuse an FSDP2-sharded model by name (the operators' functional products cannot run
    through it), pointing to :class:`ShardedHessian`."""
    if is_fsdp2(model):
        raise HesslensInputError(
            "the model is sharded with FSDP2 (fully_shard: DTensor parameters), through which "
            "double backward fails (pytorch/pytorch#172543) and functional calls cannot replace "
            "the parameters; use hesslens.curvature.sharded.ShardedHessian(model, loss_fn, "
            "shard), finite-difference products that need gradients only")


class ShardedHessian:
    """The Hessian of the mean loss of an FSDP2 model as a
    :class:`~hesslens.linalg.operator.SymmetricOperator` (finite-difference products).

    Args:
        model: a module sharded with ``fully_shard`` (every trainable parameter a DTensor).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        data: this rank's ``(inputs, targets)`` batch, or a list of them.
        group: the process group the data is spread over (default: the world).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any,
                 group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise HesslensInputError(
                "ShardedHessian needs torch.distributed initialised (an FSDP2 model)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        plain = [n for n, p in named if not _is_dtensor(p)]
        if not named or plain:
            raise HesslensInputError(
                f"ShardedHessian needs every trainable parameter sharded by fully_shard; "
                f"{plain[:5] or 'none'} are not (their gradients would not be summed over the "
                "ranks): apply fully_shard to the root module too")
        if loss_fn is None or not callable(loss_fn):
            raise HesslensInputError("loss_fn must be callable: loss_fn(outputs, targets)")
        batches = [data] if isinstance(data, tuple) and len(data) == 2 and isinstance(
            data[1], Tensor) else list(data)
        if not batches or any(not (isinstance(b, (tuple, list)) and len(b) == 2)
                              for b in batches):
            raise HesslensInputError(
                "data must be an (inputs, targets) batch or a non-empty list of them")
        self.model, self.loss_fn, self.group = model, loss_fn, group
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.batches = batches
        self.world = dist.get_world_size(group)
        local = torch.tensor([float(sum(len(b[1]) for b in batches)), float(len(batches))],
                             dtype=torch.float64, device=self.params[0].to_local().device)
        total, longest = local.clone(), local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
        self.num_samples = int(total[0])
        self._passes = int(longest[1])
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].to_local().device
        self.n_products = 0
        self.fd_scale = products.StepScale()  # the step learned by the first products

    def __repr__(self) -> str:
        return (f"ShardedHessian(dim={self.dim}, num_samples={self.num_samples}, "
                f"world={self.world})")

    # ------------------------------------------------------------------ products
    def matmat(self, V: Tensor) -> Tensor:
        """``H V[i]`` for every row of the ``(k, dim)`` batch ``V`` (the same on every rank)."""
        if V.ndim != 2 or V.shape[1] != self.dim:
            raise HesslensInputError(
                f"matmat expects a (k, {self.dim}) batch of row vectors, got {tuple(V.shape)}")
        return torch.stack([self._product(v.to(self.device, self.dtype)) for v in V])

    def hvp(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector, or a ``(k, dim)`` batch."""
        return self.matmat(v.reshape(1, -1))[0] if v.ndim == 1 else self.matmat(v)

    def _local(self, v: Tensor) -> list[Tensor]:
        from torch.distributed.tensor import distribute_tensor  # loaded with FSDP2: see above

        return [distribute_tensor(piece.view(p.shape), p.device_mesh, p.placements,
                                  src_data_rank=None).to_local()
                for piece, p in zip(v.split(self.sizes), self.params)]

    def _theta_norm(self, saved: Sequence[Tensor]) -> float:
        sq = torch.stack([s.double().pow(2).sum() for s in saved]).sum()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        return math.sqrt(float(sq))

    def _gradient_at(self, saved: Sequence[Tensor], v_local: Sequence[Tensor], t: float) -> Tensor:
        """The full gradient of the mean loss over all ranks' data at ``θ + t v`` (float64)."""
        with torch.no_grad():
            for p, s, dv in zip(self.params, saved, v_local):
                p.to_local().copy_(s + t * dv)
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            for i in range(self._passes):
                x, y = self.batches[min(i, len(self.batches) - 1)]
                weight = len(y) * self.world / self.num_samples if i < len(self.batches) else 0.0
                (self.loss_fn(self.model(x), y) * weight).backward()
        return torch.cat([(p.grad.full_tensor() if p.grad is not None
                           else torch.zeros(p.shape, dtype=p.dtype, device=self.device))
                          .reshape(-1).double() for p in self.params])

    def _product(self, v: Tensor) -> Tensor:
        self.n_products += 1
        saved = [p.to_local().detach().clone() for p in self.params]
        grads = [p.grad for p in self.params]
        was_training = self.model.training
        v_local = self._local(v)
        self.model.eval()
        try:
            out = products.richardson_hvp(
                lambda t: [self._gradient_at(saved, v_local, t)], [v],
                theta_norm=self._theta_norm(saved), scale=self.fd_scale)[0]
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.to_local().copy_(s)
            for p, g in zip(self.params, grads):
                p.grad = g
            self.model.train(was_training)
        return out.to(self.dtype)
