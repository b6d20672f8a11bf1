"""Datasets for the reference trainer."""

from rela_train.data import folder
from rela_train.data.folder import (  # noqa: F401 (re-exported)
    IMAGE_EXTENSIONS,
    EvalTransform,
    ImageFolder,
    Sample,
    fingerprint,
    list_images,
)

__all__ = folder.__all__
