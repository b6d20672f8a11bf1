"""Whether a network may train in channels_last on the CPU.

oneDNN 3.12 (bundled with torch 2.13) corrupts the heap in the backward pass of a strided 1 x 1
convolution with fewer than 8 input channels in channels_last, on CPUs whose best instruction
set is AVX2 (8 float lanes), single-threaded: the process aborts with a glibc message ("corrupted
size vs. prev_size") or a segmentation fault a few steps later, or goes on with damaged memory.
A ResNet narrower than 8 (``--width 4``, as in the test presets) has such a convolution in its
first downsampling shortcut. Such a run keeps the contiguous format on the CPU, where the format
is a speed choice only; wider networks are unaffected.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MIN_SHORTCUT_CHANNELS", "channels_last_hazard"]

# Input channels below which a strided 1 x 1 convolution is not run in channels_last on the CPU
# (one AVX2 register of float32 lanes).
MIN_SHORTCUT_CHANNELS = 8


def channels_last_hazard(network: nn.Module) -> str | None:
    """The first convolution of ``network`` that oneDNN's AVX2 kernel mishandles in channels_last
    (1 x 1, strided, fewer than :data:`MIN_SHORTCUT_CHANNELS` input channels), described; None
    when there is none."""
    for name, module in network.named_modules():
        if (
            isinstance(module, nn.Conv2d)
            and module.kernel_size == (1, 1)
            and max(module.stride) > 1
            and module.in_channels < MIN_SHORTCUT_CHANNELS
        ):
            return (
                f"{name} is a strided 1x1 convolution with {module.in_channels} input channels "
                f"(< {MIN_SHORTCUT_CHANNELS}), which oneDNN's AVX2 kernel mishandles in "
                "channels_last"
            )
    return None
