// CUDA kernels for transport, cosine_loss_fwd and transported_cosine_loss_fwd (launchers declared
// in cosine_loss.cuh). They compute what csrc/cpu/cosine_loss.cpp computes, in float32.
//
// Design.
// - transport_tile<C>() is the one main loop: a CTA computes a [BM, BN] tile of
//   (p - mean) @ matrix by stepping over Dp in BK = 16 slices. Each slice of p is centred,
//   converted to float (p may be strided, fp32/fp16/bf16) and stored transposed in shared
//   memory; the matching slice of the matrix is stored as is. Slices are double-buffered: the
//   next one is fetched into registers while the current one is multiplied, so one
//   __syncthreads() per slice suffices. Each thread owns a 4 x 8 register tile (rows ty*4..,
//   columns tx*4.. and BN/2 + tx*4..: both are conflict-free float4 shared-memory reads).
//   Plain FP32 FMA, so fp32 inputs keep fp32 accuracy (tensor cores would round p - mean and
//   the matrix to TF32/bf16, outside the 1e-5 contract).
// - The finished tile goes to shared memory (aliasing the slice buffers), so the epilogues can
//   walk it with a warp per row and lanes along the columns: coalesced loads of z and stores
//   of y or of the gradient, whatever z's strides.
// - transport_kernel: one tile per (row block, column block); writes tile + bias.
// - fused_loss_kernel: a CTA owns BM rows and walks every column tile of d, adding each tile's
//   <z, y>, |z|^2, |y|^2 (y = tile + bias) to per-row sums in shared memory (warp shuffles
//   reduce a row's tile, lane 0 of the owning warp adds). After the last tile it writes the
//   losses and the gradient coefficients a, b (grad = a*y + b*z). The gradient needs them
//   before y is touched again: when d fits one tile, the y tile is still in shared memory;
//   otherwise the tiles are recomputed (twice the FLOPs, but y never goes to global memory,
//   as the op contract requires). Tile shapes: BM=64/BN=128 (256 threads) for large batches,
//   BM=32/BN=128 (128 threads) when 64-row blocks would not fill the GPU, BM=32/BN=256 when
//   128 < d <= 256 (one tile, no recomputation).
// - cosine_loss_kernel (y given): one warp per row, strided loads, shuffle reduction, then a
//   second sweep for the gradient.
// - Dtypes: z's type is a template parameter of the fused kernel (it sets the epilogues' loads
//   and stores; a run-time switch there cost ~100 registers); p's type is a warp-uniform
//   run-time switch in the slice fetch, a small share of the work next to the FMA loop, which
//   keeps the instance count (and compile time) low. fp64 inputs are converted by the torch
//   glue, as the CPU kernels compute them in fp32 too.
// - Index arithmetic is int64; all loops that contain __syncthreads() or shuffles have block-
//   (or warp-) uniform trip counts, and every bound check is per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cosine_loss.cuh"

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float load_f32(const void* base, int64_t off, int dtype) {
  switch (dtype) {
    case RELA_FLOAT16:
      return __half2float(static_cast<const __half*>(base)[off]);
    case RELA_BFLOAT16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
    default:
      return static_cast<const float*>(base)[off];
  }
}

__device__ __forceinline__ void store_f32(void* base, int64_t off, int dtype, float v) {
  switch (dtype) {
    case RELA_FLOAT16:
      static_cast<__half*>(base)[off] = __float2half_rn(v);
      break;
    case RELA_BFLOAT16:
      static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(base)[off] = v;
  }
}

// std::max(v, eps) as the CPU kernel has it: a NaN norm stays NaN (like torch's clamp_min).
__device__ __forceinline__ float clamp_min_eps(float v, float eps) { return v < eps ? eps : v; }

struct RowCoef {
  float loss;  // 1 - cos
  float a;     // grad = a * y + b * z
  float b;
};

__device__ __forceinline__ RowCoef finish_row(float dot, float zz, float yy, float eps) {
  const float znorm = sqrtf(zz);
  const float nz = clamp_min_eps(znorm, eps);
  const float ny = clamp_min_eps(sqrtf(yy), eps);
  const float inv = 1.f / (nz * ny);
  const float cosine = dot * inv;
  RowCoef c;
  c.loss = 1.f - cosine;
  c.a = -inv;
  // The |z| term vanishes where the norm is clamped to eps (zero gradient of the clamp).
  c.b = znorm >= eps ? cosine / (nz * nz) : 0.f;
  return c;
}

