"""A tiny synthetic image folder for tests (written with Pillow into a temporary directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: Path, classes: int = 2, per_class: int = 6, seed: int | None = None
) -> Path:
    """``root/class_k/img_i.{png,jpg}``: random RGB images of varied sizes, plus odd modes."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(10, 40, size=2))
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 1:
                image = image.convert("L")  # grayscale must become RGB
            elif i % 3 == 2:
                image = image.convert("RGBA")
            suffix = "jpg" if i % 2 and image.mode != "RGBA" else "png"
            image.save(folder / f"img_{i:03d}.{suffix}")
    return root
