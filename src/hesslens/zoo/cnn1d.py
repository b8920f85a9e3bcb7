"""1-D convolutional networks for MNIST-1D signals.

:func:`cnn1d` is a small two-convolution network (kernel 5 throughout); :func:`cnn1d3` is the
network of the MNIST-1D paper (Greydanus 2020, ``mnist1d`` repository): three convolutions of
25 channels, ``Conv1d(1, 25, 5, 2, 1) -> Conv1d(25, 25, 3, 2, 1) -> Conv1d(25, 25, 3, 2, 1)``,
ReLU after each, and ``Linear(125, 10)``.

Example:
    >>> import torch
    >>> from hesslens.zoo.cnn1d import cnn1d, cnn1d3
    >>> _ = torch.manual_seed(0)
    >>> model = cnn1d((1, 40), num_classes=10)
    >>> model(torch.zeros(4, 1, 40)).shape
    torch.Size([4, 10])
    >>> cnn1d((40,), 10)(torch.zeros(4, 40)).shape  # 1-D input_shape: (N, 40) batches
    torch.Size([4, 10])
    >>> cnn1d3((1, 40), 10).classifier
    Linear(in_features=125, out_features=10, bias=True)
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


def _conv_out(length: int, kernel: int = KERNEL, padding: int = PADDING) -> int:
    return (length + 2 * padding - kernel) // STRIDE + 1


def _per_layer(values: Sequence[int] | None, default: Sequence[int], what: str,
               minimum: int = 1) -> tuple[int, ...]:
    """One int >= ``minimum`` per convolution (``default`` when ``values`` is None)."""
    if values is None:
        return tuple(default)
    if isinstance(values, str) or not isinstance(values, Sequence) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise HesslensInputError(
            f"{what} must be a tuple of integers >= {minimum}, got {values!r}")
    if len(values) != len(default):
        raise HesslensInputError(
            f"{what} must give one value per convolution ({len(default)}), got {tuple(values)!r}")
    return tuple(int(v) for v in values)


class CNN1D(nn.Module):
    """``Conv1d(kernel, stride 2, padding) -> ReLU`` per channel count, then a linear layer.

    With the default kernels (5) and paddings (2) each convolution halves the length (40 -> 20
    -> 10 with the default two layers).

    Attributes:
        features: ``nn.Sequential`` of the ``Conv1d``/``ReLU`` pairs (``features.0``,
            ``features.2``, ...).
        classifier: ``nn.Linear`` from the flattened feature map to ``num_classes``.

    A model built with a 1-D ``input_shape`` ``(L,)`` takes ``(N, L)`` batches; one built with
    ``(C, L)`` takes ``(N, C, L)``. A 2-D batch is always read as one channel.

    >>> CNN1D((1, 40), 10).classifier
    Linear(in_features=320, out_features=10, bias=True)
    >>> CNN1D((1, 40), 10, channels=(8, 8), kernels=(5, 3), paddings=(1, 1)).classifier
    Linear(in_features=80, out_features=10, bias=True)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernels: Sequence[int] | None = None,
        paddings: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        shape = check_input_shape(input_shape, "cnn1d", ndims=(1, 2))
        num_classes = check_positive_int(num_classes, "num_classes")
        widths = check_int_tuple(channels, "channels")
        ks = _per_layer(kernels, (KERNEL,) * len(widths), "kernels")
        pads = _per_layer(paddings, (PADDING,) * len(widths), "paddings", minimum=0)
        in_channels, length = (1, shape[0]) if len(shape) == 1 else shape
        layers: list[nn.Module] = []
        for c, k, p in zip(widths, ks, pads):
            out_length = _conv_out(length, k, p)
            if out_length < 1:
                raise HesslensInputError(
                    f"cnn1d: input length {shape[-1]} is too short for {len(widths)} "
                    f"convolutions of kernels {ks} (stride {STRIDE}, paddings {pads}); use fewer "
                    "channels entries or longer signals")
            layers += [nn.Conv1d(in_channels, c, k, stride=STRIDE, padding=p), nn.ReLU()]
            in_channels, length = c, out_length
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


def cnn1d3(input_shape: Sequence[int], num_classes: int, width: int = 25) -> CNN1D:
    """The MNIST-1D paper's CNN: three convolutions of ``width`` channels (kernels 5, 3, 3;
    stride 2; padding 1) and a linear classifier; 40 -> 19 -> 10 -> 5 in length.

    >>> sum(p.numel() for p in cnn1d3((1, 40), 10).parameters())
    5210
    """
    width = check_positive_int(width, "width")
    return CNN1D(input_shape, num_classes, (width,) * 3, kernels=(5, 3, 3), paddings=(1, 1, 1))
