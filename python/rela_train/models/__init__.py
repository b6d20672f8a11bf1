"""Backbones for the reference trainer and the prior models."""

from rela_train.models import resnet
from rela_train.models.resnet import (  # noqa: F401 (re-exported)
    RESNET_ARCHS,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    resnet_feature_dim,
)

__all__ = resnet.__all__
