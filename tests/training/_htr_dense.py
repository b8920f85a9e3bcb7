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


def _flat_layout(model: nn.Module):
    """Names, shapes, sizes, the flat parameter vector and the offsets of each parameter in it."""
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    offs = torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()
    return [n for n, _ in named], [p.shape for _, p in named], sizes, theta, offs


class Dense:
    """The model's loss as a function of one flat parameter vector, and its derivatives."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.x, self.y = model, x, y
        self.names, self.shapes, self.sizes, self.theta, offs = _flat_layout(model)
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


def _without_running_stats(model: nn.Module) -> nn.Module:
    """A copy whose batch-statistics BatchNorm layers keep no running statistics: the same
    function of the parameters, with no buffer written during torch.func transforms."""
    import copy

    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return clone


class DenseCurvature:
    """Gauss-Newton and empirical-Fisher traces of a block of chosen parameters, as functions of
    the model's flat parameter vector (float64, dense Jacobians; normalisation written out)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                 chosen: list[str]):
        self.model, self.x, self.y, self.loss_fn = _without_running_stats(model), x, y, loss_fn
        self.names, self.shapes, self.sizes, self.theta, offs = _flat_layout(model)
        self.idx = torch.cat([torch.arange(offs[self.names.index(n)], offs[self.names.index(n) + 1])
                              for n in chosen])

    def _params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def outputs(self, flat: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        from hesslens.training.norms import DecomposedNorms

        with DecomposedNorms():
            return functional_call(self.model, self._params(flat), (self.x if x is None else x,))

    def gauss_newton(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """The block ``J_S^T H_z J_S`` (``n_S x n_S``)."""
        flat = self.theta if flat is None else flat
        z = self.outputs(flat)
        J = torch.func.jacrev(lambda s: self.outputs(flat.index_put((self.idx,), s)))(
            flat[self.idx]).reshape(z.numel(), -1)
        Hz = torch.func.hessian(lambda zz: self.loss_fn(zz.reshape(z.shape), self.y))(
            z.reshape(-1))
        return J.T @ Hz @ J

    def gauss_newton_trace(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        return torch.trace(self.gauss_newton(flat))

    def per_sample_gradients(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, n_S)``: row ``i`` is ``d l_i / d theta_S``, ``l_i`` the loss of sample ``i``
        alone, one sample at a time (no vmap)."""
        flat = self.theta if flat is None else flat
        rows = []
        for i in range(self.x.shape[0]):
            def li(s, i=i):
                out = self.outputs(flat.index_put((self.idx,), s), self.x[i:i + 1])
                return self.loss_fn(out, self.y[i:i + 1])
            rows.append(torch.func.grad(li)(flat[self.idx]))
        return torch.stack(rows)

    def loss_term_gradients(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, n_S)``: row ``i`` is the gradient of the ``i``-th loss term of ONE pass over
        the whole batch (through batch statistics where the model has them)."""
        flat = self.theta if flat is None else flat

        def terms(s):
            out = self.outputs(flat.index_put((self.idx,), s))
            return torch.stack([self.loss_fn(out[i:i + 1], self.y[i:i + 1])
                                for i in range(out.shape[0])])

        return torch.func.jacrev(terms)(flat[self.idx])

    def fisher_trace(self, flat: torch.Tensor | None = None, coupled: bool = False
                     ) -> torch.Tensor:
        g = (self.loss_term_gradients if coupled else self.per_sample_gradients)(flat)
        return (g**2).sum() / g.shape[0]

    def grad_of(self, fn) -> torch.Tensor:
        return torch.func.grad(fn)(self.theta)
