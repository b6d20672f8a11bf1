"""The one image-reading routine: every path (embed, fit, eval) opens images through it.

:func:`open_image` opens a file with Pillow and turns any failure while reading it -- a decode
error, a truncated file, a header claiming more pixels than Pillow's decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``, whether Pillow would only warn or refuse) -- into
:class:`UnreadableImage`, which names the file and the reason. Callers catch that one exception
and skip the image; nothing else is caught, so a bug in our own code is never mistaken for a bad
file.

:func:`to_rgb` converts any Pillow mode to 8-bit RGB, scaling 16-bit grayscale (modes ``I;16``,
``I;16B``, ``I;16L``, ``I``) from ``[0, 65535]`` to ``[0, 255]`` -- Pillow's own ``convert``
clips those values instead, so nearly every pixel of a 16-bit PNG would become white.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "UnreadableImage",
    "check_pixel_count",
    "open_image",
    "printable",
    "read_rgb",
    "to_rgb",
]

# Pillow modes holding more than 8 bits per pixel of grayscale.
_WIDE_GRAY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class UnreadableImage(ValueError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fsdecode(path)
        self.reason = printable(reason)
        super().__init__(f"cannot read image {printable(self.path)}: {self.reason}")


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not valid UTF-8 (which Python keeps as
    lone surrogates) shown as ``\\xNN`` escapes, so it can be printed and written as JSON."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_pixel_count(path: str | os.PathLike[str], width: int, height: int) -> None:
    """Refuse an image larger than Pillow's decompression-bomb limit (the one all paths use)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise UnreadableImage(
            path,
            f"{width}x{height} pixels exceeds the limit of {limit} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS; a possible decompression bomb)",
        )


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """``with open_image(path) as image``: Pillow's image, its size checked against the bomb
    limit; any failure inside the block (decoding happens there) raises :class:`UnreadableImage`.
    Keep only Pillow calls inside the block."""
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                check_pixel_count(path, *image.size)
                yield image
        except (UnreadableImage, MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # Pillow's plugins raise many types for malformed files
            raise UnreadableImage(path, _reason(error)) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any mode; 16-bit grayscale is scaled, not clipped."""
    if image.mode in _WIDE_GRAY:
        pixels = np.asarray(image).astype(np.float64)
        # 16-bit files decode to [0, 65535]; mode "I" may hold larger ints, which saturate.
        gray = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | os.PathLike[str], shrink_to: int | None = None) -> Image.Image:
    """Decode ``path`` as 8-bit RGB (see :func:`to_rgb`); with ``shrink_to``, JPEGs decode at the
    largest DCT downscale keeping the shorter side at least ``shrink_to`` pixels.

    Raises:
        UnreadableImage: the file cannot be read (the message names it and says why).
    """
    path = Path(path)
    with open_image(path) as image:
        if shrink_to is not None:
            image.draft("RGB", (shrink_to, shrink_to))
        image.load()
        return to_rgb(image)
