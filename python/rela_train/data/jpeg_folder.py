"""A synthetic JPEG image folder for tests and loader benchmarks.

Images are smooth color gradients with soft blobs and a low-frequency ripple, not noise: crop and
decode comparisons (draft-mode versus full decode, simplejpeg versus Pillow) are only meaningful
on content with spatial structure, as photographs have. Sizes and aspect ratios vary per image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_jpeg_folder", "structured_image"]


def structured_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random smooth RGB image, uint8 ``[height, width, 3]``."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    slope_x = rng.uniform(-0.4, 0.4, size=3).astype(np.float32)
    slope_y = rng.uniform(-0.4, 0.4, size=3).astype(np.float32)
    image = base + slope_x * x + slope_y * y
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.05, 0.3)
        color = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        image = image + weight * color
    freq = rng.uniform(2, 6, size=2)
    ripple = 0.08 * np.sin(2 * np.pi * (freq[0] * x + freq[1] * y))
    image = image + ripple
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_jpeg_folder(
    root: str | os.PathLike[str],
    classes: int = 3,
    per_class: int = 8,
    size_range: tuple[int, int] = (40, 120),
    seed: int = 0,
    corrupt: int = 0,
) -> Path:
    """Write ``root/class_k/img_iii.jpg`` RGB JPEGs (quality 90) of random sizes in
    ``size_range`` (width and height drawn apart), plus ``corrupt`` truncated JPEGs named
    ``zz_corrupt_j.jpg`` spread over the classes (their headers read, their data ends early).

    Returns ``root``.
    """
    root = Path(root)
    low, high = size_range
    if not 1 <= low <= high:
        raise ValueError(f"size_range must satisfy 1 <= low <= high, got {size_range}")
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
            Image.fromarray(structured_image(rng, width, height)).save(
                folder / f"img_{i:03d}.jpg", quality=90
            )
    for j in range(corrupt):
        folder = root / f"class_{j % max(classes, 1)}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"zz_corrupt_{j}.jpg"
        Image.fromarray(structured_image(rng, high, high)).save(path, quality=90)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return root
