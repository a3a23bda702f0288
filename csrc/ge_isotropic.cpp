// OGM-GE isotropic noise over many gradient tensors, in place (the authors' rule, DESIGN.md section 4.2):
//   grad_t = k_{group(t)} * grad_t + N(0, (std_t + 1e-8)^2),  std_t the unbiased std of the unmodulated grad_t.
// k is a device tensor [G]; group_index[t] picks tensor t's entry (empty group_index: G == T, group(t) = t).
// Noise: element j of tensor t is normal slot (base_t + j) % 4 of Philox counter offset + (base_t + j) / 4, with
// base_t = sum_{s < t} pad4(numel_s) over the list order; a call consumes sum_t pad4(numel_t) / 4 counters.
// Statistics: chunks of kGeChunk values summed in double, turned into (n, mean, M2), merged in chunk order (Chan).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "noise_math.h"
#include "ops.h"
#include "philox.h"

namespace mmk {
namespace {

constexpr const char* kGe = "ge_isotropic_";
constexpr int64_t kGeChunk = 65536;  // the CUDA launcher uses the same chunking

void check_grads(const std::vector<at::Tensor>& grads, const char* op) {
  for (size_t t = 0; t < grads.size(); ++t) {
    const std::string name = "grads[" + std::to_string(t) + "]";
    check_float_tensor(grads[t], op, name.c_str());
    check_contiguous(grads[t], op, name.c_str());
    check_same_device(grads[t], grads[0].device(), op, name.c_str(), "grads[0]");
  }
}

template <typename scalar_t>
Moments tensor_moments_cpu(const at::Tensor& g) {
  const int64_t n = g.numel();
  const int64_t nchunks = (n + kGeChunk - 1) / kGeChunk;
  std::vector<Moments> parts(nchunks);
  const scalar_t* p = g.const_data_ptr<scalar_t>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kGeChunk, b = std::min(n, a + kGeChunk);
      double s = 0.0, ss = 0.0;
      for (int64_t e = a; e < b; ++e) {
        const double x = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(p[e]));
        s += x;
        ss += x * x;
      }
      parts[c] = moments_from_sums(static_cast<double>(b - a), s, ss);
    }
  });
  Moments m{0.0, 0.0, 0.0};
  for (const Moments& part : parts) m = merge_moments(m, part);
  return m;
}

}  // namespace

void ge_isotropic_(const std::vector<at::Tensor>& grads, const at::Tensor& k, const std::vector<int64_t>& group_index,
                   int64_t seed, int64_t offset) {
  if (grads.empty()) return;
  check_grads(grads, kGe);
  check_float_tensor(k, kGe, "k");
  check_same_device(k, grads[0].device(), kGe, "k", "grads[0]");
  const int64_t T = static_cast<int64_t>(grads.size());
  if (group_index.empty()) {
    TORCH_CHECK(k.numel() == T, kGe, ": k must hold one value per tensor (", T, ") when group_index is not given, got ",
                k.numel(), " values");
  } else {
    TORCH_CHECK(static_cast<int64_t>(group_index.size()) == T, kGe, ": group_index must have one entry per tensor (", T,
                "), got ", group_index.size());
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(group_index[t] >= 0 && group_index[t] < k.numel(), kGe, ": group_index[", t, "] must be in [0, ",
                  k.numel(), ") (k has ", k.numel(), " values), got ", group_index[t]);
  }
  if (grads[0].is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    ge_isotropic_cuda_(grads, k, group_index, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
    return;
#else
    TORCH_CHECK(false, kGe, ": mmkernels._C was built without CUDA kernels, got CUDA tensors");
#endif
  }
  const at::Tensor kf = k.to(at::kDouble).contiguous();
  const double* kv = kf.const_data_ptr<double>();
  int64_t base = 0;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& g = grads[t];
    const int64_t n = g.numel();
    const int64_t group = group_index.empty() ? t : group_index[t];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), kGe, [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const opmath_t scale = ge_noise_scale<opmath_t>(tensor_moments_cpu<scalar_t>(g));
      const opmath_t kk = static_cast<opmath_t>(kv[group]);
      scalar_t* p = g.mutable_data_ptr<scalar_t>();
      const int64_t ngroups = (n + 3) / 4;
      const uint64_t ctr0 = static_cast<uint64_t>(offset) + static_cast<uint64_t>(base / 4);
      at::parallel_for(0, ngroups, 1024, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const Normals4 z = philox_normal4(static_cast<uint64_t>(seed), ctr0 + static_cast<uint64_t>(q));
          for (int j = 0; j < 4 && 4 * q + j < n; ++j) {
            scalar_t& x = p[4 * q + j];
            x = static_cast<scalar_t>(ge_update<opmath_t>(static_cast<opmath_t>(x), kk, scale, static_cast<opmath_t>(z.n[j])));
          }
        }
      });
    });
    base += pad4(n);
  }
}

at::Tensor ge_tensor_std(const std::vector<at::Tensor>& grads) {
  const char* op = "ge_tensor_std";
  if (grads.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  check_grads(grads, op);
  if (grads[0].is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return ge_tensor_std_cuda(grads);
#else
    TORCH_CHECK(false, op, ": mmkernels._C was built without CUDA kernels, got CUDA tensors");
#endif
  }
  at::Tensor out = at::empty({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (size_t t = 0; t < grads.size(); ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[t].scalar_type(), "mmk_dispatch",
                                    [&] { o[t] = unbiased_std(tensor_moments_cpu<scalar_t>(grads[t])); });
  }
  return out;
}

}  // namespace mmk
