"""Dense float64 references for tests: Hessians, Gauss-Newton matrices and the tiny models
the curvature tests run on."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def flat_functions(model: nn.Module, names: list[str], bn: str = "eval"):
    """(flat parameter vector, f(flat, x) -> outputs) for the trainable ``names`` of a float64
    copy of ``model``; BatchNorm in eval mode (``bn="eval"``) or on batch statistics."""
    net = copy.deepcopy(model).double()
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            if bn == "eval":
                m.eval()
            else:
                m.train()
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().flatten() for n in names])

    def forward(vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(vec, sizes)
        override = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        fixed = {n: p.detach() for n, p in params.items() if n not in override}
        return torch.func.functional_call(net, ({**fixed, **override}, buffers), (x,))

    return flat, forward


def dense_hessian(model, loss_fn, batches, names, bn: str = "eval") -> torch.Tensor:
    """The Hessian of the size-weighted mean loss over ``batches``, float64."""
    flat, forward = flat_functions(model, names, bn)
    total = sum(len(y) for _, y in batches)

    def loss(vec):
        return sum(
            loss_fn(forward(vec, x.double()), y) * (len(y) / total) for x, y in batches
        )

    if bn == "batch":
        # torch.func.hessian (vmapped forward-over-reverse) disagrees with autograd for
        # BatchNorm on batch statistics (seen with torch 2.13: max error 0.28 on a 5-8-3 net),
        # while autograd, jvp-of-grad and double backward agree: use plain autograd here.
        return torch.autograd.functional.hessian(loss, flat)
    return torch.func.hessian(loss)(flat)


def dense_gauss_newton(model, loss_fn, batches, names, bn: str = "eval") -> torch.Tensor:
    """``sum_b w_b J_b^T H_out,b J_b`` in float64."""
    flat, forward = flat_functions(model, names, bn)
    total = sum(len(y) for _, y in batches)
    G = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for x, y in batches:
        x = x.double()
        out = forward(flat, x)
        J = torch.func.jacrev(lambda v, x=x: forward(v, x))(flat).reshape(out.numel(), -1)
        H_out = torch.func.hessian(lambda o, y=y, shape=out.shape: loss_fn(o.view(shape), y))(
            out.flatten().detach())
        G += (len(y) / total) * J.T @ H_out @ J
    return G


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(),
                         nn.Linear(8, 4))


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 2), nn.Softplus(),
        nn.Flatten(), nn.Linear(4, 3),
    )


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.train()


def frozen_model(seed: int = 0) -> nn.Module:
    """A parameter-free module in the middle and a frozen parameter."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Identity(), nn.Linear(6, 5),
                          nn.Tanh(), nn.Linear(5, 3))
    model[3].bias.requires_grad_(False)
    return model


def classification_batches(x_shape, n=(7, 5, 3), classes=3, seed=0):
    """Uneven batches of random inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, *x_shape, generator=g), torch.randint(0, classes, (k,), generator=g))
            for k in n]