bool valid_dtype(int dtype) {
  return dtype == RELA_FLOAT32 || dtype == RELA_FLOAT16 || dtype == RELA_BFLOAT16;
}

// ------------------------------------------------------------------------------------------
// Tiled transport main loop.

template <int BM_, int BN_, int TX_>
struct Tile {
  static constexpr int BM = BM_;  // rows per CTA
  static constexpr int BN = BN_;  // columns of d per tile
  static constexpr int TX = TX_;  // threads across the columns (lanes that share a row)
  static constexpr int BK = 16;   // depth of one Dp slice
  static constexpr int TM = 4;    // rows per thread
  static constexpr int TN = 8;    // columns per thread: two float4 groups BN/2 apart
  static constexpr int TY = BM / TM;
  static constexpr int NT = TX * TY;  // threads per CTA
  static constexpr int LDA = BM + 4;  // padded row of the transposed p slice (float4-aligned)
  static constexpr int A_PER = BM * BK / NT;
  static constexpr int B_PER = BK * BN / NT;
  // Resident CTAs per SM the register budget must allow (<= 128 registers per thread): 512
  // threads per SM keep the FMA pipes busy while a CTA waits at a barrier.
  static constexpr int kMinBlocks = 512 / NT;
  static_assert(BM % TM == 0, "BM must be a multiple of TM");
  static_assert(BN == TX * TN, "BN must be TX * TN");
  static_assert(NT % 32 == 0, "whole warps only");
  static_assert((BM * BK) % NT == 0 && (BK * BN) % NT == 0, "slices must split evenly");
  static_assert(NT % BK == 0 && NT % BN == 0, "fixed per-thread slice positions");
  static_assert(LDA % 4 == 0 && BN % 8 == 0, "float4 alignment");
};

template <class C>
struct alignas(16) TileSmem {
  float a[2][C::BK][C::LDA];  // centred p slice, transposed: a[buf][k][row]
  float b[2][C::BK][C::BN];   // matrix slice: b[buf][k][col]
};

