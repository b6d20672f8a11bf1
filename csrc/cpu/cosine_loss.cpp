// CPU kernels for transport, cosine_loss_fwd and transported_cosine_loss_fwd.
//
// Work is split into blocks of rows, one block at a time per thread. For each block the thread
// centres and upcasts its rows of p into a small float32 buffer, multiplies that by the transport
// matrix into a second small buffer (single-threaded MKL inside the parallel region), then computes
// norms, dot products and the gradient while both buffers are still in cache. The only [B, d]
// tensor ever allocated is the gradient itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace rela::cpu {
namespace {

// 128 rows x 768 features x 4 bytes = 384 KiB: the block of p and its targets stay in L2.
constexpr int64_t kRowBlock = 128;

void check_matrix_args(const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(p.dim() == 2, "rela: p must be 2-D [B, Dp], got ", p.dim(), "-D");
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == p.size(1), "rela: mean must be [", p.size(1),
              "], got ", mean.sizes());
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) == p.size(1), "rela: matrix must be [",
              p.size(1), ", d], got ", matrix.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat && matrix.scalar_type() == at::kFloat,
              "rela: transport mean and matrix must be float32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == matrix.size(1), "rela: bias must be [",
                matrix.size(1), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == at::kFloat, "rela: transport bias must be float32");
  }
}

// Rows [r0, r0 + rows) of (p - mean) @ matrix + bias into out (row stride out_stride).
template <typename scalar_t>
void transport_block(const at::Tensor& p, int64_t r0, int64_t rows, const float* mean,
                     const at::Tensor& matrix, const float* bias, float* centred, float* out,
                     int64_t out_stride) {
  const int64_t dp = p.size(1);
  const int64_t d = matrix.size(1);
  const scalar_t* base = p.data_ptr<scalar_t>();
  const int64_t s0 = p.stride(0), s1 = p.stride(1);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = base + (r0 + i) * s0;
    float* dst = centred + i * dp;
    if (s1 == 1) {
#pragma omp simd
      for (int64_t k = 0; k < dp; ++k) dst[k] = static_cast<float>(row[k]) - mean[k];
    } else {
      for (int64_t k = 0; k < dp; ++k) dst[k] = static_cast<float>(row[k * s1]) - mean[k];
    }
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = at::from_blob(centred, {rows, dp}, opts);
  at::Tensor c = at::from_blob(out, {rows, d}, {out_stride, 1}, opts);
  at::mm_out(c, a, matrix);
  if (bias != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = out + i * out_stride;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dst[j] += bias[j];
    }
  }
}

// Loss (and gradient) of rows [r0, r0 + rows) given their targets y (float32, row stride d).
template <typename scalar_t>
void loss_block(const at::Tensor& z, int64_t r0, int64_t rows, const float* y, int64_t y_stride,
                float eps, float* loss, scalar_t* grad, float* zrow) {
  const int64_t d = z.size(1);
  const scalar_t* base = z.data_ptr<scalar_t>();
  const int64_t s0 = z.stride(0), s1 = z.stride(1);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src = base + (r0 + i) * s0;
    for (int64_t j = 0; j < d; ++j) zrow[j] = static_cast<float>(src[j * s1]);
    const float* yrow = y + i * y_stride;
    float dot = 0.f, zz = 0.f, yy = 0.f;
#pragma omp simd reduction(+ : dot, zz, yy)
    for (int64_t j = 0; j < d; ++j) {
      dot += zrow[j] * yrow[j];
      zz += zrow[j] * zrow[j];
      yy += yrow[j] * yrow[j];
    }
    const float znorm = std::sqrt(zz);
    const float nz = std::max(znorm, eps);
    const float ny = std::max(std::sqrt(yy), eps);
    const float inv = 1.f / (nz * ny);
    const float cosine = dot * inv;
    loss[r0 + i] = 1.f - cosine;
    if (grad != nullptr) {
      // d(1 - cos)/dz = -y / (|z||y|) + cos * z / |z|^2; the second term vanishes where the
      // norm is clamped to eps (the clamp has zero gradient there, as in torch).
      const float a = -inv;
      const float b = znorm >= eps ? cosine / (nz * nz) : 0.f;
      scalar_t* g = grad + (r0 + i) * d;
      for (int64_t j = 0; j < d; ++j) g[j] = static_cast<scalar_t>(a * yrow[j] + b * zrow[j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> make_outputs(const at::Tensor& z, bool compute_grad) {
  at::Tensor loss = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({z.size(0), z.size(1)}, z.options())
                                 : at::empty({0}, z.options());
  return {loss, grad};
}

at::Tensor transport_cpu(const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
                         const std::optional<at::Tensor>& bias) {
  check_matrix_args(p, mean, matrix, bias);
  const at::Tensor m = matrix.contiguous();
  const at::Tensor mu = mean.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const int64_t n = p.size(0), dp = p.size(1), d = m.size(1);
  at::Tensor y = at::empty({n, d}, p.options().dtype(at::kFloat));
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "rela_transport", [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> centred(kRowBlock * dp);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
        transport_block<scalar_t>(p, r0, rows, mu.data_ptr<float>(), m,
                                  b ? b->data_ptr<float>() : nullptr, centred.data(),
                                  y.data_ptr<float>() + r0 * d, d);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> cosine_loss_fwd_cpu(const at::Tensor& z, const at::Tensor& y,
                                                       double eps, bool compute_grad) {
  TORCH_CHECK(z.dim() == 2 && y.sizes() == z.sizes(), "rela: z and y must be the same [B, d], got ",
              z.sizes(), " and ", y.sizes());
  auto [loss, grad] = make_outputs(z, compute_grad);
  const at::Tensor yf = y.to(at::kFloat).contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "rela_cosine_loss", [&] {
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> zrow(d);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
        loss_block<scalar_t>(z, r0, rows, yf.data_ptr<float>() + r0 * d, d,
                             static_cast<float>(eps), loss.data_ptr<float>(),
                             compute_grad ? grad.data_ptr<scalar_t>() : nullptr, zrow.data());
      }
    });
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> transported_cosine_loss_fwd_cpu(
    const at::Tensor& z, const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
    const std::optional<at::Tensor>& bias, double eps, bool compute_grad) {
  check_matrix_args(p, mean, matrix, bias);
  TORCH_CHECK(z.dim() == 2 && z.size(0) == p.size(0) && z.size(1) == matrix.size(1),
              "rela: z must be [", p.size(0), ", ", matrix.size(1), "], got ", z.sizes());
  auto [loss, grad] = make_outputs(z, compute_grad);
  const at::Tensor m = matrix.contiguous();
  const at::Tensor mu = mean.contiguous();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const int64_t n = z.size(0), dp = p.size(1), d = m.size(1);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "rela_tcl_p", [&] {
    using p_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "rela_tcl_z", [&] {
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> centred(kRowBlock * dp), targets(kRowBlock * d), zrow(d);
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
          transport_block<p_t>(p, r0, rows, mu.data_ptr<float>(), m,
                               b ? b->data_ptr<float>() : nullptr, centred.data(), targets.data(),
                               d);
          loss_block<scalar_t>(z, r0, rows, targets.data(), d, static_cast<float>(eps),
                               loss.data_ptr<float>(),
                               compute_grad ? grad.data_ptr<scalar_t>() : nullptr, zrow.data());
        }
      });
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rela, CPU, m) {
  m.impl("transport", &transport_cpu);
  m.impl("cosine_loss_fwd", &cosine_loss_fwd_cpu);
  m.impl("transported_cosine_loss_fwd", &transported_cosine_loss_fwd_cpu);
}

}  // namespace rela::cpu
