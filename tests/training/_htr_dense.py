"""Dense float64 reference: the Hessian of a small model's loss over its flattened parameters."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import functional_call


def tanh_mlp(widths=(3, 3, 3, 3, 3, 2), seed=0) -> nn.Sequential:
    """Linear/Tanh stack in float64 (smooth, so third and fourth derivatives exist)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).double()


class Dense:
    """The model's loss as a function of one flat parameter vector, and its derivatives."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        offs = torch.cumsum(torch.tensor([0, *self.sizes]), 0).tolist()
        self.slices = {n: slice(offs[i], offs[i + 1]) for i, n in enumerate(self.names)}

    def loss(self, flat: torch.Tensor) -> torch.Tensor:
        parts = flat.split(self.sizes)
        params = {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes)}
        return nn.functional.cross_entropy(functional_call(self.model, params, (self.x,)), self.y)

    def index(self, param_names) -> torch.Tensor:
        return torch.cat([torch.arange(self.slices[n].start, self.slices[n].stop)
                          for n in param_names])

    def hessian(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        return torch.func.hessian(self.loss)(self.theta if flat is None else flat)

    def block(self, idx: torch.Tensor, flat: torch.Tensor | None = None) -> torch.Tensor:
        H = self.hessian(flat)
        return H[idx][:, idx]

    def flat_probe(self, probe, param_names) -> torch.Tensor:
        """A probe given per chosen parameter, as a vector over the chosen block."""
        return torch.cat([v.reshape(-1) for v in probe])

    def grad_of(self, fn) -> torch.Tensor:
        """d fn(theta) / d theta for a scalar function of the flat parameters."""
        return torch.func.grad(fn)(self.theta)

    def model_grad(self) -> torch.Tensor:
        """The .grad of the live model's parameters, flattened in the same order."""
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for _, p in self.model.named_parameters()
        ])