// acc[i][j] = sum_k (p[r0 + ty*4 + i, k] - mean[k]) * matrix[k, c0 + col(j)] with
// col(j) = tx*4 + j for j < 4 and BN/2 + tx*4 + (j - 4) otherwise; zero outside p / matrix.
// All threads of the CTA must call it (it synchronises, and ends with a barrier).
template <class C>
__device__ __forceinline__ void transport_tile(const RelaTransportArgs& t, int64_t r0, int64_t c0,
                                               TileSmem<C>& sm, float (&acc)[C::TM][C::TN]) {
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % C::TX;
  const int ty = tid / C::TX;
#pragma unroll
  for (int i = 0; i < C::TM; ++i) {
#pragma unroll
    for (int j = 0; j < C::TN; ++j) acc[i][j] = 0.f;
  }
  const int64_t nk = (t.dp + C::BK - 1) / C::BK;
  if (nk <= 0) return;  // uniform: Dp == 0 gives an all-zero product

  float ra[C::A_PER];
  float rb[C::B_PER];
  // Fixed per-thread positions in the slices. p: consecutive threads walk k (the contiguous
  // direction of a row-major p), rows a_r + it * (NT / BK). matrix: consecutive threads walk
  // columns, slice rows b_k + it * (NT / BN).
  const int a_r = tid / C::BK;
  const int a_k = tid % C::BK;
  const int b_k = tid / C::BN;
  const int b_c = tid % C::BN;
  const int64_t col = c0 + b_c;
  const bool col_ok = col < t.d;
  const int64_t p_step = static_cast<int64_t>(C::NT / C::BK) * t.p_stride0;
  const int64_t m_step = static_cast<int64_t>(C::NT / C::BN) * t.d;
  // Global -> registers for the slice starting at k0.
  auto fetch = [&](int64_t k0) {
    const int64_t ka = k0 + a_k;
    const bool ka_ok = ka < t.dp;
    const float mu = ka_ok ? t.mean[ka] : 0.f;
    const int64_t p_off = (r0 + a_r) * t.p_stride0 + ka * t.p_stride1;
#pragma unroll
    for (int it = 0; it < C::A_PER; ++it) {
      const int64_t row = r0 + a_r + it * (C::NT / C::BK);
      float v = 0.f;
      if (ka_ok && row < t.rows) v = load_f32(t.p, p_off + it * p_step, t.p_dtype) - mu;
      ra[it] = v;
    }
    const int64_t kb = k0 + b_k;
    const int64_t m_off = kb * t.d + col;
#pragma unroll
    for (int it = 0; it < C::B_PER; ++it) {
      const bool ok = col_ok && kb + it * (C::NT / C::BN) < t.dp;
      rb[it] = ok ? t.matrix[m_off + it * m_step] : 0.f;
    }
  };
  // Registers -> shared buffer buf.
  auto stash = [&](int buf) {
#pragma unroll
    for (int it = 0; it < C::A_PER; ++it) sm.a[buf][a_k][a_r + it * (C::NT / C::BK)] = ra[it];
#pragma unroll
    for (int it = 0; it < C::B_PER; ++it) sm.b[buf][b_k + it * (C::NT / C::BN)][b_c] = rb[it];
  };

  fetch(0);
  stash(0);
  __syncthreads();
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int cur = static_cast<int>(kt & 1);
    const bool more = kt + 1 < nk;
    if (more) fetch((kt + 1) * C::BK);  // in flight while this slice is multiplied
#pragma unroll
    for (int kk = 0; kk < C::BK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&sm.a[cur][kk][ty * C::TM]);
      const float4 b0 = *reinterpret_cast<const float4*>(&sm.b[cur][kk][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&sm.b[cur][kk][C::BN / 2 + tx * 4]);
      const float a[C::TM] = {av.x, av.y, av.z, av.w};
      const float b[C::TN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < C::TM; ++i) {
#pragma unroll
        for (int j = 0; j < C::TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    // Buffer cur ^ 1 was last read in the previous iteration, which ended with a barrier.
    if (more) stash(cur ^ 1);
    __syncthreads();
  }
}

using TileLarge = Tile<64, 128, 16>;  // 256 threads
using TileSmall = Tile<32, 128, 16>;  // 128 threads: more CTAs for small batches
using TileWide = Tile<32, 256, 32>;   // 256 threads: 128 < d <= 256 in one tile

// Shared memory of the kernels: the main loop's slices and the finished [BM, BN] tile of y share
// the same bytes (the main loop ends with a barrier before the tile is written, and the tile is
// consumed before the next main loop starts).
template <class C>
struct KernelSmem {
  static constexpr int LDY = C::BN + 4;  // padded row of the y tile (float4-aligned)
  union alignas(16) {
    TileSmem<C> tile;
    float y[C::BM][LDY];
  } u;
  float stats[C::BM][3];  // per-row <z, y>, |z|^2, |y|^2 accumulated over column tiles
  float coef[C::BM][2];   // per-row gradient coefficients a, b
};

// Registers -> smem y tile (then a barrier): afterwards warps can walk rows with lanes along
// columns, which makes the global loads of z and the stores of y / grad coalesced.
template <class C>
__device__ __forceinline__ void store_y_tile(KernelSmem<C>& sm, const float (&acc)[C::TM][C::TN]) {
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % C::TX;
  const int ty = tid / C::TX;
#pragma unroll
  for (int i = 0; i < C::TM; ++i) {
    float* dst = &sm.u.y[ty * C::TM + i][0];
    *reinterpret_cast<float4*>(dst + tx * 4) =
        make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    *reinterpret_cast<float4*>(dst + C::BN / 2 + tx * 4) =
        make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
  }
  __syncthreads();
}

template <class T>
__device__ __forceinline__ float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <class T>
__device__ __forceinline__ T from_f32(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Arguments of the fused loss kernel that the epilogues need.
struct LossArgs {
  const void* z;
  int z_dtype;
  int64_t z_stride0;
  int64_t z_stride1;
  float eps;
  float* loss;
  void* grad;  // [rows, d] contiguous in z's dtype, or null
};

// Adds the tile's contribution to the per-row sums. Warp w owns rows w*RPW .. w*RPW+RPW-1 of
// the block, so its lane 0 is the only writer of those rows' stats.
template <class C, class ZT>
__device__ __forceinline__ void stats_epilogue(KernelSmem<C>& sm, const RelaTransportArgs& t,
                                               const LossArgs& la, int64_t r0, int64_t c0) {
  constexpr int kWarps = C::NT / 32;
  constexpr int kRowsPerWarp = C::BM / kWarps;
  static_assert(C::BM % kWarps == 0, "rows must split evenly over warps");
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const ZT* z = static_cast<const ZT*>(la.z);
#pragma unroll 1
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t row = r0 + r;
    if (row >= t.rows) break;  // warp-uniform
    float dot = 0.f, zz = 0.f, yy = 0.f;
#pragma unroll
    for (int m = 0; m < C::BN / 32; ++m) {
      const int c = lane + 32 * m;
      const int64_t col = c0 + c;
      if (col < t.d) {
        const float y = sm.u.y[r][c] + (t.bias != nullptr ? t.bias[col] : 0.f);
        const float zv = to_f32(z[row * la.z_stride0 + col * la.z_stride1]);
        dot = fmaf(zv, y, dot);
        zz = fmaf(zv, zv, zz);
        yy = fmaf(y, y, yy);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      dot += __shfl_xor_sync(kFullMask, dot, off);
      zz += __shfl_xor_sync(kFullMask, zz, off);
      yy += __shfl_xor_sync(kFullMask, yy, off);
    }
    if (lane == 0) {
      sm.stats[r][0] += dot;
      sm.stats[r][1] += zz;
      sm.stats[r][2] += yy;
    }
  }
}

// grad[row, col] = a_row * y + b_row * z for the tile's rows and columns.
template <class C, class ZT>
__device__ __forceinline__ void grad_epilogue(KernelSmem<C>& sm, const RelaTransportArgs& t,
                                              const LossArgs& la, int64_t r0, int64_t c0) {
  constexpr int kWarps = C::NT / 32;
  constexpr int kRowsPerWarp = C::BM / kWarps;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const ZT* z = static_cast<const ZT*>(la.z);
  ZT* grad = static_cast<ZT*>(la.grad);
#pragma unroll 1
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    const int64_t row = r0 + r;
    if (row >= t.rows) break;
    const float a = sm.coef[r][0];
    const float b = sm.coef[r][1];
#pragma unroll
    for (int m = 0; m < C::BN / 32; ++m) {
      const int c = lane + 32 * m;
      const int64_t col = c0 + c;
      if (col < t.d) {
        const float y = sm.u.y[r][c] + (t.bias != nullptr ? t.bias[col] : 0.f);
        const float zv = to_f32(z[row * la.z_stride0 + col * la.z_stride1]);
        grad[row * t.d + col] = from_f32<ZT>(a * y + b * zv);
      }
    }
  }
}

// Loss and gradient coefficients of the block's rows from their finished sums.
template <class C>
__device__ __forceinline__ void finish_rows(KernelSmem<C>& sm, const RelaTransportArgs& t,
                                            const LossArgs& la, int64_t r0) {
  for (int r = static_cast<int>(threadIdx.x); r < C::BM; r += C::NT) {
    const int64_t row = r0 + r;
    const RowCoef c = finish_row(sm.stats[r][0], sm.stats[r][1], sm.stats[r][2], la.eps);
    sm.coef[r][0] = c.a;
    sm.coef[r][1] = c.b;
    if (row < t.rows) la.loss[row] = c.loss;
  }
}

template <class C>
__global__ void __launch_bounds__(C::NT, C::kMinBlocks)
    transport_kernel(RelaTransportArgs t, float* out) {
  __shared__ KernelSmem<C> sm;
  constexpr int kWarps = C::NT / 32;
  constexpr int kRowsPerWarp = C::BM / kWarps;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t row_blocks = (t.rows + C::BM - 1) / C::BM;
  const int64_t col_blocks = (t.d + C::BN - 1) / C::BN;
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    for (int64_t cb = blockIdx.y; cb < col_blocks; cb += gridDim.y) {
      const int64_t r0 = rb * C::BM;
      const int64_t c0 = cb * C::BN;
      float acc[C::TM][C::TN];
      transport_tile<C>(t, r0, c0, sm.u.tile, acc);
      store_y_tile<C>(sm, acc);
#pragma unroll 1
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t row = r0 + r;
        if (row >= t.rows) break;
#pragma unroll
        for (int m = 0; m < C::BN / 32; ++m) {
          const int c = lane + 32 * m;
          const int64_t col = c0 + c;
          if (col < t.d) {
            out[row * t.d + col] = sm.u.y[r][c] + (t.bias != nullptr ? t.bias[col] : 0.f);
          }
        }
      }
      __syncthreads();  // the y tile is read before the next main loop overwrites it
    }
  }
}

