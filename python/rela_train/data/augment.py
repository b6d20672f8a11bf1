"""Two-view augmentation on batched tensors (no torchvision), on whatever device the batch is on.

Each view applies, per image: random resized crop + horizontal flip (one ``grid_sample``), color
jitter with probability ``jitter_p``, grayscale, Gaussian blur and solarization.

The view is split in two halves that can run apart: the geometric half (crop box + flip,
:func:`crop_resize_flip`) and the photometric half (:func:`sample_photometric`,
:func:`apply_photometric`). In-memory sets run both here on the device (``Augmenter.__call__``);
image folders crop and flip at decode time in the loader workers (``rela_train.data.views``), so
only the photometric half runs on the device (``Augmenter.photometric``). BYOL's two views
differ in blur (p = 1.0 / 0.1) and solarization (p = 0 / 0.2); ReLA's phase uses the paper's
lighter views (crop scale 0.5-1, jitter 0.8/0.8/0.8/0.2, no blur or solarization).

All random parameters are drawn on the CPU from an explicit ``torch.Generator``, so a batch's
augmentation depends only on the generator's seed (never on the device or on what ran before):
that is what makes resumed runs bit-identical.

Differences from torchvision's per-image pipeline, for speed on batches:

* the crop is resampled bilinearly without antialiasing (crops are close to the output size in
  the presets, so there is little to alias);
* color jitter applies brightness, contrast, saturation and hue in one random order per batch
  (torchvision draws the order per image); images that skip jitter get identity factors;
* **1-channel images** (Fashion-MNIST): jitter reduces to brightness and contrast; saturation, hue
  and grayscale are no-ops, since a gray image has no chroma to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

__all__ = [
    "BYOL_VIEWS",
    "byol_views",
    "RELA_VIEWS",
    "Augmenter",
    "PhotometricParams",
    "ViewParams",
    "ViewSpec",
    "apply_photometric",
    "apply_view",
    "bernoulli",
    "crop_resize_flip",
    "normalize",
    "sample_crop_boxes",
    "sample_photometric",
    "sample_view",
]

# ITU-R 601 luma, the weights torchvision's grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation distribution of one view."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    # brightness, contrast, saturation, hue (torchvision's ColorJitter arguments)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


BYOL_VIEWS = (ViewSpec(blur_p=1.0, solarize_p=0.0), ViewSpec(blur_p=0.1, solarize_p=0.2))
_RELA_VIEW = ViewSpec(crop_scale=(0.5, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8)
RELA_VIEWS = (_RELA_VIEW, _RELA_VIEW)


def byol_views(blur: bool = True) -> tuple[ViewSpec, ViewSpec]:
    """:data:`BYOL_VIEWS`, or without Gaussian blur (``--byol-blur off``: the official ReLA code
    for CIFAR-size images, ``methods/byol.py`` ``TransformBYOL``)."""
    if blur:
        return BYOL_VIEWS
    return tuple(replace(spec, blur_p=0.0) for spec in BYOL_VIEWS)  # type: ignore[return-value]


@dataclass
class PhotometricParams:
    """Per-image photometric parameters of one view (CPU tensors, ``[B]`` unless noted)."""

    brightness: torch.Tensor  # factors; 1 = unchanged
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # shift in turns; 0 = unchanged
    jitter_order: tuple[int, ...]  # the order of the four jitter ops, for the whole batch
    gray: torch.Tensor  # bool
    sigma: torch.Tensor  # blur sigma; 0 = no blur
    solarize: torch.Tensor  # bool


@dataclass
class ViewParams(PhotometricParams):
    """Per-image parameters of one view: the photometric ones plus the crop box and the flip."""

    box: torch.Tensor  # [B, 4] float: left, top, width, height in pixels
    flip: torch.Tensor  # bool


def _uniform(g: torch.Generator, shape: Sequence[int], low: float, high: float) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low


def bernoulli(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    """``n`` bool coin flips from ``g`` (float64 uniforms), each True with probability ``p``."""
    return torch.rand(n, generator=g, dtype=torch.float64) < p


def sample_crop_boxes(
    g: torch.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampler, vectorised over ``n`` images.

    Up to ``attempts`` (area fraction, log-uniform aspect ratio) draws per image; the first that
    fits is used, else a center crop with the ratio clamped to ``ratio``. Returns float64
    ``[n, 4]`` boxes ``(left, top, width, height)`` in whole pixels.
    """
    area = height * width
    target = area * _uniform(g, (n, attempts), scale[0], scale[1])
    log_ratio = _uniform(g, (n, attempts), math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1)  # first fitting attempt (0 if none)
    rows = torch.arange(n)
    ok = fits[rows, first]
    w, h = w[rows, first], h[rows, first]
    # Fallback: the largest center crop whose ratio is clamped into the allowed range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    u_top, u_left = _uniform(g, (n,), 0, 1), _uniform(g, (n,), 0, 1)
    top = torch.where(ok, torch.floor(u_top * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(ok, torch.floor(u_left * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([left, top, w, h], dim=1)


def sample_view(spec: ViewSpec, g: torch.Generator, n: int, height: int, width: int) -> ViewParams:
    """Draw one view's parameters for ``n`` images of ``height x width`` pixels.

    Draw order (part of the reproducibility contract): crop boxes, flips, then
    :func:`sample_photometric`.
    """
    box = sample_crop_boxes(g, n, height, width, spec.crop_scale, spec.crop_ratio)
    flip = bernoulli(g, n, spec.flip_p)
    photometric = sample_photometric(spec, g, n)
    values = {f.name: getattr(photometric, f.name) for f in fields(PhotometricParams)}
    return ViewParams(box=box, flip=flip, **values)


def sample_photometric(spec: ViewSpec, g: torch.Generator, n: int) -> PhotometricParams:
    """Draw one view's photometric parameters (jitter, grayscale, blur, solarize) for ``n``
    images."""
    b, c, s, h = spec.jitter
    jitter = bernoulli(g, n, spec.jitter_p)
    brightness = _uniform(g, (n,), max(0.0, 1 - b), 1 + b)
    contrast = _uniform(g, (n,), max(0.0, 1 - c), 1 + c)
    saturation = _uniform(g, (n,), max(0.0, 1 - s), 1 + s)
    hue = _uniform(g, (n,), -h, h)
    order = tuple(int(i) for i in torch.randperm(4, generator=g))
    ones = torch.ones(n, dtype=torch.float64)
    gray = bernoulli(g, n, spec.gray_p)
    blur = bernoulli(g, n, spec.blur_p)
    sigma = _uniform(g, (n,), spec.blur_sigma[0], spec.blur_sigma[1])
    solarize = bernoulli(g, n, spec.solarize_p)
    return PhotometricParams(
        brightness=torch.where(jitter, brightness, ones),
        contrast=torch.where(jitter, contrast, ones),
        saturation=torch.where(jitter, saturation, ones),
        hue=torch.where(jitter, hue, torch.zeros_like(hue)),
        jitter_order=order,
        gray=gray,
        sigma=torch.where(blur, sigma, torch.zeros_like(sigma)),
        solarize=solarize,
    )


# ----------------------------------------------------------------------------------------------
# Batched image operations on float images in [0, 1], [B, C, H, W]
# ----------------------------------------------------------------------------------------------


# Parameters are drawn on the CPU and copied with non_blocking=True: a copy from pageable host
# memory is staged at once, and the host need not wait for the GPU's queued work (a blocking copy
# would), so it can queue the step ahead of the GPU.


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def crop_resize_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int):
    """Crop ``box`` (pixels) from each image, resize to ``size`` (bilinear), mirror if ``flip``."""
    n, _, height, width = x.shape
    left, top, w, h = (box[:, i] for i in range(4))
    sign = 1.0 - 2.0 * flip.to(torch.float64)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    # Output coordinate u in [-1, 1] samples input x = left + (u + 1) / 2 * w (pixel edges),
    # i.e. normalised (2 x / W - 1) with align_corners=False.
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = ((g - b) / safe) % 6
    hg = (b - r) / safe + 2
    hb = (r - g) / safe + 4
    hue = torch.where(maxc == r, hr, torch.where(maxc == g, hg, hb)) / 6
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), maxc)
    return torch.stack([hue, sat, maxc], dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    ramp = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * ramp


def color_jitter(x: torch.Tensor, p: PhotometricParams) -> torch.Tensor:
    """Brightness, contrast, saturation, hue in ``p.jitter_order`` (identity factors skip)."""
    color = x.shape[1] == 3
    for op in p.jitter_order:
        if op == 0 and not bool((p.brightness == 1).all()):
            x = (x * _per_image(p.brightness, x)).clamp_(0, 1)
        elif op == 1 and not bool((p.contrast == 1).all()):
            mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = _blend(x, mean, _per_image(p.contrast, x))
        elif op == 2 and color and not bool((p.saturation == 1).all()):
            x = _blend(x, _grayscale(x), _per_image(p.saturation, x))
        elif op == 3 and color and not bool((p.hue == 0).all()):
            hsv = _rgb_to_hsv(x)
            shift = p.hue.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
            x = _hsv_to_rgb(hsv)
    return x


def _blur_kernel_size(size: int) -> int:
    # About 10% of the image side, odd (23 px at 224, as in BYOL), at least 3.
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (0 = unchanged); reflect padding."""
    if not bool((sigma > 0).any()):
        return x
    n, c, height, width = x.shape
    k = _blur_kernel_size(min(height, width))
    radius = k // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    weights = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * safe.view(-1, 1) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(torch.float64).expand_as(weights)
    weights = torch.where((sigma > 0).view(-1, 1), weights, delta)
    weights = weights.to(device=x.device, dtype=x.dtype, non_blocking=True)
    weights = weights.repeat_interleave(c, dim=0)  # [n*c, k]
    flat = x.reshape(1, n * c, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, k), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, k, 1), groups=n * c)
    return flat.view(n, c, height, width)


def apply_view(x: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """Apply one view's parameters to float images in [0, 1]; returns ``[B, C, size, size]``."""
    return apply_photometric(crop_resize_flip(x, p.box, p.flip, size), p)


def apply_photometric(x: torch.Tensor, p: PhotometricParams) -> torch.Tensor:
    """Color jitter, grayscale, blur and solarize float images in [0, 1] (``[B, C, H, W]``)."""
    x = color_jitter(x, p)
    if x.shape[1] == 3 and bool(p.gray.any()):
        gray = _grayscale(x).expand_as(x)
        x = torch.where(p.gray.to(x.device, non_blocking=True).view(-1, 1, 1, 1), gray, x)
    x = gaussian_blur(x, p.sigma)
    if bool(p.solarize.any()):
        mask = p.solarize.to(x.device, non_blocking=True).view(-1, 1, 1, 1) & (x >= 0.5)
        x = torch.where(mask, 1.0 - x, x)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


class Augmenter:
    """Turns a uint8 batch ``[B, C, H, W]`` into normalised float views ``[B, C, size, size]``.

    Args:
        views: one :class:`ViewSpec` per view.
        size: output side.
        mean, std: per-channel normalisation (on the [0, 1] scale).
    """

    def __init__(
        self,
        views: Sequence[ViewSpec],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.views = tuple(views)
        self.size = size
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample(self, g: torch.Generator, n: int, height: int, width: int) -> list[ViewParams]:
        """Every view's parameters, view by view (the draw order ``__call__`` uses)."""
        return [sample_view(spec, g, n, height, width) for spec in self.views]

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"Augmenter: expected a uint8 batch [B, C, H, W], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        n, _, height, width = images.shape
        x = images.to(torch.float32) / 255.0
        params = self.sample(g, n, height, width)
        return [normalize(apply_view(x, p, self.size), self.mean, self.std) for p in params]

    def photometric(self, views: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """The photometric half on views already cropped, resized and flipped by the loader.

        Args:
            views: uint8 ``[B, V, C, size, size]`` with ``V == len(self.views)`` (view ``v`` of
                every image was cropped with ``self.views[v]``), on any device: the conversion
                to float and every operation run on that device.
            g: CPU generator the parameters are drawn from (view by view, like ``__call__``).

        Returns:
            ``V`` normalised float32 tensors ``[B, C, size, size]`` on ``views.device``.
        """
        if views.dtype != torch.uint8 or views.dim() != 5:
            raise ValueError(
                f"Augmenter.photometric: expected uint8 views [B, V, C, S, S], got {views.dtype} "
                f"{tuple(views.shape)}"
            )
        n, count, _, height, width = views.shape
        if count != len(self.views) or height != self.size or width != self.size:
            raise ValueError(
                f"Augmenter.photometric: expected {len(self.views)} views of {self.size} x "
                f"{self.size} pixels, got {count} of {height} x {width}"
            )
        params = [sample_photometric(spec, g, n) for spec in self.views]
        out = []
        for v, p in enumerate(params):
            x = views[:, v].to(torch.float32) / 255.0
            out.append(normalize(apply_photometric(x, p), self.mean, self.std))
        return out
