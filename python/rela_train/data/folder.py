"""Image folders: a deterministic file listing, its fingerprint, and the evaluation transform.

A dataset is a directory of images, normally one sub-directory per class (ImageNet layout). Every
image below the root is a sample; samples are ordered by their relative POSIX path, so the order
(and with it every row of an embedding store) is the same on every machine and file system. The
fingerprint hashes each relative path and file size: it changes when a file is added, removed,
renamed or replaced by one of another size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rela_train.data.images import UnreadableImage, read_rgb, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "EvalTransform",
    "ImageFolder",
    "Sample",
    "fingerprint",
    "list_images",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the root, POSIX separators
    size: int  # bytes
    label: int  # index of the class directory in sorted order; 0 for images in the root itself


def list_images(root: str | os.PathLike[str]) -> tuple[list[Sample], list[str]]:
    """All images under ``root`` (sorted by relative path) and the sorted class names.

    Hidden files and directories (name starting with ``.``) are skipped. The class of an image is
    the first directory below ``root`` on its path.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found: list[tuple[str, int]] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(directory, name)
            relative = Path(os.path.relpath(full, root)).as_posix()
            found.append((relative, os.stat(full).st_size))
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"image folder {root} contains no images ({extensions})")
    found.sort()
    classes = sorted({path.split("/", 1)[0] for path, _ in found if "/" in path})
    index = {name: i for i, name in enumerate(classes)}
    samples = [
        Sample(path, size, index[path.split("/", 1)[0]] if "/" in path else 0)
        for path, size in found
    ]
    return samples, classes


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over every sample's relative path and size, in order.

    A name that is not valid UTF-8 (kept by Python as lone surrogates) hashes as its raw bytes.
    """
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.path}\0{sample.size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic evaluation preprocessing: resize, center crop, scale to [0, 1], normalise.

    The shorter side is resized to ``resize`` (aspect ratio kept), then the central ``size`` x
    ``size`` square is cropped; channels are normalised with ``mean``/``std`` (on the [0, 1]
    scale). Images of any mode are converted to RGB first.
    """

    size: int
    resize: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 1 or self.resize < self.size:
            raise ValueError(
                f"EvalTransform: need 1 <= size <= resize, got size={self.size}, "
                f"resize={self.resize}"
            )
        if self.interpolation not in _RESAMPLING:
            raise ValueError(
                f"EvalTransform: interpolation must be one of {sorted(_RESAMPLING)}, "
                f"got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"EvalTransform: need 3 means and 3 positive stds, got {self}")

    def describe(self) -> str:
        """A short canonical description (part of a prior's identity in an embedding store)."""
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"resize={self.resize} crop={self.size} {self.interpolation} mean={mean} std={std}"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        width, height = image.size
        scale = self.resize / min(width, height)
        # The shorter side lands exactly on `resize`; the longer one is rounded.
        new_size = (
            (self.resize, max(self.resize, round(height * scale)))
            if width <= height
            else (max(self.resize, round(width * scale)), self.resize)
        )
        if new_size != image.size:
            image = image.resize(new_size, _RESAMPLING[self.interpolation])
        width, height = image.size
        left = int(round((width - self.size) / 2.0))
        top = int(round((height - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        tensor = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return tensor.sub_(mean).div_(std)


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root`` in sorted order; item ``i`` is ``(transform(image_i), i)``.

    Returning the index (not the label) lets consumers write results by sample position.
    """

    def __init__(self, root: str | os.PathLike[str], transform: EvalTransform | None = None):
        self.root = Path(root)
        self.samples, self.classes = list_images(self.root)
        self.transform = transform
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.samples)
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """Image ``index`` as 8-bit RGB (see :func:`rela_train.data.images.to_rgb`).

        Raises:
            UnreadableImage: (a ValueError) the file cannot be read; the message names it.
        """
        return read_rgb(self.root / self.samples[index].path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = self.load(index)
        return (image if self.transform is None else self.transform(image)), index

    def read(self, index: int) -> tuple[torch.Tensor | Image.Image | None, int, str]:
        """``(transformed image, index, "")``, or ``(None, index, reason)`` when the file cannot
        be read: the form every reading path uses to skip an unreadable image."""
        try:
            image, _ = self[index]
        except UnreadableImage as error:
            return None, index, str(error)
        return image, index, ""