// Steps 0 .. col_blocks-1 accumulate the row sums tile by tile; after the last one the losses
// and gradient coefficients are final. With a gradient, steps col_blocks .. 2*col_blocks-1
// write it, recomputing each tile when there is more than one (with a single tile the y tile is
// still in shared memory). One call site each keeps the inlined main loop single.
template <class C, class ZT>
__global__ void __launch_bounds__(C::NT, C::kMinBlocks)
    fused_loss_kernel(RelaTransportArgs t, LossArgs la) {
  __shared__ KernelSmem<C> sm;
  const int64_t row_blocks = (t.rows + C::BM - 1) / C::BM;
  const int64_t col_blocks = (t.d + C::BN - 1) / C::BN;
  const int64_t steps = col_blocks + (la.grad != nullptr ? col_blocks : 0);
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const int64_t r0 = rb * C::BM;
    for (int i = static_cast<int>(threadIdx.x); i < C::BM * 3; i += C::NT) {
      (&sm.stats[0][0])[i] = 0.f;
    }
    __syncthreads();
    for (int64_t s = 0; s < steps; ++s) {
      const bool grad_step = s >= col_blocks;
      const int64_t c0 = (grad_step ? s - col_blocks : s) * C::BN;
      if (!grad_step || col_blocks > 1) {
        float acc[C::TM][C::TN];
        transport_tile<C>(t, r0, c0, sm.u.tile, acc);
        store_y_tile<C>(sm, acc);
      }
      if (!grad_step) {
        stats_epilogue<C, ZT>(sm, t, la, r0, c0);
      } else {
        grad_epilogue<C, ZT>(sm, t, la, r0, c0);
      }
      __syncthreads();
      if (s == col_blocks - 1) {
        finish_rows<C>(sm, t, la, r0);
        __syncthreads();
      }
    }
    if (col_blocks == 0) finish_rows<C>(sm, t, la, r0);  // d == 0: loss 1 per row
    __syncthreads();  // stats are read before the next row block clears them
  }
}

