// TORCH_LIBRARY_IMPL(rela, CUDA): the torch glue of the CUDA kernels.
//
// This is the only CUDA file that includes torch/ATen headers; it is compiled only where torch
// has CUDA (setup.py adds csrc/cuda/*.cu and defines RELA_WITH_CUDA). It validates arguments
// with TORCH_CHECK (mirroring csrc/cpu/cosine_loss.cpp), makes only the small float32 transport
// parameters contiguous, passes p / z / y / scores with their strides (no copies of the big
// inputs), allocates outputs and the selection workspace with torch's caching allocator on the
// inputs' device, and calls the C-style launchers on the current stream of that device,
// checking their status with C10_CUDA_CHECK (they return cudaGetLastError() after launching).
//
// float64 inputs: the CPU kernels accept them and compute in float32; here they are converted
// to float32 first (the same arithmetic) and the gradient is converted back to float64. The
// selection handles float64 scores natively with 64-bit keys.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cosine_loss.cuh"
#include "select.cuh"

namespace rela::cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "rela: ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "rela: ", name, " must be on ", ref_name, "'s device ",
              ref.device(), ", got ", t.device());
}

// float64 is computed in float32 (as the CPU kernels do); other dtypes pass through.
at::Tensor as_compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t.to(at::kFloat) : t;
}

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return RELA_FLOAT32;
    case at::kHalf:
      return RELA_FLOAT16;
    case at::kBFloat16:
      return RELA_BFLOAT16;
    case at::kDouble:
      return RELA_FLOAT64;
    default:
      TORCH_CHECK(false, "rela: ", name, " must be float32, float16, bfloat16 or float64, got ",
                  t.scalar_type());
  }
  return RELA_FLOAT32;  // unreachable
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void check_matrix_args(const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
                       const std::optional<at::Tensor>& bias) {
  check_cuda(p, "p");
  TORCH_CHECK(p.dim() == 2, "rela: p must be 2-D [B, Dp], got ", p.dim(), "-D");
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == p.size(1), "rela: mean must be [", p.size(1),
              "], got ", mean.sizes());
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) == p.size(1), "rela: matrix must be [",
              p.size(1), ", d], got ", matrix.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && matrix.scalar_type() == at::kFloat,
              "rela: transport mean and matrix must be float32, got ", mean.scalar_type(), " and ",
              matrix.scalar_type());
  check_same_device(mean, p, "mean", "p");
  check_same_device(matrix, p, "matrix", "p");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == matrix.size(1), "rela: bias must be [",
                matrix.size(1), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "rela: transport bias must be float32, got ",
                bias->scalar_type());
    check_same_device(*bias, p, "bias", "p");
  }
}

// Keeps the (possibly converted / made contiguous) tensors alive while the launch is enqueued.
struct TransportInputs {
  at::Tensor p, mean, matrix;
  std::optional<at::Tensor> bias;
  RelaTransportArgs args;
};

TransportInputs transport_inputs(const at::Tensor& p, const at::Tensor& mean,
                                 const at::Tensor& matrix,
                                 const std::optional<at::Tensor>& bias) {
  TransportInputs in;
  in.p = as_compute_dtype(p);
  in.mean = mean.contiguous();
  in.matrix = matrix.contiguous();
  if (bias.has_value()) in.bias = bias->contiguous();
  RelaTransportArgs& a = in.args;
  a.p = in.p.const_data_ptr();
  a.p_dtype = dtype_code(in.p, "p");
  a.p_stride0 = in.p.stride(0);
  a.p_stride1 = in.p.stride(1);
  a.mean = in.mean.const_data_ptr<float>();
  a.matrix = in.matrix.const_data_ptr<float>();
  a.bias = in.bias.has_value() ? in.bias->const_data_ptr<float>() : nullptr;
  a.rows = in.p.size(0);
  a.dp = in.p.size(1);
  a.d = in.matrix.size(1);
  return in;
}

void check_z(const at::Tensor& z, const at::Tensor& p, const at::Tensor& matrix) {
  check_cuda(z, "z");
  check_same_device(z, p, "z", "p");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == p.size(0) && z.size(1) == matrix.size(1),
              "rela: z must be [", p.size(0), ", ", matrix.size(1), "], got ", z.sizes());
}

