// Batch-covariance Gaussian noise (TPAMI Eq. 13-17, docs/methods/ogm_ge.md): entry points and CPU twins.
//
// cov_noise_tap_backward: grad_in[i, ...] = grad[i, ...] * (k + sigma * (z_i - mean(z))), z_i = philox_normal(seed,
// offset + i). Because the loss is a batch mean, this adds h = 1/B sum_i (z_i - z_bar) g_i to every encoder parameter's
// gradient, whose covariance is the mini-batch gradient covariance divided by B (Eq. 16).
// sample_cov_noise: h = (z - mean z)^T G / B from explicit per-sample gradients G [B, P].
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <type_traits>
#include <vector>

#include "noise_math.h"
#include "ops.h"
#include "parallel_cpu.h"
#include "philox.h"
#include "philox_vec_cpu.h"

namespace mmk {
namespace {

constexpr const char* kTap = "cov_noise_tap_backward";
constexpr const char* kSample = "sample_cov_noise";

// z_i for i < B and their mean, exactly as the CUDA kernel computes them (double sum, one rounding to float).
float normals_and_mean(uint64_t seed, uint64_t offset, int64_t B, std::vector<float>& z) {
  z.resize(B);
  cpu::philox_normal0_block(seed, offset, B, z.data());
  double sum = 0.0;
  for (int64_t i = 0; i < B; ++i) sum += static_cast<double>(z[i]);
  return static_cast<float>(sum / static_cast<double>(B));
}

// o[j] = g[j] * f, each product rounded once in opmath (the CUDA kernel's mul_rn).
template <typename scalar_t>
void scale_row(const scalar_t* g, at::opmath_type<scalar_t> f, scalar_t* o, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::scale_f32(g, f, o, n);
  } else {
    using opmath_t = at::opmath_type<scalar_t>;
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(mul_rn(static_cast<opmath_t>(g[j]), f));
  }
}

void check_k(const at::Tensor& k, const at::Tensor& ref, const char* op) {
  check_float_tensor(k, op, "k");
  TORCH_CHECK(k.numel() == 1, op, ": k must hold one value (a 0-dim tensor), got shape ", k.sizes());
  check_same_device(k, ref.device(), op, "k", "grad");
}

}  // namespace

at::Tensor cov_noise_tap_backward(const at::Tensor& grad, const at::Tensor& k, double sigma, int64_t seed,
                                  int64_t offset) {
  check_float_tensor(grad, kTap, "grad");
  TORCH_CHECK(grad.dim() >= 1 && grad.size(0) > 0, kTap, ": grad must have shape [B, ...] with B > 0, got shape ",
              grad.sizes());
  check_contiguous(grad, kTap, "grad");
  check_k(k, grad, kTap);
  if (grad.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return cov_noise_tap_backward_cuda(grad, k, static_cast<float>(sigma), static_cast<uint64_t>(seed),
                                       static_cast<uint64_t>(offset));
#else
    TORCH_CHECK(false, kTap, ": mmkernels._C was built without CUDA kernels, got a CUDA tensor");
#endif
  }
  TORCH_CHECK(grad.device().is_cpu(), kTap, ": grad must be a CPU or CUDA tensor, got ", grad.device());
  const int64_t B = grad.size(0);
  const int64_t R = B ? grad.numel() / B : 0;
  std::vector<float> factor;
  const float z_mean = normals_and_mean(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), B, factor);
  const float kv = k.to(at::kFloat).item<float>();  // CPU tensor: no device sync
  for (int64_t i = 0; i < B; ++i) factor[i] = cov_row_factor(kv, static_cast<float>(sigma), factor[i], z_mean);
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), kTap, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    cpu::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(R, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const opmath_t f = static_cast<opmath_t>(factor[i]);
        const scalar_t* gi = g + i * R;
        scalar_t* oi = o + i * R;
        scale_row(gi, f, oi, R);
      }
    });
  });
  return out;
}

at::Tensor sample_cov_noise(const at::Tensor& per_sample_grads, int64_t seed, int64_t offset) {
  const at::Tensor& G = per_sample_grads;
  check_float_tensor(G, kSample, "per_sample_grads");
  TORCH_CHECK(G.dim() == 2 && G.size(0) > 0, kSample, ": per_sample_grads must have shape [B, P] with B > 0, got shape ",
              G.sizes());
  check_contiguous(G, kSample, "per_sample_grads");
  if (G.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return sample_cov_noise_cuda(G, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
#else
    TORCH_CHECK(false, kSample, ": mmkernels._C was built without CUDA kernels, got a CUDA tensor");
#endif
  }
  const int64_t B = G.size(0), P = G.size(1);
  std::vector<float> zc;
  const float z_mean = normals_and_mean(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), B, zc);
  for (int64_t i = 0; i < B; ++i) zc[i] = sub_rn(zc[i], z_mean);
  const auto out_dtype = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({P}, G.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), kSample, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    opmath_t* o = out.mutable_data_ptr<opmath_t>();
    // Per column: acc = sum_i zc_i * G[i, p] in row order, then / B (the CUDA kernel's order and rounding).
    cpu::parallel_for(0, P, 2048, [&](int64_t p0, int64_t p1) {
      std::vector<opmath_t> acc(p1 - p0, opmath_t(0));
      for (int64_t i = 0; i < B; ++i) {
        const opmath_t zi = static_cast<opmath_t>(zc[i]);
        const scalar_t* row = g + i * P;
        for (int64_t p = p0; p < p1; ++p) acc[p - p0] = add_rn(acc[p - p0], mul_rn(zi, static_cast<opmath_t>(row[p])));
      }
      for (int64_t p = p0; p < p1; ++p) o[p] = div_rn(acc[p - p0], static_cast<opmath_t>(B));
    });
  });
  return out;
}

at::Tensor philox_words_tensor(int64_t seed, int64_t offset, int64_t n) {
  TORCH_CHECK(n >= 0, "philox_words: n must be >= 0, got ", n);
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const Words4 w = philox_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + i);
    o[4 * i] = w.x0, o[4 * i + 1] = w.x1, o[4 * i + 2] = w.x2, o[4 * i + 3] = w.x3;
  }
  return out;
}

at::Tensor philox_normals(int64_t seed, int64_t offset, int64_t n, at::Device device) {
  TORCH_CHECK(n >= 0, "philox_normals: n must be >= 0, got ", n);
  if (device.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return philox_normals_cuda(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), n, device);
#else
    TORCH_CHECK(false, "philox_normals: mmkernels._C was built without CUDA kernels, got device ", device);
#endif
  }
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  cpu::parallel_for(0, n, 4096, [&](int64_t a, int64_t b) {
    cpu::philox_normal4_block(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + static_cast<uint64_t>(a),
                              b - a, o + 4 * a);
  });
  return out;
}

}  // namespace mmk
