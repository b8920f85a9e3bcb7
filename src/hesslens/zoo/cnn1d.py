"""A small 1-D convolutional network for MNIST-1D signals.

Example:
    >>> import torch
    >>> from hesslens.zoo.cnn1d import cnn1d
    >>> _ = torch.manual_seed(0)
    >>> model = cnn1d((1, 40), num_classes=10)
    >>> model(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
    >>> cnn1d((40,), 10)(torch.zeros(4, 40)).shape  # 1-D input_shape: (N, 40) batches
    torch.Size([4, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.zoo._checks import check_input_shape, check_int_tuple, check_positive_int

KERNEL = 5
STRIDE = 2
PADDING = 2


def _conv_out(length: int) -> int:
    return (length + 2 * PADDING - KERNEL) // STRIDE + 1


class CNN1D(nn.Module):
    """``Conv1d(kernel 5, stride 2, padding 2) -> ReLU`` per channel count, then a linear layer.

    Each convolution halves the length (40 -> 20 -> 10 with the default two layers).

    Attributes:
        features: ``nn.Sequential`` of the ``Conv1d``/``ReLU`` pairs (``features.0``,
            ``features.2``, ...).
        classifier: ``nn.Linear`` from the flattened feature map to ``num_classes``.

    A model built with a 1-D ``input_shape`` ``(L,)`` takes ``(N, L)`` batches; one built with
    ``(C, L)`` takes ``(N, C, L)``. A 2-D batch is always read as one channel.

    >>> CNN1D((1, 40), 10).classifier
    Linear(in_features=320, out_features=10, bias=True)
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape, "cnn1d", ndims=(1, 2))
        num_classes = check_positive_int(num_classes, "num_classes")
        widths = check_int_tuple(channels, "channels")
        in_channels, length = (1, shape[0]) if len(shape) == 1 else shape
        layers: list[nn.Module] = []
        for c in widths:
            layers += [nn.Conv1d(in_channels, c, KERNEL, stride=STRIDE, padding=PADDING), nn.ReLU()]
            in_channels, length = c, _conv_out(length)
        self.input_shape = shape
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(in_channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, L)`` or ``(N, C, L)`` to logits ``(N, num_classes)``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        elif x.dim() != 3:
            raise HesslensInputError(
                f"cnn1d expects a batch of shape (N, L) or (N, C, L), got {tuple(x.shape)}"
            )
        return self.classifier(self.flatten(self.features(x)))


def cnn1d(
    input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)
) -> CNN1D:
    """Build a :class:`CNN1D` for signals of shape ``(L,)`` or ``(C, L)``.

    >>> len(cnn1d((1, 40), 10, channels=(8, 8, 8)).features)
    6
    """
    return CNN1D(input_shape, num_classes, channels)
