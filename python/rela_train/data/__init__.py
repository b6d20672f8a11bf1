"""Datasets for the reference trainer."""

from rela_train.data.folder import (
    IMAGE_EXTENSIONS,
    EvalTransform,
    ImageFolder,
    Sample,
    fingerprint,
    list_images,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "EvalTransform",
    "ImageFolder",
    "Sample",
    "fingerprint",
    "list_images",
]
