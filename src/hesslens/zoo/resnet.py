"""CIFAR-style residual networks: ResNet-20 (He et al. 2016) and ResNet-18.

Both use a 3x3 stem without max-pooling, basic blocks (two 3x3 convolutions with BatchNorm),
global average pooling and one linear layer. Where a block changes the shape (stride 2 or more
channels) the shortcut is a 1x1 convolution with BatchNorm ("option B"); otherwise it is the
identity. Weight layers (Conv2d and Linear):

* ResNet-20: stem + 3 stages x 3 blocks x 2 convs + 2 shortcut convs + fc = 1 + 18 + 2 + 1 = 22
  (the "20" of the name counts the option-A network, which has no shortcut convolutions);
* ResNet-18: stem + 4 stages x 2 blocks x 2 convs + 3 shortcut convs + fc = 1 + 16 + 3 + 1 = 21.

Convolutions have no bias (each is followed by BatchNorm). Stride-2 3x3 convolutions with
padding 1 never shrink a side below 1, so any input size of at least 1x1 runs.

Example:
    >>> import torch
    >>> from hesslens.zoo.resnet import resnet20
    >>> _ = torch.manual_seed(0)
    >>> model = resnet20((3, 32, 32), num_classes=10).eval()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hesslens.zoo._checks import check_input_shape, check_positive_int


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    Attributes:
        conv1, bn1, conv2, bn2: the residual branch (``conv1`` carries the stride).
        shortcut: ``nn.Identity`` or ``nn.Sequential(Conv2d 1x1, BatchNorm2d)``.

    >>> BasicBlock(16, 32, stride=2).shortcut[0]
    Conv2d(16, 32, kernel_size=(1, 1), stride=(2, 2), bias=False)
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet of basic blocks for small images.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of outputs.
        widths: channels of each stage; stage ``i > 0`` starts with a stride-2 block.
        blocks: number of basic blocks in each stage.
        name: the model's name in error messages.

    Attributes:
        conv1, bn1: the 3x3 stem (``widths[0]`` channels, stride 1, no max-pool).
        layer1, layer2, ...: one ``nn.Sequential`` of :class:`BasicBlock` per stage.
        avgpool: global average pooling.
        fc: the linear classifier.

    >>> net = CifarResNet((1, 8, 8), 10, widths=(4, 8), blocks=(1, 1))
    >>> [name for name, _ in net.named_children()]
    ['conv1', 'bn1', 'layer1', 'layer2', 'avgpool', 'flatten', 'fc']
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int],
        blocks: Sequence[int],
        name: str = "resnet",
    ) -> None:
        super().__init__()
        channels, height, width = check_input_shape(input_shape, name, ndims=(3,))
        num_classes = check_positive_int(num_classes, "num_classes")
        self.input_shape = (channels, height, width)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        self.num_stages = len(widths)
        for i, (out_channels, count) in enumerate(zip(widths, blocks, strict=True)):
            stage = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, C, H, W)`` to logits ``(N, num_classes)``."""
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def resnet20(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """Build ResNet-20: 3 stages x 3 basic blocks, 16/32/64 channels, 1x1 conv shortcuts.

    >>> sum(isinstance(m, torch.nn.Conv2d) for m in resnet20((3, 32, 32), 10).modules())
    21
    """
    return CifarResNet(
        input_shape, num_classes, widths=(16, 32, 64), blocks=(3, 3, 3), name="resnet20"
    )


def resnet18(input_shape: Sequence[int], num_classes: int) -> CifarResNet:
    """Build CIFAR ResNet-18: 4 stages x 2 basic blocks, 64/128/256/512 channels.

    >>> sum(isinstance(m, torch.nn.Conv2d) for m in resnet18((3, 32, 32), 10).modules())
    20
    """
    return CifarResNet(
        input_shape,
        num_classes,
        widths=(64, 128, 256, 512),
        blocks=(2, 2, 2, 2),
        name="resnet18",
    )