constexpr int kLossThreads = 256;  // 8 warps, one row each

__global__ void __launch_bounds__(kLossThreads)
    cosine_loss_kernel(const void* z, int z_dtype, int64_t z_stride0, int64_t z_stride1,
                       const void* y, int y_dtype, int64_t y_stride0, int64_t y_stride1,
                       int64_t rows, int64_t d, float eps, float* loss, void* grad) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t row = warp; row < rows; row += warp_stride) {  // warp-uniform
    float dot = 0.f, zz = 0.f, yy = 0.f;
    for (int64_t j = lane; j < d; j += 32) {
      const float zv = load_f32(z, row * z_stride0 + j * z_stride1, z_dtype);
      const float yv = load_f32(y, row * y_stride0 + j * y_stride1, y_dtype);
      dot = fmaf(zv, yv, dot);
      zz = fmaf(zv, zv, zz);
      yy = fmaf(yv, yv, yy);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      dot += __shfl_xor_sync(kFullMask, dot, off);
      zz += __shfl_xor_sync(kFullMask, zz, off);
      yy += __shfl_xor_sync(kFullMask, yy, off);
    }
    const RowCoef coef = finish_row(dot, zz, yy, eps);
    if (lane == 0) loss[row] = coef.loss;
    if (grad != nullptr) {
      for (int64_t j = lane; j < d; j += 32) {
        const float zv = load_f32(z, row * z_stride0 + j * z_stride1, z_dtype);
        const float yv = load_f32(y, row * y_stride0 + j * y_stride1, y_dtype);
        store_f32(grad, row * d + j, z_dtype, coef.a * yv + coef.b * zv);
      }
    }
  }
}

