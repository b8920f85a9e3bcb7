"""A multilayer perceptron that flattens its input.

Example:
    >>> import torch
    >>> from hesslens.zoo.mlp import mlp
    >>> _ = torch.manual_seed(0)
    >>> model = mlp((1, 40), num_classes=10, hidden=(32,))
    >>> model(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from hesslens.zoo._checks import check_input_shape, check_int_tuple, check_positive_int


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` per hidden width, then a linear classifier.

    Attributes:
        features: ``nn.Sequential`` of ``Flatten`` and the hidden ``Linear``/``ReLU`` pairs
            (weight layers at ``features.1``, ``features.3``, ...).
        classifier: the last ``nn.Linear``, hidden width (or input size) -> ``num_classes``.

    ``hidden=()`` gives multinomial logistic regression.

    >>> MLP((8,), 3, hidden=(4,)).classifier
    Linear(in_features=4, out_features=3, bias=True)
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 64)
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape, "mlp")
        num_classes = check_positive_int(num_classes, "num_classes")
        widths = check_int_tuple(hidden, "hidden", allow_empty=True)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.input_shape = shape
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(N, *input_shape)`` to logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 64)) -> MLP:
    """Build an :class:`MLP` for inputs of ``input_shape`` (any number of dims; flattened).

    >>> sum(p.numel() for p in mlp((4,), 2, hidden=(3,)).parameters())
    23
    """
    return MLP(input_shape, num_classes, hidden)


def mlp5(input_shape: Sequence[int], num_classes: int, width: int = 64) -> MLP:
    """A deeper :class:`MLP`: five hidden ``Linear -> ReLU`` layers of ``width`` and the
    classifier (six weight layers, so that "the middle layers" are more than one).

    >>> len([m for m in mlp5((1, 40), 10).modules() if isinstance(m, torch.nn.Linear)])
    6
    """
    return MLP(input_shape, num_classes, (width,) * 5)

