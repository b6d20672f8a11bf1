"""What ptxas reported for each Triton kernel configuration, per target and Triton version.

``measured_resources.json`` beside this module is written by the compile gate
(``python benchmarks/compile_gate.py --calibrate``, see docs/gpu-compile.md): for every Triton
version it was run under, every target (compute capability 80, 90) and every kernel variant, the
registers, spill bytes and shared memory of each configuration of the fused kernel's and the
transport kernel's autotuning lists. ``rela_kernels.triton.cosine_loss`` prunes with it, so that
the autotuner never picks a configuration that spills (or cannot get its shared memory) on the
GPU it runs on.

A variant is what changes register pressure beyond the tile: single tile or d-tiled, the tile
width, the GEMM's operand kind and the epilogue (loss, loss with gradient, histogram); for the
transport kernel, the operand kind. The table holds, per variant and configuration, the worst
case over the dtypes of ``p`` and ``z`` and bias or none that the gate compiled. Single tiles
narrower than 256 columns are judged by the 256-column measurement (a narrower tile needs no
more registers).

Pure Python, no triton import: the lookup runs inside the autotuner's pruning.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "SHARED_LIMIT",
    "TABLE_PATH",
    "config_key",
    "dot_kind",
    "fits",
    "launch_variant",
    "load_table",
    "lookup",
    "reload",
    "transport_variant_key",
    "variant_key",
    "version_key",
]

TABLE_PATH = Path(__file__).with_name("measured_resources.json")
# The most shared memory one block may use (bytes, with the opt-in): A100 and H100/H200.
SHARED_LIMIT = {80: 166912, 90: 232448}
# The single-tile width every narrower single tile is judged by.
_SINGLE_TILE_BUCKET = 256


def dot_kind(lowp: bool, input_precision: str) -> str:
    """The GEMM's operands: 16-bit, TF32 or exact float32."""
    return "lowp" if lowp else ("tf32" if input_precision == "tf32" else "ieee")


def variant_key(*, single: bool, block_d: int, dot: str, grad: bool, hist: bool) -> str:
    width = max(_SINGLE_TILE_BUCKET, block_d) if single else block_d
    epilogue = "grad" if grad else "hist" if hist else "loss"
    return f"{'single' if single else 'tiled'}-d{width}-{dot}-{epilogue}"


def transport_variant_key(dot: str) -> str:
    """The transport kernel's variant: only the GEMM's operand kind changes its code."""
    return f"transport-{dot}"


def launch_variant(meta: Mapping[str, Any], *, transport: bool = False) -> str:
    """The variant of a launch from its constexprs (``LOWP_DOT``, ``INPUT_PRECISION``; for the
    fused kernel also ``SINGLE_TILE``, ``BLOCK_D``, ``COMPUTE_GRAD``, ``HIST``)."""
    dot = dot_kind(meta["LOWP_DOT"], meta["INPUT_PRECISION"])
    if transport:
        return transport_variant_key(dot)
    return variant_key(
        single=meta["SINGLE_TILE"],
        block_d=meta["BLOCK_D"],
        dot=dot,
        grad=meta["COMPUTE_GRAD"],
        hist=meta["HIST"],
    )


def config_key(config) -> str:
    """A triton.Config as ``b64-k32-w8-s3`` (fused) or ``b64-d128-k32-w4-s3`` (transport)."""
    kw = config.kwargs
    width = f"-d{kw['BLOCK_D']}" if "BLOCK_D" in kw else ""
    return f"b{kw['BLOCK_B']}{width}-k{kw['BLOCK_K']}-w{config.num_warps}-s{config.num_stages}"


def version_key(version: str) -> str:
    """``3.9.0`` -> ``3.9``: ptxas input changes with Triton's minor versions."""
    return ".".join(version.split("+")[0].split(".")[:2])


def fits(arch: int, resources: dict) -> bool:
    """No spill and the shared memory within the target's limit."""
    return resources["spill_bytes"] == 0 and resources["shared"] <= SHARED_LIMIT[arch]


def load_table() -> dict:
    """The table file's resources, read now (``{}`` when there is no file)."""
    try:
        return json.loads(TABLE_PATH.read_text())["resources"]
    except FileNotFoundError:
        return {}


_table = functools.cache(load_table)


def reload() -> None:
    """Read the table file again on the next lookup (after the gate rewrote it)."""
    _table.cache_clear()


def _measured_arch(arch: int) -> int | None:
    # Ampere and Ada share the mma.sync code path; Hopper is its own. Newer GPUs (tcgen05) and
    # older ones were never measured: None, and the caller falls back to its rule.
    if 80 <= arch < 90:
        return 80
    return 90 if arch == 90 else None


def _measured_version(version: str, measured: list[str]) -> str | None:
    """The newest measured version not newer than ``version``, else the oldest measured."""
    if not measured:
        return None

    def as_tuple(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    ordered = sorted(measured, key=as_tuple)
    older = [v for v in ordered if as_tuple(v) <= as_tuple(version_key(version))]
    return older[-1] if older else ordered[0]


def lookup(arch: int, version: str, variant: str) -> dict[str, bool] | None:
    """``{config_key: fits}`` for one variant on ``arch`` under Triton ``version``; None when
    that variant was never measured for the target."""
    table = _table()
    measured_arch = _measured_arch(arch)
    chosen = _measured_version(version, list(table))
    if measured_arch is None or chosen is None:
        return None
    entries = table[chosen].get(str(measured_arch), {}).get(variant)
    if entries is None:
        return None
    return {key: fits(measured_arch, res) for key, res in entries.items()}
