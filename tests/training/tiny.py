"""The tiny classification problems several training tests share (seeded, CPU, float32)."""

from __future__ import annotations

import torch
from torch import nn

from hesslens.training import TensorData


def three_class_data(n: int = 60, seed: int = 0) -> TensorData:
    """``n`` training and 20 test points in 4 dimensions, 3 classes from two linear rules."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 20, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorData(x[:n], y[:n], x[n:], y[n:], num_classes=3)


def three_class_model(seed: int = 0) -> nn.Module:
    """A 4-6-3 tanh MLP for :func:`three_class_data`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def two_class_data() -> TensorData:
    """36 training and 12 test points in 5 dimensions, labelled by the sign of the first."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] > 0).long()
    return TensorData(x[:36], y[:36], x[36:], y[36:], num_classes=2)


def two_class_model() -> nn.Module:
    """A 5-6-2 tanh MLP for :func:`two_class_data`."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
