"""ResNets whose state-dict keys match torchvision's, so its checkpoints load unchanged.

Key layout: ``conv1, bn1, layer1..layer4`` (blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and
``downsample.0`` (1x1 conv) / ``downsample.1`` (BN)), ``fc``. Bottleneck blocks stride in the 3x3
convolution (the "ResNet v1.5" variant torchvision ships).

Two options make the same family useful beyond ImageNet:

* ``small_images=True`` swaps the 7x7/2 stem and the max-pool for a 3x3/1 convolution, the usual
  stem for 28-32 px images (CIFAR, Fashion-MNIST); the keys stay the same.
* ``width`` sets the channels of the first stage (64 in the standard nets; stages double it), so
  ``build_resnet("resnet18", small_images=True, width=16)`` trains on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "RESNET_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "resnet_feature_dim",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """Convolution + BN layers (``conv1, bn1, conv2, bn2, ...``) with a ReLU between them, on a
    residual connection. ``LAYERS`` gives each convolution's kernel size and whether it carries
    the block's stride; the last one widens to ``channels * expansion``. The layers are made in
    key order, so the initialisation draws the same numbers as a block written out by hand."""

    LAYERS: tuple[tuple[int, bool], ...]
    expansion: int

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        widths = [in_channels] + [channels] * (len(self.LAYERS) - 1) + [out_channels]
        # Looked up by name at each use, not held: converting to SyncBatchNorm swaps the modules.
        self.layer_names = tuple((f"conv{i}", f"bn{i}") for i in range(1, len(self.LAYERS) + 1))
        for (conv_name, bn_name), (kernel, strided), c_in, c_out in zip(
            self.layer_names, self.LAYERS, widths[:-1], widths[1:], strict=True
        ):
            make = _conv3x3 if kernel == 3 else _conv1x1
            self.add_module(conv_name, make(c_in, c_out, stride if strided else 1))
            self.add_module(bn_name, nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return getattr(self, self.layer_names[-1][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for position, (conv_name, bn_name) in enumerate(self.layer_names):
            if position > 0:
                out = self.relu(out)  # between the layers, not after the last
            out = getattr(self, bn_name)(getattr(self, conv_name)(out))
        return self.relu(out + identity)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions with a residual connection (ResNet-10/18/34)."""

    LAYERS = ((3, True), (3, False))
    expansion = 1


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

    LAYERS = ((1, False), (3, True), (1, False))
    expansion = 4


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut where the shape changes (keys ``downsample.0`` / ``downsample.1``)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


Block = type[BasicBlock] | type[Bottleneck]

# name -> (block, blocks per stage)
RESNET_ARCHS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet10": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """A ResNet backbone, with a linear classifier ``fc`` when ``num_classes > 0``.

    ``features(x)`` gives the globally average-pooled features ``[B, feature_dim]``; ``forward``
    applies ``fc`` to them, or returns them unchanged when ``num_classes == 0`` (no ``fc``
    parameters exist then).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        num_classes: int = 0,
        small_images: bool = False,
        width: int = 64,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"ResNet: layers must be 4 positive block counts, got {layers}")
        if width < 1 or num_classes < 0 or in_channels < 1:
            raise ValueError(
                f"ResNet: need width >= 1, num_classes >= 0, in_channels >= 1; got width={width}, "
                f"num_classes={num_classes}, in_channels={in_channels}"
            )
        self.small_images = small_images
        self.width = width
        if small_images:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        stages = []
        for index, blocks in enumerate(layers):
            stage_channels = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [block(channels, stage_channels, stride)]
            channels = stage_channels * block.expansion
            stage += [block(channels, stage_channels) for _ in range(int(blocks) - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else None
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init for ReLU networks, scaled by fan-out as is customary for ResNets.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            # Each block starts as the identity: helps large-batch training.
            for module in self.modules():
                if isinstance(module, _ResidualBlock):
                    nn.init.zeros_(module.last_bn().weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return x if self.fc is None else self.fc(x)


def build_resnet(
    arch: str,
    *,
    small_images: bool = False,
    width: int = 64,
    num_classes: int = 0,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    """A ResNet by name (``resnet10/18/34/50/101/152``); see :class:`ResNet` for the options.

    ``feature_dim`` is ``8 * width`` for BasicBlock nets and ``32 * width`` for Bottleneck nets
    (512 and 2048 at the standard width 64).
    """
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; known: {', '.join(RESNET_ARCHS)}")
    block, layers = RESNET_ARCHS[arch]
    return ResNet(
        block,
        layers,
        num_classes=num_classes,
        small_images=small_images,
        width=width,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )


def resnet_feature_dim(arch: str, width: int = 64) -> int:
    """The width of :func:`build_resnet`'s features without building the network."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; known: {', '.join(RESNET_ARCHS)}")
    block, _ = RESNET_ARCHS[arch]
    return 8 * width * block.expansion
