r"""Sharpness-aware minimization (SAM; Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021).

SAM minimises ``max_{||e|| <= rho} L(w + e)`` with the first-order solution
``e(w) = rho * g / ||g||``, ``g = grad L(w)``. Each step takes two gradients on the same batch:

1. ``loss(w).backward(); opt.first_step()`` moves the weights to ``w + e(w)`` (ascent);
2. ``loss(w + e).backward(); opt.second_step()`` puts the weights back to ``w`` and lets the base
   optimizer step with the gradient taken at ``w + e``.

So a SAM step costs two forward and two backward passes, about twice an SGD step.

``adaptive=True`` gives ASAM (Kwon et al. 2021): ``e = rho * T^2 g / ||T g||`` with
``T = |w|`` elementwise.

BatchNorm. The second forward pass runs at perturbed weights; if it updated the running mean
and variance, the statistics kept for evaluation would mix in activations of weights that are
never used. Wrap the second pass in :func:`bn_stats_frozen`: the BatchNorm layers still
normalise with the batch statistics (train mode, as in the first pass, so both gradients see the
same function), but their running statistics and ``num_batches_tracked`` are restored on exit,
so after a SAM step they are exactly what one ordinary training forward pass leaves.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> loss_fn = nn.functional.cross_entropy
    >>> loss_fn(model(x), y).backward()
    >>> opt.first_step(zero_grad=True)
    >>> with bn_stats_frozen(model):
    ...     loss_fn(model(x), y).backward()
    >>> opt.second_step(zero_grad=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from hesslens.errors import HesslensInputError

__all__ = ["SAM", "bn_stats_frozen"]


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Within the block, normalisation layers' running statistics are not changed.

    Saves ``running_mean``, ``running_var`` and ``num_batches_tracked`` of every BatchNorm (and
    InstanceNorm with tracked stats) module and restores them on exit, in place (tensors keep
    their identity, so optimizers and hooks holding them are unaffected). The forward pass itself
    is unchanged: in train mode the layers still normalise with batch statistics.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(m, name, None)
                if isinstance(buf, torch.Tensor):
                    saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in saved:
                buf.copy_(old)


class SAM(torch.optim.Optimizer):
    """SAM around any base optimizer.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer: the optimizer class (e.g. ``torch.optim.SGD``); it is built over this
            optimizer's parameter groups with ``**kwargs``.
        rho: radius of the ascent step (``> 0``; 0.05 is the usual choice on CIFAR).
        adaptive: ASAM's scale-invariant ascent step.
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    ``first_step`` / ``second_step`` are the two halves; ``step(closure)`` runs both, with
    ``closure`` re-evaluating the loss and calling ``backward()`` (run the closure's forward under
    :func:`bn_stats_frozen` when the model has BatchNorm). A scheduler can wrap either the SAM
    object or ``sam.base_optimizer``: they share the parameter groups, hence the learning rate.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise HesslensInputError(f"SAM's rho must be a positive number, got {rho!r}")
        if not callable(base_optimizer):
            raise HesslensInputError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD"
            )
        defaults = dict(rho=float(rho), adaptive=bool(adaptive), **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad * p.abs() if group["adaptive"] else p.grad
                norms.append(g.norm(p=2))
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + rho g / ||g||`` (remembering ``w``); needs gradients at ``w``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = (p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradient at ``w + e``."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" not in self.state[p]:
                    continue
                p.copy_(self.state[p]["old_p"])
                del self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both halves; ``closure`` must do a full forward-backward pass (and return the loss)."""
        if closure is None:
            raise HesslensInputError(
                "SAM.step needs a closure that recomputes the loss and calls backward(); or call "
                "first_step() and second_step() around your own second forward-backward pass"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers ...); ``old_p`` is transient."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
