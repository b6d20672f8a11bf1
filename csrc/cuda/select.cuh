// C-style launchers of the CUDA top-k selection (csrc/cuda/select.cu) and of score_and_select.
//
// Why this shape: the selection must be deterministic and return indices in ascending order
// (ties won by the lower index), for N up to ~1e8 and beyond, without a sort and without host
// synchronisation. It is a radix select of the k-th key followed by one stable compaction; the
// scratch it needs (a 256-bin histogram, a small state record and per-tile counters) is handed
// in by the caller, sized by the *_workspace_bytes() query, so the torch glue can take it from
// the caching allocator. No torch header here, so nvcc compile-checks it anywhere.
//
// All launchers enqueue on `stream`, never synchronise, and return cudaSuccess,
// cudaErrorInvalidValue (bad arguments, workspace too small or not 16-byte aligned) or the
// launch error reported by cudaGetLastError().
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cosine_loss.cuh"  // RelaDType, RelaTransportArgs

#ifdef __cplusplus
extern "C" {
#endif

// Bytes of workspace rela_select_topk needs for n scores (any dtype, any k).
size_t rela_select_topk_workspace_bytes(int64_t n);

// out[0 .. k) = the indices of the k largest (largest=true) or smallest scores, ties won by the
// lower index, in ascending index order. scores[i] is at element offset i * stride; dtype is
// RELA_FLOAT32, RELA_FLOAT16, RELA_BFLOAT16 or RELA_FLOAT64. -0.0 ties with 0.0, infinities are
// ordinary values; NaN (rejected by the Python layer) orders above +inf (or below -inf when its
// sign bit is set) and never faults. 0 <= k <= n. k == 0 and k == n need no workspace.
cudaError_t rela_select_topk(const void* scores, int dtype, int64_t n, int64_t stride, int64_t k,
                             bool largest, int64_t* out, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Bytes of workspace rela_score_and_select needs for t->rows rows.
size_t rela_score_and_select_workspace_bytes(int64_t rows);

// losses[0 .. rows) = the transported cosine losses of every row (as
// rela_transported_cosine_loss_fwd without gradient), then out[0 .. k) = their top-k as
// rela_select_topk(losses, RELA_FLOAT32, rows, 1, k, largest, ...).
cudaError_t rela_score_and_select(const void* z, int z_dtype, int64_t z_stride0, int64_t z_stride1,
                                  const RelaTransportArgs* t, float eps, int64_t k, bool largest,
                                  float* losses, int64_t* out, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
