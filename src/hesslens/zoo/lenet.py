"""LeNet-5 (two convolutions, three linear layers: five weight layers, as in the paper).

Sizing rule, so that one definition serves 8x8 digits, 28x28 MNIST and 32x32 CIFAR:

* ``conv1`` (6 filters, 5x5) is unpadded on inputs of at least 32x32 (the classic network) and
  padded by 2 ("same") on smaller ones, so 28x28 MNIST runs exactly like the classic 32x32
  LeNet on padded digits (28 -> 28 -> 14 -> 10 -> 5);
* ``conv2`` (16 filters, 5x5) is unpadded when its input is at least 10x10 and padded by 2
  otherwise (8x8 digits: 8 -> 8 -> 4 -> 4 -> 2);
* each 2x2 max-pool is skipped on a side shorter than 2;
* ``fc1`` takes the flattened ``16 x h x w`` map whatever its size, then 120 -> 84 -> classes.

ReLU activations and max-pooling (the modern variant; no dropout).

Example:
    >>> import torch
    >>> from hesslens.zoo.lenet import lenet5
    >>> _ = torch.manual_seed(0)
    >>> model = lenet5((3, 32, 32), num_classes=10)
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> model.fc1.in_features
    400
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hesslens.zoo._checks import check_input_shape, check_positive_int


def _conv_pool(size: int, padding: int) -> tuple[int, bool]:
    """Side after a 5x5 conv with ``padding`` and a 2x2 pool; whether the pool applies."""
    size = size + 2 * padding - 4
    return (size // 2, True) if size >= 2 else (size, False)


def _pool(applies: tuple[bool, bool]) -> nn.Module:
    if all(applies):
        return nn.MaxPool2d(2)
    if not any(applies):
        return nn.Identity()
    return nn.MaxPool2d(tuple(2 if a else 1 for a in applies))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; see the module docstring for the sizing rule.

    Attributes:
        conv1, pool1, conv2, pool2: the feature extractor (``pool*`` may be ``Identity``).
        fc1, fc2, fc3: the classifier, ``16*h*w -> 120 -> 84 -> num_classes``.

    >>> LeNet5((1, 8, 8), 10).fc1.in_features
    64
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = check_input_shape(input_shape, "lenet", ndims=(3,))
        num_classes = check_positive_int(num_classes, "num_classes")
        pad1 = 0 if min(height, width) >= 32 else 2
        (h1, ph1), (w1, pw1) = _conv_pool(height, pad1), _conv_pool(width, pad1)
        pad2 = 0 if min(h1, w1) >= 10 else 2
        (h2, ph2), (w2, pw2) = _conv_pool(h1, pad2), _conv_pool(w1, pad2)
        self.input_shape = (channels, height, width)
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=pad1)
        self.pool1 = _pool((ph1, pw1))
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.pool2 = _pool((ph2, pw2))
        self.fc1 = nn.Linear(16 * h2 * w2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = self.pool1(self.relu(self.conv1(x)))
        x = self.pool2(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def lenet5(input_shape: Sequence[int], num_classes: int) -> LeNet5:
    """Build a :class:`LeNet5` for images of shape ``(C, H, W)``.

    >>> lenet5((1, 28, 28), 10).fc1.in_features
    400
    """
    return LeNet5(input_shape, num_classes)
