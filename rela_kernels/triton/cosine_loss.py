"""Triton kernels of ``transport`` and the (transported) cosine loss, optionally counting loss keys.

Same semantics as ``csrc/cpu/cosine_loss.cpp`` and ``rela_kernels.reference``:

* ``transport``: float32 ``y = (p - mean) @ matrix (+ bias)``;
* ``cosine_loss_fwd``: per row ``1 - <z, y> / (max(|z|, eps) * max(|y|, eps))`` and optionally
  ``d loss_i / d z_i`` in z's dtype;
* ``transported_cosine_loss_fwd``: the two fused. One program owns ``BLOCK_B`` rows: it runs the
  small GEMM ``(p - mean) @ matrix`` over ``Dp`` in ``BLOCK_K`` chunks into a float32 register
  tile, then takes norms, the dot with ``z``, the loss and the gradient from registers. The
  targets ``y`` are never written to memory.

``transported_cosine_loss_hist`` is the fused kernel with ``HIST``: as each program stores its
losses it also adds the top ``HIST_BITS`` bits of their order keys to a global histogram (the
first pass of a radix select, see ``rela_kernels.triton.score_select``).

Rows wider than one register tile (``d > 256`` for the fused kernel) are tiled along ``d`` too:
pass 1 accumulates ``<z, y>``, ``|z|^2`` and ``|y|^2`` over the tiles, pass 2 (only when the
gradient is asked for) recomputes each tile of ``y`` and writes the gradient. The ``SINGLE_TILE``
constexpr keeps the common narrow case to one pass.

Precision: everything accumulates in float32. For 16-bit ``p`` on a GPU the GEMM runs on 16-bit
operands with float32 accumulation: the centred ``p`` tile is rounded to p's dtype in the kernel,
the matrix once per matrix on the host (a cached copy; same rounding as an in-kernel cast). For
float32 ``p`` it uses TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set. The
interpreter (``TRITON_INTERPRET=1``, set before this module is imported) has no 16-bit
``tl.dot``, so there the operands stay float32.

Launch: on a GPU the GEMM kernels are autotuned over a short config list, pruned by batch
bucket, d and Dp, and for the fused kernel by what ptxas reported for the GPU's compute
capability and this Triton version (``resource_table``: no config that spills or overflows
shared memory there); under the interpreter one fixed configuration runs. The plain loss kernel
uses a block-size heuristic. Each launcher builds a ``Launch`` (``*_launch``) and runs it; the
compile gate (benchmarks/compile_gate.py, docs/gpu-compile.md) compiles the same launches for
sm_80 and sm_90 without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from rela_kernels.triton import resource_table

__all__ = [
    "HIST_BITS",
    "Launch",
    "cosine_loss_fwd",
    "cosine_loss_launch",
    "fused_configs",
    "fused_loss_launch",
    "is_interpreted",
    "transport",
    "transport_configs",
    "transport_launch",
    "transported_cosine_loss_fwd",
    "transported_cosine_loss_hist",
]

# The fused kernel keeps a float32 [BLOCK_B, BLOCK_D] accumulator plus the z tile in registers;
# beyond 256 columns that spills, so wider rows are processed in tiles (two passes). The d-tiled
# loop needs more registers than one tile of the same size (ptxas, sm_90): float32 operands
# only stay spill-free at 64 columns.
_FUSED_MAX_SINGLE_D = 256
_FUSED_TILE_D_16BIT = 128
_FUSED_TILE_D_FP32 = 64
# The plain loss kernel holds only z and y tiles; on a GPU 1024 columns still fit.
_LOSS_MAX_TILE_D = 1024
# Under the interpreter, tiles are capped lower so that the CPU tests exercise the d-tiled path.
_INTERPRETER_MAX_TILE_D = 128
_INTERPRETER_BLOCK_B = 16
_INTERPRETER_MAX_BLOCK_K = 128
# tl.dot needs every dimension >= 16 on older GPUs / Triton versions.
_MIN_DOT = 16
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Bits of the loss keys counted by the fused histogram: 2**16 int32 bins (256 KiB). Sign,
# exponent and 7 mantissa bits: losses of one bin agree to within 1/128 relative, so the
# candidates left for the second pass are few unless the losses are tied or nearly so.
HIST_BITS = 16


# --------------------------------------------------------------------------------------------
# Device-side building blocks
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, stride_b, stride_d, rows, row_mask, cols, col_mask):
    """float32 [rows, cols] tile of a strided 2-D tensor; zero outside the masks."""
    # Row offsets in int64: B * stride may exceed 2**31 for large (or sliced) inputs.
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride_b + cols[None, :] * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _transport_tile(
    p_ptr,
    mean_ptr,
    mat_ptr,
    bias_ptr,
    DP,
    stride_pb,
    stride_pk,
    stride_mk,
    stride_md,
    rows,
    row_mask,
    cols,
    col_mask,
    HAS_BIAS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 [BLOCK_B, BLOCK_D] tile of ``(p - mean) @ matrix (+ bias)``; 0 in masked columns."""
    ks = tl.arange(0, BLOCK_K)
    # Row offsets in int64 once; per-step addresses are rebuilt from k0 rather than carried as
    # [BLOCK_B, BLOCK_K] / [BLOCK_K, BLOCK_D] pointer tensors, which would pin ~2 registers each.
    p_rows = p_ptr + rows.to(tl.int64)[:, None] * stride_pb
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, DP, BLOCK_K):
        k = k0 + ks
        k_mask = k < DP
        p = tl.load(
            p_rows + k[None, :] * stride_pk, mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        mu = tl.load(mean_ptr + k, mask=k_mask, other=0.0)
        # Centre in float32 before any rounding: prior embeddings can have a large common
        # offset, and subtracting it after a 16-bit rounding would lose the signal.
        a = p.to(tl.float32) - mu[None, :]
        m_ptrs = mat_ptr + k[:, None] * stride_mk + cols[None, :] * stride_md
        m = tl.load(m_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if LOWP_DOT:
            # 16-bit tensor-core operands, float32 accumulation.
            acc = tl.dot(a.to(p_ptr.dtype.element_ty), m.to(p_ptr.dtype.element_ty), acc)
        else:
            acc = tl.dot(a, m.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _target_tile(
    y_ptr,
    stride_yb,
    stride_yd,
    p_ptr,
    mean_ptr,
    mat_ptr,
    bias_ptr,
    DP,
    stride_pb,
    stride_pk,
    stride_mk,
    stride_md,
    rows,
    row_mask,
    cols,
    col_mask,
    FUSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The float32 target tile: transported from p (FUSED) or loaded from y."""
    if FUSED:
        y = _transport_tile(
            p_ptr,
            mean_ptr,
            mat_ptr,
            bias_ptr,
            DP,
            stride_pb,
            stride_pk,
            stride_mk,
            stride_md,
            rows,
            row_mask,
            cols,
            col_mask,
            HAS_BIAS,
            LOWP_DOT,
            INPUT_PRECISION,
            BLOCK_B,
            BLOCK_D,
            BLOCK_K,
        )
    else:
        y = _load_tile(y_ptr, stride_yb, stride_yd, rows, row_mask, cols, col_mask)
    return y


@triton.jit
def _loss_coefficients(dot, zz, yy, eps):
    """Per-row loss and the gradient as ``a * y + b * z`` (same formula as the C++ kernel)."""
    # Round-to-nearest sqrt/div: these are per-row scalars, so exactness costs nothing.
    z_norm = tl.sqrt_rn(zz)
    nz = tl.maximum(z_norm, eps)
    ny = tl.maximum(tl.sqrt_rn(yy), eps)
    inv = tl.div_rn(1.0, nz * ny)
    cosine = dot * inv
    # Where |z| is clamped to eps the clamp has zero gradient (as in torch), so the z term drops.
    b = tl.where(z_norm >= eps, tl.div_rn(cosine, nz * nz), 0.0)
    return 1.0 - cosine, -inv, b


@triton.jit
def _store_grad(grad_ptr, D, rows, row_mask, cols, col_mask, a, b, y, z):
    """Write ``a * y + b * z`` into the contiguous [B, D] gradient, rounded to its dtype."""
    mask = row_mask[:, None] & col_mask[None, :]
    # Padding rows have z = 0 and so a clamped, huge coefficient: zero them before the cast so
    # that no lane overflows a 16-bit type, even one that is never stored.
    g = tl.where(mask, a[:, None] * y + b[:, None] * z, 0.0)
    ptrs = grad_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(ptrs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _order_key(x, LARGEST: tl.constexpr):
    """uint32 keys of float32 ``x`` whose unsigned order is the float order (reversed unless
    LARGEST), ``-0.0`` folded onto ``+0.0``: the keys of the radix selects (csrc/cuda/select.cu)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where((bits << 1) == 0, tl.zeros_like(bits), bits)
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    if not LARGEST:
        key = ~key
    return key


@triton.jit
def _count_keys(hist_ptr, loss, row_mask, LARGEST: tl.constexpr, HIST_BITS: tl.constexpr):
    """Add the rows' top-HIST_BITS key digits to the global int32 histogram."""
    # Digits are below 2**16: int32 pointer offsets, as everywhere else.
    digit = (_order_key(loss, LARGEST) >> (32 - HIST_BITS)).to(tl.int32)
    # Relaxed: the counts are only read after the kernel has finished.
    tl.atomic_add(hist_ptr + digit, row_mask.to(tl.int32), mask=row_mask, sem="relaxed")


@triton.jit
def _cosine_loss_kernel(
    z_ptr,
    y_ptr,
    p_ptr,
    mean_ptr,
    mat_ptr,
    bias_ptr,
    loss_ptr,
    grad_ptr,
    hist_ptr,
    B,
    D,
    DP,
    B_BUCKET,  # unused by the code; part of the autotuning key (best BLOCK_B depends on B)
    stride_zb,
    stride_zd,
    stride_yb,
    stride_yd,
    stride_pb,
    stride_pk,
    stride_mk,
    stride_md,
    eps,
    FUSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HIST: tl.constexpr,
    LARGEST: tl.constexpr,
    HIST_BITS: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Loss (and gradient) of rows [pid * BLOCK_B, (pid + 1) * BLOCK_B); with HIST, the top
    HIST_BITS bits of each loss's order key are counted too, straight from registers."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if SINGLE_TILE:
        # The whole row fits one tile: y and z stay in registers from the GEMM to the gradient.
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        y = _target_tile(
            y_ptr, stride_yb, stride_yd, p_ptr, mean_ptr, mat_ptr, bias_ptr, DP,
            stride_pb, stride_pk, stride_mk, stride_md, rows, row_mask, cols, col_mask,
            FUSED, HAS_BIAS, LOWP_DOT, INPUT_PRECISION, BLOCK_B, BLOCK_D, BLOCK_K,
        )  # fmt: skip
        z = _load_tile(z_ptr, stride_zb, stride_zd, rows, row_mask, cols, col_mask)
        loss, a, b = _loss_coefficients(
            tl.sum(z * y, axis=1), tl.sum(z * z, axis=1), tl.sum(y * y, axis=1), eps
        )
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        if HIST:
            _count_keys(hist_ptr, loss, row_mask, LARGEST, HIST_BITS)
        if COMPUTE_GRAD:
            _store_grad(grad_ptr, D, rows, row_mask, cols, col_mask, a, b, y, z)
    else:
        # Pass 1: the three row reductions, tile by tile.
        dot = tl.zeros((BLOCK_B,), dtype=tl.float32)
        zz = tl.zeros((BLOCK_B,), dtype=tl.float32)
        yy = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            y = _target_tile(
                y_ptr, stride_yb, stride_yd, p_ptr, mean_ptr, mat_ptr, bias_ptr, DP,
                stride_pb, stride_pk, stride_mk, stride_md, rows, row_mask, cols, col_mask,
                FUSED, HAS_BIAS, LOWP_DOT, INPUT_PRECISION, BLOCK_B, BLOCK_D, BLOCK_K,
            )  # fmt: skip
            z = _load_tile(z_ptr, stride_zb, stride_zd, rows, row_mask, cols, col_mask)
            dot += tl.sum(z * y, axis=1)
            zz += tl.sum(z * z, axis=1)
            yy += tl.sum(y * y, axis=1)
        loss, a, b = _loss_coefficients(dot, zz, yy, eps)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        if HIST:
            _count_keys(hist_ptr, loss, row_mask, LARGEST, HIST_BITS)
        if COMPUTE_GRAD:
            # Pass 2: recompute each y tile (nothing [B, d] is stashed) and write the gradient.
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_mask = cols < D
                y = _target_tile(
                    y_ptr, stride_yb, stride_yd, p_ptr, mean_ptr, mat_ptr, bias_ptr, DP,
                    stride_pb, stride_pk, stride_mk, stride_md, rows, row_mask, cols, col_mask,
                    FUSED, HAS_BIAS, LOWP_DOT, INPUT_PRECISION, BLOCK_B, BLOCK_D, BLOCK_K,
                )  # fmt: skip
                z = _load_tile(z_ptr, stride_zb, stride_zd, rows, row_mask, cols, col_mask)
                _store_grad(grad_ptr, D, rows, row_mask, cols, col_mask, a, b, y, z)


@triton.jit
def _transport_kernel(
    p_ptr,
    mean_ptr,
    mat_ptr,
    bias_ptr,
    y_ptr,
    B,
    D,
    DP,
    B_BUCKET,  # unused by the code; part of the autotuning key
    stride_pb,
    stride_pk,
    stride_mk,
    stride_md,
    HAS_BIAS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One [BLOCK_B, BLOCK_D] tile of the contiguous float32 output y."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    col_mask = cols < D
    y = _transport_tile(
        p_ptr, mean_ptr, mat_ptr, bias_ptr, DP, stride_pb, stride_pk, stride_mk, stride_md,
        rows, row_mask, cols, col_mask, HAS_BIAS, LOWP_DOT, INPUT_PRECISION,
        BLOCK_B, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    ptrs = y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(ptrs, y, mask=row_mask[:, None] & col_mask[None, :])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------

# triton.jit returns an InterpretedFunction instead of a JITFunction when TRITON_INTERPRET was
# set at import: that, not the environment now, decides how the kernels run.
_INTERPRETED = not isinstance(_cosine_loss_kernel, triton.runtime.JITFunction)


def is_interpreted() -> bool:
    """True when these kernels run under the Triton interpreter (on CPU tensors)."""
    return _INTERPRETED


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(n, 1)))


def _b_bucket(batch: int) -> int:
    """Autotuning key for the batch: the best BLOCK_B follows B only coarsely."""
    return min(_pow2_at_least(batch, 16), 8192)


def _per_thread(block_b: int, block_d: int, num_warps: int) -> int:
    """Accumulator elements each thread holds."""
    return block_b * block_d // (32 * num_warps)


def _prune(configs, predicate):
    """Configs passing ``predicate``; the smallest tile if none does (never empty)."""
    kept = [c for c in configs if predicate(c)]
    if kept:
        return kept
    return [min(configs, key=lambda c: (c.kwargs["BLOCK_B"], c.kwargs.get("BLOCK_D", 0)))]


def _fits_by_rule(c: triton.Config, block_d: int, single: bool, lowp: bool) -> bool:
    """The fallback where nothing was measured: ptxas (sm_90, Triton 3.9) spills beyond ~16
    accumulator elements per thread with mma.sync, as the epilogue keeps z, y and their
    addresses live next to the accumulator. BLOCK_B = 16 is the floor of tl.dot, so a single
    tile may hold 32 there (BLOCK_D = 256 needs it). float32 operands in the d-tiled loop spill
    with 64-wide K steps."""
    if not (single or lowp) and c.kwargs["BLOCK_K"] > 32:
        return False
    per_thread = _per_thread(c.kwargs["BLOCK_B"], block_d, c.num_warps)
    return per_thread <= (32 if single and c.kwargs["BLOCK_B"] == _MIN_DOT else 16)


def _prune_fused(configs, named_args, *, arch: int, **kwargs):
    """The autotuner's candidates for one launch on compute capability ``arch`` (e.g. 90):
    shape limits first, then what ptxas reported for this target and Triton version
    (``resource_table``), or the per-thread rule where nothing was measured."""
    args = {**named_args, **kwargs}
    max_b = max(_MIN_DOT, args["B_BUCKET"])
    max_k = _pow2_at_least(args["DP"], _MIN_DOT)
    block_d = args["BLOCK_D"]
    single = args["SINGLE_TILE"]
    variant = resource_table.launch_variant(args)
    measured = resource_table.lookup(arch, triton.__version__, variant)

    def fits(c: triton.Config) -> bool:
        if c.kwargs["BLOCK_B"] > max_b or c.kwargs["BLOCK_K"] > max_k:
            return False
        verdict = None if measured is None else measured.get(resource_table.config_key(c))
        return _fits_by_rule(c, block_d, single, args["LOWP_DOT"]) if verdict is None else verdict

    return _prune(configs, fits)


def _prune_transport(configs, named_args, *, arch: int, **kwargs):
    """Shape limits, then the measurements for ``arch`` where there are any."""
    args = {**named_args, **kwargs}
    max_b = max(_MIN_DOT, args["B_BUCKET"])
    max_d = _pow2_at_least(args["D"], 32)
    max_k = _pow2_at_least(args["DP"], _MIN_DOT)
    variant = resource_table.launch_variant(args, transport=True)
    measured = resource_table.lookup(arch, triton.__version__, variant)

    def fits(c: triton.Config) -> bool:
        if c.kwargs["BLOCK_B"] > max_b or c.kwargs["BLOCK_D"] > max_d:
            return False
        if c.kwargs["BLOCK_K"] > max_k:
            return False
        verdict = None if measured is None else measured.get(resource_table.config_key(c))
        return verdict is not False

    return _prune(configs, fits)


def _config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Small lists on purpose: each entry that survives pruning costs a compile and a benchmark per
# new key. Configs that run out of shared memory on a smaller GPU are skipped by the autotuner.
# The 64- and 128-row tiles are the Hopper shapes: with 8 warps (two warpgroups) Triton emits
# wgmma on sm_90, and each program reads the transport matrix for 64 rows instead of 16.
_FUSED_CONFIGS = [
    _config(4, 2, BLOCK_B=16, BLOCK_K=32),
    _config(4, 3, BLOCK_B=16, BLOCK_K=64),
    _config(8, 2, BLOCK_B=16, BLOCK_K=32),
    _config(4, 2, BLOCK_B=32, BLOCK_K=32),
    _config(8, 3, BLOCK_B=32, BLOCK_K=64),
    _config(8, 3, BLOCK_B=64, BLOCK_K=32),
    _config(8, 3, BLOCK_B=64, BLOCK_K=64),
    _config(8, 2, BLOCK_B=128, BLOCK_K=32),
]
_TRANSPORT_CONFIGS = [
    _config(4, 3, BLOCK_B=32, BLOCK_D=32, BLOCK_K=64),
    _config(4, 3, BLOCK_B=64, BLOCK_D=64, BLOCK_K=32),
    _config(4, 3, BLOCK_B=64, BLOCK_D=128, BLOCK_K=32),
    _config(4, 3, BLOCK_B=128, BLOCK_D=64, BLOCK_K=32),
    _config(8, 3, BLOCK_B=128, BLOCK_D=128, BLOCK_K=32),
    _config(4, 4, BLOCK_B=32, BLOCK_D=128, BLOCK_K=64),
]


def fused_configs() -> list[triton.Config]:
    """The fused loss kernel's autotuning list (before pruning), for tests and benchmarks."""
    return list(_FUSED_CONFIGS)


def transport_configs() -> list[triton.Config]:
    """The transport kernel's autotuning list (before pruning)."""
    return list(_TRANSPORT_CONFIGS)


# One autotuner per compute capability: pruning depends on the target (and Triton's version).
@functools.cache
def _tuned_fused_kernel(arch: int):
    return triton.autotune(
        configs=_FUSED_CONFIGS,
        key=["B_BUCKET", "D", "DP", "HAS_BIAS", "COMPUTE_GRAD", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": functools.partial(_prune_fused, arch=arch)},
    )(_cosine_loss_kernel)


@functools.cache
def _tuned_hist_kernel(arch: int):
    # A second autotuner over the same kernel: autotuning re-runs a launch once per config, so
    # the histogram has to be zeroed before each of those runs (and before the real one).
    return triton.autotune(
        configs=_FUSED_CONFIGS,
        key=["B_BUCKET", "D", "DP", "HAS_BIAS", "INPUT_PRECISION", "LARGEST", "HIST_BITS"],
        prune_configs_by={"early_config_prune": functools.partial(_prune_fused, arch=arch)},
        reset_to_zero=["hist_ptr"],
    )(_cosine_loss_kernel)


@functools.cache
def _tuned_transport_kernel(arch: int):
    return triton.autotune(
        configs=_TRANSPORT_CONFIGS,
        key=["B_BUCKET", "D", "DP", "HAS_BIAS", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": functools.partial(_prune_transport, arch=arch)},
    )(_transport_kernel)


@functools.cache
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _arch_of(t: Tensor) -> int | None:
    """Compute capability of t's GPU as 80, 90, ...; None under the interpreter."""
    if _INTERPRETED:
        return None
    return _device_arch(t.device.index if t.device.index is not None else 0)


@dataclass(frozen=True)
class Launch:
    """One kernel launch exactly as a launcher makes it, without running it.

    ``kernel`` is the JIT function, ``args`` its positional arguments, ``meta`` the constexpr
    keywords, ``grid`` maps a config's keywords to the grid. ``tuner`` is the autotuner the
    launcher calls (None for a fixed configuration); ``candidates()`` lists the configurations
    that can run: the autotuner's list after its own pruning, or the one fixed configuration.
    ``launch_candidates`` and the compile gate (benchmarks/compile_gate.py) read these.
    """

    kernel: object
    args: tuple
    meta: dict
    grid: Callable[[dict], tuple]
    tuner: object | None = None
    fixed: triton.Config | None = None

    def candidates(self) -> list[triton.Config]:
        if self.tuner is None:
            return [self.fixed]
        # What Autotuner.run and Autotuner.warmup do before benchmarking.
        self.tuner.nargs = dict(zip(self.tuner.arg_names, self.args, strict=False))
        try:
            return list(self.tuner.prune_configs(dict(self.meta)))
        finally:
            self.tuner.nargs = None

    def run(self, config: triton.Config | None = None):
        """Launch: through the autotuner, or with ``config`` (one of ``candidates()``)."""
        if config is None and self.tuner is not None:
            return self.tuner[self.grid](*self.args, **self.meta)
        config = config or self.fixed
        kwargs = {**self.meta, **config.all_kwargs()}
        if _INTERPRETED:  # the interpreter accepts no launch options
            kwargs = {**self.meta, **config.kwargs}
        return self.kernel[self.grid(kwargs)](*self.args, **kwargs)


def _dot_mode(p: Tensor, arch: int | None) -> tuple[bool, str]:
    """(LOWP_DOT, INPUT_PRECISION) for the GEMM on p's dtype."""
    if arch is None:
        return False, "ieee"  # no 16-bit tl.dot in the interpreter; float32 is exact enough
    if p.dtype in _SIXTEEN_BIT:
        return True, "tf32"  # precision only matters for float32 operands
    return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _fused_tile_d(lowp: bool) -> int:
    return _FUSED_TILE_D_16BIT if lowp else _FUSED_TILE_D_FP32


# One cached 16-bit copy of the transport matrix: the matrix is a constant of the training run,
# and rounding it once here (round-to-nearest-even, exactly what the in-kernel cast would do)
# spares every program a float32 load plus conversion of its matrix tiles.
_matrix_cache: dict[str, object] = {}


def _dot_matrix(matrix: Tensor, dtype: torch.dtype, lowp: bool) -> Tensor:
    """The matrix in the GEMM operand dtype."""
    if not lowp:
        return matrix
    try:
        version = matrix._version  # bumped by in-place updates
    except RuntimeError:  # inference tensors track no version: never cache them
        return matrix.to(dtype)
    cached = _matrix_cache.get("entry")
    # Holding a reference to the source keeps its storage alive, so identity cannot be fooled
    # by a new matrix allocated at the same address.
    if cached is not None:
        source, source_version, converted = cached
        if source is matrix and source_version == version and converted.dtype == dtype:
            return converted
    converted = matrix.to(dtype)
    _matrix_cache["entry"] = (matrix, version, converted)
    return converted


def _device_guard(t: Tensor):
    """Launch on t's GPU (Triton launches on the current device), nothing to do on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_device(*tensors: Tensor | None) -> None:
    device = tensors[0].device
    for t in tensors:
        assert t is None or t.device == device, "rela triton: all inputs must share one device"
    assert _INTERPRETED or device.type == "cuda", (
        "rela triton: CPU tensors need TRITON_INTERPRET=1 set before rela_kernels.triton is "
        f"imported; got tensors on {device}"
    )


def _transport_params(
    p: Tensor, mean: Tensor, matrix: Tensor, bias: Tensor | None, d: int
) -> tuple[Tensor, Tensor, Tensor]:
    """mean, matrix and the bias (mean as a never-read stand-in when None), checked."""
    dp = p.shape[1]
    assert p.dim() == 2 and mean.shape == (dp,) and matrix.shape == (dp, d)
    assert mean.dtype == matrix.dtype == torch.float32
    assert bias is None or (bias.shape == (d,) and bias.dtype == torch.float32)
    # Parameters are tiny and normally contiguous already; .contiguous() is then free.
    mean = mean.contiguous()
    bias = mean if bias is None else bias.contiguous()
    return mean, matrix, bias


def _loss_outputs(z: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor]:
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device) if compute_grad else z.new_empty(0)
    return loss, grad


def _interpreter_block_k(dp: int) -> int:
    # Few, wide K steps: every interpreted op is a numpy call, so fewer steps run faster.
    return min(_pow2_at_least(dp, _MIN_DOT), _INTERPRETER_MAX_BLOCK_K)


# --------------------------------------------------------------------------------------------
# Launch plans: what each launcher launches, for a given target (arch None: the interpreter).
# --------------------------------------------------------------------------------------------


def transport_launch(
    p: Tensor, mean: Tensor, matrix: Tensor, bias: Tensor | None, y: Tensor, arch: int | None
) -> Launch:
    """The launch of ``transport`` writing into the float32 [B, d] ``y``."""
    batch, dp = p.shape
    d = matrix.shape[1]
    mean, matrix, bias_arg = _transport_params(p, mean, matrix, bias, d)
    lowp, precision = _dot_mode(p, arch)
    matrix = _dot_matrix(matrix, p.dtype, lowp)
    args = (p, mean, matrix, bias_arg, y, batch, d, dp, _b_bucket(batch))
    args += (p.stride(0), p.stride(1), matrix.stride(0), matrix.stride(1))
    meta = dict(HAS_BIAS=bias is not None, LOWP_DOT=lowp, INPUT_PRECISION=precision)

    def grid(m):
        return (triton.cdiv(batch, m["BLOCK_B"]), triton.cdiv(d, m["BLOCK_D"]))

    if arch is None:
        block_d = min(_pow2_at_least(d, _MIN_DOT), _INTERPRETER_MAX_TILE_D)
        block_k = _interpreter_block_k(dp)
        fixed = _config(4, 3, BLOCK_B=_INTERPRETER_BLOCK_B, BLOCK_D=block_d, BLOCK_K=block_k)
        return Launch(_transport_kernel, args, meta, grid, fixed=fixed)
    return Launch(_transport_kernel, args, meta, grid, tuner=_tuned_transport_kernel(arch))


def cosine_loss_launch(
    z: Tensor,
    y: Tensor,
    eps: float,
    compute_grad: bool,
    loss: Tensor,
    grad: Tensor,
    arch: int | None,
) -> Launch:
    """The launch of the plain cosine loss (a block-size heuristic, no autotuning)."""
    batch, d = z.shape
    max_tile = _INTERPRETER_MAX_TILE_D if arch is None else _LOSS_MAX_TILE_D
    block_d = min(_pow2_at_least(d, _MIN_DOT), max_tile)
    if arch is None:
        block_b, num_warps = _INTERPRETER_BLOCK_B, 4
    else:
        # Up to 4096 elements per tile: enough loads in flight per program, and many programs
        # for small d. 8 warps keep it at 16 elements per thread (ptxas spills from ~32).
        block_b = min(max(1, 4096 // block_d), 64, triton.next_power_of_2(batch))
        num_warps = 8 if block_b * block_d >= 4096 else 4
    # y stands in for the never-read transport pointers; loss for an absent gradient/histogram.
    args = (z, y, y, y, y, y, loss, grad if compute_grad else loss, loss, batch, d, 0, 0)
    args += (z.stride(0), z.stride(1), y.stride(0), y.stride(1), 0, 0, 0, 0, float(eps))
    meta = dict(
        FUSED=False,
        HAS_BIAS=False,
        COMPUTE_GRAD=compute_grad,
        HIST=False,
        LARGEST=True,
        HIST_BITS=HIST_BITS,
        SINGLE_TILE=d <= block_d,
        LOWP_DOT=False,
        INPUT_PRECISION="ieee",
        BLOCK_D=block_d,
        BLOCK_K=_MIN_DOT,
    )
    # Triton's default pipelining depth: this kernel has no loop over K to pipeline.
    fixed = _config(num_warps, 3, BLOCK_B=block_b)
    return Launch(
        _cosine_loss_kernel, args, meta, lambda m: (triton.cdiv(batch, m["BLOCK_B"]),), fixed=fixed
    )


def fused_loss_launch(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Tensor | None,
    eps: float,
    compute_grad: bool,
    histogram: tuple[Tensor, bool, int] | None,
    loss: Tensor,
    grad: Tensor,
    arch: int | None,
    config: triton.Config | None = None,
) -> Launch:
    """The launch of the fused kernel; ``histogram`` = (zeroed int32 bins, largest, bits) or
    None. ``config`` fixes the tile (tests and per-config benchmarks) instead of autotuning."""
    batch, d = z.shape
    dp = p.shape[1]
    mean, matrix, bias_arg = _transport_params(p, mean, matrix, bias, d)
    hist, largest, hist_bits = histogram if histogram is not None else (None, True, HIST_BITS)
    single = d <= _FUSED_MAX_SINGLE_D
    lowp, precision = _dot_mode(p, arch)
    matrix = _dot_matrix(matrix, p.dtype, lowp)
    # loss stands in for an absent gradient or histogram (never written then).
    args = (z, z, p, mean, matrix, bias_arg, loss, grad if compute_grad else loss)
    args += (loss if hist is None else hist, batch, d, dp, _b_bucket(batch))
    args += (z.stride(0), z.stride(1), 0, 0)
    args += (p.stride(0), p.stride(1), matrix.stride(0), matrix.stride(1), float(eps))
    meta = dict(
        FUSED=True,
        HAS_BIAS=bias is not None,
        COMPUTE_GRAD=compute_grad,
        HIST=hist is not None,
        LARGEST=largest,
        HIST_BITS=hist_bits,
        SINGLE_TILE=single,
        LOWP_DOT=lowp,
        INPUT_PRECISION=precision,
        BLOCK_D=_pow2_at_least(d, _MIN_DOT) if single else _fused_tile_d(lowp),
    )

    def grid(m):
        return (triton.cdiv(batch, m["BLOCK_B"]),)

    if config is not None:
        return Launch(_cosine_loss_kernel, args, meta, grid, fixed=config)
    if arch is None:
        fixed = _config(4, 3, BLOCK_B=_INTERPRETER_BLOCK_B, BLOCK_K=_interpreter_block_k(dp))
        return Launch(_cosine_loss_kernel, args, meta, grid, fixed=fixed)
    tuner = _tuned_fused_kernel(arch) if hist is None else _tuned_hist_kernel(arch)
    return Launch(_cosine_loss_kernel, args, meta, grid, tuner=tuner)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def transport(p: Tensor, mean: Tensor, matrix: Tensor, bias: Tensor | None) -> Tensor:
    """float32 ``[B, d] = (p.float() - mean) @ matrix (+ bias)``; p may be strided."""
    _check_device(p, mean, matrix, bias)
    batch = p.shape[0]
    d = matrix.shape[1]
    y = torch.empty((batch, d), dtype=torch.float32, device=p.device)
    if batch == 0 or d == 0:
        return y
    with _device_guard(p):
        transport_launch(p, mean, matrix, bias, y, _arch_of(p)).run()
    return y


def cosine_loss_fwd(z: Tensor, y: Tensor, eps: float, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """(float32 loss [B], grad [B, d] in z's dtype or empty); z and y may be strided."""
    _check_device(z, y)
    assert z.dim() == 2 and y.shape == z.shape
    loss, grad = _loss_outputs(z, compute_grad)
    if z.shape[0] == 0:
        return loss, grad
    with _device_guard(z):
        cosine_loss_launch(z, y, eps, compute_grad, loss, grad, _arch_of(z)).run()
    return loss, grad


def transported_cosine_loss_fwd(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Tensor | None,
    eps: float,
    compute_grad: bool,
    *,
    config: triton.Config | None = None,
) -> tuple[Tensor, Tensor]:
    """``cosine_loss_fwd(z, transport(p, mean, matrix, bias))`` without materialising y.

    ``config`` (one of ``fused_configs()``) runs that tile instead of the autotuner's pick."""
    loss, grad, _ = _fused_loss(z, p, mean, matrix, bias, eps, compute_grad, None, config)
    return loss, grad


def transported_cosine_loss_hist(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Tensor | None,
    eps: float,
    largest: bool,
    hist_bits: int = HIST_BITS,
    *,
    config: triton.Config | None = None,
) -> tuple[Tensor, Tensor]:
    """(float32 loss [B], int32 histogram [2**hist_bits]) in one pass over ``p``.

    Bin ``b`` counts the rows whose order key (see ``_order_key``; reversed unless ``largest``)
    has ``b`` as its top ``hist_bits`` bits: the first pass of a radix select of the losses.
    """
    assert 1 <= hist_bits <= 16 and z.shape[0] < 2**31  # int32 counts, bins in one int32
    hist = torch.zeros(2**hist_bits, dtype=torch.int32, device=z.device)
    histogram = (hist, largest, hist_bits)
    loss, _, hist = _fused_loss(z, p, mean, matrix, bias, eps, False, histogram, config)
    return loss, hist


def _fused_loss(
    z: Tensor,
    p: Tensor,
    mean: Tensor,
    matrix: Tensor,
    bias: Tensor | None,
    eps: float,
    compute_grad: bool,
    histogram: tuple[Tensor, bool, int] | None,
    config: triton.Config | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launch the fused kernel; ``histogram`` = (zeroed int32 bins, largest, bits) or None."""
    _check_device(z, p, mean, matrix, bias)
    assert z.dim() == 2 and p.dim() == 2 and p.shape[0] == z.shape[0]
    loss, grad = _loss_outputs(z, compute_grad)
    hist = histogram[0] if histogram is not None else None
    if z.shape[0] == 0:
        return loss, grad, hist
    launch = fused_loss_launch(
        z, p, mean, matrix, bias, eps, compute_grad, histogram, loss, grad, _arch_of(z), config
    )
    with _device_guard(z):
        launch.run()
    return loss, grad, hist
