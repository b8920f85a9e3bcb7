"""VGG11 for small images (CIFAR style), with or without BatchNorm.

Eight 3x3 convolutions (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M) and a classifier
of three linear layers ``512*h*w -> 512 -> 512 -> num_classes``: 11 weight layers, as the paper
counts VGG11-bn. No dropout (it would make Hessian-vector products random).

A 2x2 max-pool ("M") is skipped on a side already shorter than 2, so tiny inputs still run:
32x32 ends at 1x1 after five pools; 28x28 at 1x1 after four (the fifth is skipped); 8x8 at 1x1
after three. With ``batch_norm=True`` every convolution is followed by ``BatchNorm2d`` and has
no bias of its own (a bias before BatchNorm is cancelled by it and would only add exactly-zero
directions to the Hessian).

Example:
    >>> import torch
    >>> from hesslens.zoo.vgg import vgg11_bn
    >>> _ = torch.manual_seed(0)
    >>> model = vgg11_bn((3, 32, 32), num_classes=10).eval()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hesslens.zoo._checks import check_input_shape, check_positive_int

# fmt: off
VGG11_CONFIG: tuple[int | str, ...] = (
    64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M",
)
# fmt: on
CLASSIFIER_WIDTH = 512


class VGG(nn.Module):
    """A VGG network from a layer configuration (ints: conv widths, ``"M"``: max-pool).

    ``name`` is the model's name in error messages.

    Attributes:
        features: ``nn.Sequential`` of ``Conv2d [-> BatchNorm2d] -> ReLU`` blocks and pools.
        classifier: ``nn.Sequential`` of ``Linear -> ReLU -> Linear -> ReLU -> Linear``.

    >>> VGG((1, 8, 8), 10, config=(8, "M", 16, "M")).classifier[0]
    Linear(in_features=64, out_features=512, bias=True)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        config: Sequence[int | str] = VGG11_CONFIG,
        batch_norm: bool = False,
        classifier_width: int = CLASSIFIER_WIDTH,
        name: str = "vgg",
    ) -> None:
        super().__init__()
        channels, height, width = check_input_shape(input_shape, name, ndims=(3,))
        num_classes = check_positive_int(num_classes, "num_classes")
        classifier_width = check_positive_int(classifier_width, "classifier_width")
        self.input_shape = (channels, height, width)
        layers: list[nn.Module] = []
        for item in config:
            if item == "M":
                kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
                if kernel != (1, 1):
                    layers.append(nn.MaxPool2d(kernel))
                    height, width = height // kernel[0], width // kernel[1]
                continue
            out = check_positive_int(item, "each conv width in config")
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(channels * height * width, classifier_width),
            nn.ReLU(),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(),
            nn.Linear(classifier_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        return self.classifier(self.flatten(self.features(x)))


def vgg11(input_shape: Sequence[int], num_classes: int, batch_norm: bool = False) -> VGG:
    """Build VGG11 (8 conv + 3 linear weight layers) for images of shape ``(C, H, W)``.

    >>> sum(isinstance(m, torch.nn.Conv2d) for m in vgg11((1, 28, 28), 10).modules())
    8
    """
    return VGG(input_shape, num_classes, VGG11_CONFIG, batch_norm=batch_norm, name="vgg11")


def vgg11_bn(input_shape: Sequence[int], num_classes: int) -> VGG:
    """Build VGG11 with BatchNorm after every convolution (the paper's VGG11-bn).

    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg11_bn((3, 32, 32), 10).modules())
    8
    """
    return VGG(input_shape, num_classes, VGG11_CONFIG, batch_norm=True, name="vgg11_bn")