unsigned grid_dim(int64_t blocks, int64_t cap) {
  if (blocks < 1) return 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

bool valid_transport(const RelaTransportArgs* t) {
  if (t == nullptr || t->rows < 0 || t->dp < 0 || t->d < 0) return false;
  if (t->rows > 0 && t->dp > 0 && t->d > 0) {
    if (t->p == nullptr || t->mean == nullptr || t->matrix == nullptr) return false;
    if (!valid_dtype(t->p_dtype)) return false;
  }
  return true;
}

template <class C>
cudaError_t launch_fused(const void* z, int z_dtype, int64_t z_stride0, int64_t z_stride1,
                         const RelaTransportArgs& t, float eps, float* loss, void* grad,
                         cudaStream_t stream) {
  const int64_t blocks = (t.rows + C::BM - 1) / C::BM;
  LossArgs la;
  la.z = z;
  la.z_dtype = z_dtype;
  la.z_stride0 = z_stride0;
  la.z_stride1 = z_stride1;
  la.eps = eps;
  la.loss = loss;
  la.grad = t.d > 0 ? grad : nullptr;
  const unsigned grid = grid_dim(blocks, INT_MAX);
  switch (z_dtype) {
    case RELA_FLOAT16:
      fused_loss_kernel<C, __half><<<grid, C::NT, 0, stream>>>(t, la);
      break;
    case RELA_BFLOAT16:
      fused_loss_kernel<C, __nv_bfloat16><<<grid, C::NT, 0, stream>>>(t, la);
      break;
    default:
      fused_loss_kernel<C, float><<<grid, C::NT, 0, stream>>>(t, la);
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t rela_transport(const RelaTransportArgs* t, float* out,
                                      cudaStream_t stream) {
  if (!valid_transport(t)) return cudaErrorInvalidValue;
  if (t->rows == 0 || t->d == 0) return cudaSuccess;
  if (out == nullptr) return cudaErrorInvalidValue;
  using C = TileLarge;
  const int64_t row_blocks = (t->rows + C::BM - 1) / C::BM;
  const int64_t col_blocks = (t->d + C::BN - 1) / C::BN;
  const dim3 grid(grid_dim(row_blocks, INT_MAX), grid_dim(col_blocks, 65535));
  transport_kernel<C><<<grid, C::NT, 0, stream>>>(*t, out);
  return cudaGetLastError();
}

extern "C" cudaError_t rela_cosine_loss_fwd(const void* z, int z_dtype, int64_t z_stride0,
                                            int64_t z_stride1, const void* y, int y_dtype,
                                            int64_t y_stride0, int64_t y_stride1, int64_t rows,
                                            int64_t d, float eps, float* loss, void* grad,
                                            cudaStream_t stream) {
  if (rows < 0 || d < 0 || !valid_dtype(z_dtype) || !valid_dtype(y_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  if (loss == nullptr || (d > 0 && (z == nullptr || y == nullptr))) return cudaErrorInvalidValue;
  if (d == 0) grad = nullptr;  // nothing to write
  const int64_t warps_per_block = kLossThreads / 32;
  const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  cosine_loss_kernel<<<grid_dim(blocks, INT_MAX), kLossThreads, 0, stream>>>(
      z, z_dtype, z_stride0, z_stride1, y, y_dtype, y_stride0, y_stride1, rows, d, eps, loss, grad);
  return cudaGetLastError();
}

extern "C" cudaError_t rela_transported_cosine_loss_fwd(const void* z, int z_dtype,
                                                        int64_t z_stride0, int64_t z_stride1,
                                                        const RelaTransportArgs* t, float eps,
                                                        float* loss, void* grad,
                                                        cudaStream_t stream) {
  if (!valid_transport(t) || !valid_dtype(z_dtype)) return cudaErrorInvalidValue;
  if (t->rows == 0) return cudaSuccess;
  if (loss == nullptr || (t->d > 0 && z == nullptr)) return cudaErrorInvalidValue;
  if (t->d > TileLarge::BN && t->d <= TileWide::BN) {
    return launch_fused<TileWide>(z, z_dtype, z_stride0, z_stride1, *t, eps, loss, grad, stream);
  }
  int device = 0;
  int sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err != cudaSuccess) return err;
  // Two resident CTAs per SM is about what the 256-thread shape reaches; below that, halve BM.
  const int64_t large_blocks = (t->rows + TileLarge::BM - 1) / TileLarge::BM;
  if (large_blocks >= 2 * static_cast<int64_t>(sms)) {
    return launch_fused<TileLarge>(z, z_dtype, z_stride0, z_stride1, *t, eps, loss, grad, stream);
  }
  return launch_fused<TileSmall>(z, z_dtype, z_stride0, z_stride1, *t, eps, loss, grad, stream);
}
