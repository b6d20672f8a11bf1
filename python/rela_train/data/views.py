"""Random-resized-crop views decoded straight from image files (the paper-scale input pipeline).

Decoding a whole ImageNet JPEG (about 500 x 375 pixels, often much more) only to resize it to
224 px wastes most of the decode, and a fixed center crop before augmentation throws away the
crop distribution over the full image. This module instead draws each view's crop box in the
ORIGINAL image's pixel coordinates (torchvision's RandomResizedCrop distribution, from
:func:`rela_train.data.augment.sample_crop_boxes`), then decodes only as much as those boxes need:

* **Draft mode** (shrink-on-load): a JPEG stores 8 x 8 DCT blocks, and libjpeg can reconstruct
  them at 1/2, 1/4 or 1/8 scale directly in the DCT domain, skipping most of the inverse transform
  and the color upsampling. :func:`decode_views` picks the largest such factor that still leaves
  every view's box at least ``size`` pixels on both sides, so no crop is upsampled more than it
  would be from the full image; the boxes are mapped to the reduced image.
* **Crop before resize**: each view resamples only its box (one Pillow ``resize(box=...)`` call,
  bilinear with antialiasing), never the full image.

The crops of sample ``i`` depend only on ``(seed, epoch, i)``: they come from their own generator
seeded with :func:`stable_seed`, so they are the same whatever the batch composition, worker
count, rank or world size. The photometric half of the augmentation (jitter, grayscale, blur,
solarize) then runs batched on the training device (``Augmenter.photometric``).

``decoder="simplejpeg"`` uses libjpeg-turbo through the ``simplejpeg`` package for JPEG files (its
own DCT scaling, to the same factor draft mode would pick); ``"auto"`` uses it when it is
importable, Pillow otherwise.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rela_train.data.augment import ViewSpec, bernoulli, sample_crop_boxes
from rela_train.data.images import (
    UnreadableImage,
    check_pixel_count,
    open_image,
    read_rgb,
    to_rgb,
)

try:  # optional: faster JPEG decoding (libjpeg-turbo)
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

__all__ = [
    "DECODERS",
    "CropPlan",
    "decode_views",
    "draft_scale",
    "load_rgb",
    "resolve_decoder",
    "stable_seed",
]

DECODERS = ("auto", "pil", "simplejpeg")
_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
# Draft-mode (DCT-domain) downscale factors, largest first.
_DCT_FACTORS = (8, 4, 2, 1)


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across Python processes (unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class CropPlan:
    """How to cut the views of every sample for one epoch.

    Args:
        specs: one view spec per view; only ``crop_scale``, ``crop_ratio`` and ``flip_p`` are
            used here (the photometric fields belong to ``Augmenter.photometric``).
        size: output side of every view, in pixels.
        seed, epoch: with the sample index, the only inputs of a sample's crops.
    """

    specs: tuple[ViewSpec, ...]
    size: int
    seed: int
    epoch: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(self.specs))
        if not self.specs or not all(isinstance(s, ViewSpec) for s in self.specs):
            raise ValueError(f"CropPlan: specs must be one or more ViewSpec, got {self.specs!r}")
        size = self.size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"CropPlan: size must be an integer >= 1, got {size!r}")
        object.__setattr__(self, "size", int(size))

    def generator(self, index: int) -> torch.Generator:
        """The generator of sample ``index``'s crops."""
        return torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, int(index)))

    def draw(self, index: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index``'s crops of a ``height x width`` image.

        Returns float64 boxes ``[V, 4]`` (left, top, width, height in original pixels) and bool
        flips ``[V]``. Draw order: view 0's box, view 0's flip, view 1's box, ...
        """
        g = self.generator(index)
        boxes, flips = [], []
        for spec in self.specs:
            boxes.append(sample_crop_boxes(g, 1, height, width, spec.crop_scale, spec.crop_ratio))
            flips.append(bernoulli(g, 1, spec.flip_p))
        return torch.cat(boxes), torch.cat(flips)


def draft_scale(boxes: torch.Tensor, size: int) -> int:
    """The largest DCT downscale factor (8, 4, 2 or 1) that leaves every box at least ``size``
    pixels wide and high; 1 when a box is already smaller than ``size`` (no extra upsampling)."""
    smallest = float(boxes[:, 2:4].min()) if boxes.numel() else 0.0
    for factor in _DCT_FACTORS:
        if smallest >= size * factor:
            return factor
    return 1


def resolve_decoder(decoder: str) -> str:
    """``"pil"`` or ``"simplejpeg"`` for a ``decoder`` argument; ValueError if unknown or not
    installed."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "simplejpeg" if simplejpeg is not None else "pil"
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ValueError(
            "decoder='simplejpeg' needs the simplejpeg package, which is not installed "
            "(pip install simplejpeg), or use decoder='pil'"
        )
    return decoder


def _crop_views(
    image: Image.Image, boxes: torch.Tensor, flips: torch.Tensor, scale: float, size: int
) -> torch.Tensor:
    """Crop-and-resize every box (original coordinates / ``scale``) of an RGB image, mirror the
    flipped ones; uint8 ``[V, 3, size, size]``."""
    out = np.empty((boxes.shape[0], size, size, 3), dtype=np.uint8)
    for v, (left, top, w, h) in enumerate(boxes.tolist()):
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        view = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
        out[v] = view[:, ::-1] if bool(flips[v]) else view
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _decode_pil(path: Path, plan: CropPlan, index: int) -> torch.Tensor:
    with open_image(path) as image:
        width, height = image.size  # header only: nothing is decoded yet
        boxes, flips = plan.draw(index, height, width)
        scale = 1.0
        factor = draft_scale(boxes, plan.size)
        if factor > 1 and image.format == "JPEG":
            drafted = image.draft("RGB", (width // factor, height // factor))
            if drafted is not None:
                scale = width / drafted[1][2]  # draft's box is the original size / scale
        image.load()  # decodes (at the drafted scale)
        rgb = to_rgb(image)
    return _crop_views(rgb, boxes, flips, scale, plan.size)


def _decode_simplejpeg(path: Path, data: bytes, plan: CropPlan, index: int) -> torch.Tensor | None:
    """None where simplejpeg cannot or should not decode the file (Pillow then does)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None  # CMYK/YCCK: Pillow's conversion is the reference
    check_pixel_count(path, width, height)
    boxes, flips = plan.draw(index, height, width)
    factor = draft_scale(boxes, plan.size)
    if max(height, width) < 8:
        factor = 1  # libjpeg's M/8 scales could tie with 1/factor on tiny images
    want = (-(-height // factor), -(-width // factor))
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=want[0], min_width=want[1]
        )
    except ValueError:
        return None
    if pixels.shape[:2] != want:
        return None
    return _crop_views(Image.fromarray(pixels), boxes, flips, float(factor), plan.size)


def decode_views(
    path: str | os.PathLike[str], plan: CropPlan, index: int, decoder: str = "auto"
) -> torch.Tensor:
    """Sample ``index``'s views of the image at ``path``: uint8 ``[V, 3, plan.size, plan.size]``,
    channels-last in memory as decoded (a collate's ``torch.stack`` makes the batch contiguous).

    Reads the header for the image size, draws the crops (:meth:`CropPlan.draw`), decodes JPEGs
    at the largest DCT downscale the boxes allow, then crops and resizes each box (bilinear,
    antialiased) and mirrors the flipped views. Any image mode becomes RGB.

    Raises:
        ValueError: unknown ``decoder``.
        UnreadableImage: (a ValueError) the file cannot be read; the message names it.
    """
    name = resolve_decoder(decoder)
    path = Path(path)
    if name == "simplejpeg" and path.suffix.lower() in _JPEG_SUFFIXES:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UnreadableImage(path, f"{type(error).__name__}: {error.strerror}") from error
        views = _decode_simplejpeg(path, data, plan, index)
        if views is not None:
            return views
    return _decode_pil(path, plan, index)


def load_rgb(path: str | os.PathLike[str], shrink_to: int | None = None) -> Image.Image:
    """Decode an image as RGB; with ``shrink_to``, JPEGs decode at the largest DCT downscale
    that keeps the shorter side at least ``shrink_to`` pixels (for resize-to-``shrink_to``).

    Raises:
        UnreadableImage: (a ValueError) the file cannot be read; the message names it.
    """
    return read_rgb(path, shrink_to)
