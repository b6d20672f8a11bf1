"""A synthetic labelled image set for tests: generated in milliseconds, learnable, deterministic.

Each class has a smooth random prototype (low-resolution noise upsampled); an image is its class
prototype, randomly shifted by a few pixels and brightness-scaled, plus pixel noise. Classes are
easy to separate on raw pixels, and augmentations still change the images meaningfully.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "make_synthetic"]

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def make_synthetic(
    n: int,
    *,
    classes: int = 4,
    channels: int = 3,
    size: int = 16,
    seed: int = 0,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images uint8 [n, channels, size, size], labels int64 [n], fingerprint)``.

    The prototypes depend on ``seed`` only; the samples also on ``split``, so a ``test`` split
    draws new images of the same classes.
    """
    if n < 1 or classes < 1 or channels < 1 or size < 4:
        raise ValueError(
            f"synthetic data: need n >= 1, classes >= 1, channels >= 1, size >= 4; got n={n}, "
            f"classes={classes}, channels={channels}, size={size}"
        )
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, channels, 4, 4, generator=g)
    prototypes = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    g_split = torch.Generator().manual_seed(seed * 1000 + (1 if split == "train" else 2))
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g_split)]
    shifts = torch.randint(-2, 3, (n, 2), generator=g_split)
    images = prototypes[labels]
    images = torch.stack(
        [
            torch.roll(image, (int(dy), int(dx)), dims=(1, 2))
            for image, (dy, dx) in zip(images, shifts, strict=True)
        ]
    )
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=g_split)
    noise = 0.08 * torch.randn(n, channels, size, size, generator=g_split)
    images = (images * scale + noise).clamp(0, 1)
    images = (images * 255).round().to(torch.uint8)
    fingerprint = f"synthetic:{split}:n={n}:classes={classes}:c={channels}:s={size}:seed={seed}"
    return images, labels.to(torch.int64), fingerprint