at::Tensor transport_cuda(const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
                          const std::optional<at::Tensor>& bias) {
  check_matrix_args(p, mean, matrix, bias);
  const c10::cuda::CUDAGuard guard(p.device());
  const TransportInputs in = transport_inputs(p, mean, matrix, bias);
  at::Tensor y = at::empty({in.args.rows, in.args.d}, p.options().dtype(at::kFloat));
  C10_CUDA_CHECK(rela_transport(&in.args, y.mutable_data_ptr<float>(), current_stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_fwd_cuda(const at::Tensor& z, const at::Tensor& y,
                                                        double eps, bool compute_grad) {
  check_cuda(z, "z");
  check_cuda(y, "y");
  check_same_device(y, z, "y", "z");
  TORCH_CHECK(z.dim() == 2 && y.sizes() == z.sizes(), "rela: z and y must be the same [B, d], got ",
              z.sizes(), " and ", y.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = as_compute_dtype(z);
  const at::Tensor yc = as_compute_dtype(y);
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor loss = at::empty({n}, z.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({n, d}, zc.options()) : at::empty({0}, z.options());
  C10_CUDA_CHECK(rela_cosine_loss_fwd(
      zc.const_data_ptr(), dtype_code(zc, "z"), zc.stride(0), zc.stride(1), yc.const_data_ptr(),
      dtype_code(yc, "y"), yc.stride(0), yc.stride(1), n, d, static_cast<float>(eps),
      loss.mutable_data_ptr<float>(), compute_grad ? grad.mutable_data_ptr() : nullptr,
      current_stream()));
  if (compute_grad && z.scalar_type() == at::kDouble) grad = grad.to(at::kDouble);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> transported_cosine_loss_fwd_cuda(
    const at::Tensor& z, const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
    const std::optional<at::Tensor>& bias, double eps, bool compute_grad) {
  check_matrix_args(p, mean, matrix, bias);
  check_z(z, p, matrix);
  const c10::cuda::CUDAGuard guard(z.device());
  const TransportInputs in = transport_inputs(p, mean, matrix, bias);
  const at::Tensor zc = as_compute_dtype(z);
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor loss = at::empty({n}, z.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({n, d}, zc.options()) : at::empty({0}, z.options());
  C10_CUDA_CHECK(rela_transported_cosine_loss_fwd(
      zc.const_data_ptr(), dtype_code(zc, "z"), zc.stride(0), zc.stride(1), &in.args,
      static_cast<float>(eps), loss.mutable_data_ptr<float>(),
      compute_grad ? grad.mutable_data_ptr() : nullptr, current_stream()));
  if (compute_grad && z.scalar_type() == at::kDouble) grad = grad.to(at::kDouble);
  return {loss, grad};
}

at::Tensor select_topk_cuda(const at::Tensor& scores, int64_t k, bool largest) {
  check_cuda(scores, "scores");
  TORCH_CHECK(scores.dim() == 1, "rela: scores must be 1-D [N], got ", scores.dim(), "-D");
  const int code = dtype_code(scores, "scores");
  const int64_t n = scores.size(0);
  TORCH_CHECK(k >= 0 && k <= n, "rela: k must be in [0, ", n, "], got ", k);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty({k}, scores.options().dtype(at::kLong));
  if (k == 0) return out;
  at::Tensor workspace;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  if (k < n) {  // k == n needs no workspace
    ws_bytes = rela_select_topk_workspace_bytes(n);
    workspace =
        at::empty({static_cast<int64_t>(ws_bytes)}, scores.options().dtype(at::kByte));
    ws = workspace.mutable_data_ptr();
  }
  C10_CUDA_CHECK(rela_select_topk(scores.const_data_ptr(), code, n, scores.stride(0), k, largest,
                                  out.mutable_data_ptr<int64_t>(), ws, ws_bytes,
                                  current_stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> score_and_select_cuda(
    const at::Tensor& z, const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
    const std::optional<at::Tensor>& bias, double eps, int64_t k, bool largest) {
  check_matrix_args(p, mean, matrix, bias);
  check_z(z, p, matrix);
  const int64_t n = z.size(0);
  TORCH_CHECK(k >= 0 && k <= n, "rela: k must be in [0, ", n, "], got ", k);
  const c10::cuda::CUDAGuard guard(z.device());
  const TransportInputs in = transport_inputs(p, mean, matrix, bias);
  const at::Tensor zc = as_compute_dtype(z);
  at::Tensor losses = at::empty({n}, z.options().dtype(at::kFloat));
  at::Tensor out = at::empty({k}, z.options().dtype(at::kLong));
  const size_t ws_bytes = rela_score_and_select_workspace_bytes(n);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ws_bytes)}, z.options().dtype(at::kByte));
  C10_CUDA_CHECK(rela_score_and_select(
      zc.const_data_ptr(), dtype_code(zc, "z"), zc.stride(0), zc.stride(1), &in.args,
      static_cast<float>(eps), k, largest, losses.mutable_data_ptr<float>(),
      out.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr(), ws_bytes,
      current_stream()));
  return {out, losses};
}

}  // namespace

TORCH_LIBRARY_IMPL(rela, CUDA, m) {
  m.impl("transport", &transport_cuda);
  m.impl("cosine_loss_fwd", &cosine_loss_fwd_cuda);
  m.impl("transported_cosine_loss_fwd", &transported_cosine_loss_fwd_cuda);
  m.impl("select_topk", &select_topk_cuda);
  m.impl("score_and_select", &score_and_select_cuda);
}

}  // namespace rela::cuda
