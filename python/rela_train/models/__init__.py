"""Backbones for the reference trainer and the prior models."""

from rela_train.models.resnet import (
    RESNET_ARCHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    resnet_feature_dim,
)

__all__ = [
    "RESNET_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "build_resnet",
    "resnet_feature_dim",
]
