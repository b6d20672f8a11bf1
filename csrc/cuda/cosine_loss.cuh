// C-style launchers of the CUDA transport and cosine-loss kernels (csrc/cuda/cosine_loss.cu).
//
// Why C-style: this header and its .cu include no torch or ATen header, so nvcc compile-checks
// them on any machine (tests/test_cuda_sources.py); the torch glue lives in bindings.cu alone.
// Every launcher takes raw pointers, element strides, a dtype code and a stream, enqueues its
// kernels on that stream without synchronising, and returns the launch status (cudaSuccess,
// cudaErrorInvalidValue for bad arguments, or the error of cudaGetLastError()).
//
// Conventions shared by all launchers:
// - Sizes and strides are int64 element counts; row offsets are computed in int64.
// - Inputs z, y and p may have any non-negative strides (non-contiguous views); all arithmetic
//   is float32.
// - The transport parameters (mean [Dp], matrix [Dp, d] row-major, bias [d]) are float32 and
//   contiguous; bias may be null.
// - Outputs are contiguous: loss float32 [rows]; grad [rows, d] in z's dtype (null: not wanted).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// Element type codes of the strided inputs (and of the gradient, which has z's type).
// The loss/transport launchers take FLOAT32, FLOAT16 and BFLOAT16 (the torch glue converts
// float64 to float32 first, which is what the CPU kernels compute in); rela_select_topk
// (select.cuh) also takes FLOAT64 scores, compared exactly.
enum RelaDType {
  RELA_FLOAT32 = 0,
  RELA_FLOAT16 = 1,
  RELA_BFLOAT16 = 2,
  RELA_FLOAT64 = 3,
};

// y = (p - mean) @ matrix (+ bias): the parameters of the transport and its input p.
typedef struct RelaTransportArgs {
  const void* p;      // [rows, dp], element (i, k) at p[i * p_stride0 + k * p_stride1]
  int p_dtype;        // RelaDType
  int64_t p_stride0;  // element strides of p
  int64_t p_stride1;
  const float* mean;    // [dp], contiguous
  const float* matrix;  // [dp, d], contiguous row-major
  const float* bias;    // [d], contiguous, or null
  int64_t rows;         // B
  int64_t dp;           // Dp
  int64_t d;            // d
} RelaTransportArgs;

// out[i, j] = sum_k (p[i, k] - mean[k]) * matrix[k, j] + bias[j]; out is [rows, d] float32
// contiguous.
cudaError_t rela_transport(const RelaTransportArgs* t, float* out, cudaStream_t stream);

// Per-row cosine loss of z against y (both [rows, d], any strides and supported dtypes):
// loss[i] = 1 - <z_i, y_i> / (max(|z_i|, eps) * max(|y_i|, eps)), and when grad is not null
// grad[i, :] = d loss[i] / d z_i written contiguously in z's dtype.
cudaError_t rela_cosine_loss_fwd(const void* z, int z_dtype, int64_t z_stride0, int64_t z_stride1,
                                 const void* y, int y_dtype, int64_t y_stride0, int64_t y_stride1,
                                 int64_t rows, int64_t d, float eps, float* loss, void* grad,
                                 cudaStream_t stream);

// rela_cosine_loss_fwd(z, transport(t)) without ever writing the transported targets to global
// memory. z is [t->rows, t->d].
cudaError_t rela_transported_cosine_loss_fwd(const void* z, int z_dtype, int64_t z_stride0,
                                             int64_t z_stride1, const RelaTransportArgs* t,
                                             float eps, float* loss, void* grad,
                                             cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
