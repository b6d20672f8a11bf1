"""A traffic model of the fused transported cosine loss: predictions, not measurements.

For one launch configuration of ``rela_kernels.triton.cosine_loss``'s fused kernel it counts

- FLOPs: the GEMM ``(p - mean) @ matrix`` (2 B Dp d per pass over the columns) and the
  epilogue (a few per element of ``[B, d]``);
- HBM bytes, the floor: every input read once and every output written once (``p``, ``z``, the
  matrix, the losses, the gradient); no kernel can move less through device memory;
- L2 bytes: what the kernel reads again beyond the floor, served by L2 at best: the transport
  matrix once per program (and per pass), and ``p`` (and ``z``) again for each extra pass of
  the d-tiled path;

and predicts a time on an H200 as the largest of FLOPs / peak rate, HBM bytes / HBM bandwidth
and (floor + L2) bytes / L2 bandwidth. The L2 bandwidth is an assumption (stated below), not a
datasheet figure; ``benchmarks/gpu_check.py`` puts these predictions next to measured times.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["H200", "Machine", "Traffic", "fused_loss_traffic"]


@dataclass(frozen=True)
class Machine:
    name: str
    hbm_bytes_per_s: float
    l2_bytes_per_s: float  # an assumption: no vendor figure; check it on the first GPU run
    flops_per_s: dict  # by GEMM operand kind: lowp (bf16/fp16), tf32, ieee (fp32 FMA)


# HBM: the H200's 4.8 TB/s datasheet figure, as a copy measures it (~4.3 TB/s). bf16: the
# ~790 TFLOP/s a large dense matmul reaches (the datasheet's 989 is not reached). TF32 at half
# of that; exact float32 runs on the FMA units (67 TFLOP/s datasheet). L2: assumed 10 TB/s.
H200 = Machine(
    name="H200 (assumed rates)",
    hbm_bytes_per_s=4.3e12,
    l2_bytes_per_s=10e12,
    flops_per_s={"lowp": 790e12, "tf32": 395e12, "ieee": 67e12},
)
# The epilogue's float operations per element of [B, d]: z*y, z*z, y*y, the gradient's a*y+b*z.
_EPILOGUE_FLOPS = 8


@dataclass(frozen=True)
class Traffic:
    programs: int
    passes: int
    flops: float
    hbm_bytes: float
    l2_bytes: float
    l2_over_hbm: float
    predicted_ms: float
    bound: str  # which term sets predicted_ms: hbm, l2 or compute

    def as_dict(self) -> dict:
        return asdict(self)


def fused_loss_traffic(
    *,
    batch: int,
    dp: int,
    d: int,
    p_bytes: int,
    z_bytes: int,
    dot: str,
    block_b: int,
    block_d: int,
    single_tile: bool,
    grad: bool,
    machine: Machine = H200,
) -> Traffic:
    """The model for one configuration (``dot``: lowp, tf32 or ieee; sizes in elements)."""
    programs = math.ceil(batch / block_b)
    column_tiles = 1 if single_tile else math.ceil(d / block_d)
    passes = 2 if grad and not single_tile else 1  # pass 2 recomputes y for the gradient
    matrix_bytes = dp * d * (2 if dot == "lowp" else 4)  # the launcher's operand copy
    p_total, z_total = batch * dp * p_bytes, batch * d * z_bytes
    hbm = p_total + z_total + matrix_bytes + 4 * batch + (z_total if grad else 0)
    # Every program reads the whole matrix in every pass; p once per column tile and pass;
    # z once more in pass 2.
    l2 = (programs * passes - 1) * matrix_bytes
    l2 += (column_tiles * passes - 1) * p_total + (passes - 1) * z_total
    flops = 2.0 * batch * dp * d * passes + _EPILOGUE_FLOPS * batch * d
    times = {
        "compute": flops / machine.flops_per_s[dot],
        "hbm": hbm / machine.hbm_bytes_per_s,
        "l2": (hbm + l2) / machine.l2_bytes_per_s,
    }
    bound = max(times, key=times.get)
    return Traffic(
        programs=programs,
        passes=passes,
        flops=flops,
        hbm_bytes=float(hbm),
        l2_bytes=float(l2),
        l2_over_hbm=l2 / hbm,
        predicted_ms=times[bound] * 1e3,
        bound=bound,
    )
