// OGM-GE isotropic noise over many gradient tensors, in place (the authors' rule, docs/methods/ogm_ge.md):
//   grad_t = k_{group(t)} * grad_t + N(0, (std_t + 1e-8)^2),  std_t the unbiased std of the unmodulated grad_t.
// k is a device tensor [G]; group_index[t] picks tensor t's entry (empty group_index: G == T, group(t) = t).
// Noise: element j of tensor t is normal slot (base_t + j) % 4 of Philox counter offset + (base_t + j) / 4, with
// base_t = sum_{s < t} pad4(numel_s) over the list order; a call consumes sum_t pad4(numel_t) / 4 counters.
// Statistics: chunks of kGeChunk values summed in double, turned into (n, mean, M2), merged in chunk order (Chan).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "noise_math.h"
#include "ops.h"
#include "parallel_cpu.h"
#include "philox.h"
#include "philox_vec_cpu.h"

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

// One unit of work of the two CPU passes: elements [a, b) of tensor t (a a multiple of kGeChunk, so of 4).
struct Chunk {
  int64_t t, a, b;
};

std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& grads) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < grads.size(); ++t)
    for (int64_t a = 0, n = grads[t].numel(); a < n; a += kGeChunk)
      chunks.push_back(Chunk{static_cast<int64_t>(t), a, std::min(n, a + kGeChunk)});
  return chunks;
}

// (n, mean, M2) of one chunk from its double-precision sums.
template <typename scalar_t>
Moments chunk_moments(const scalar_t* p, int64_t n) {
  double s = 0.0, ss = 0.0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::sum_sumsq_f32(p, n, &s, &ss);
  } else {
    for (int64_t e = 0; e < n; ++e) {
      const double x = static_cast<double>(static_cast<at::opmath_type<scalar_t>>(p[e]));
      s += x;
      ss += x * x;
    }
  }
  return moments_from_sums(static_cast<double>(n), s, ss);
}

// Statistics pass over every chunk of every tensor (one parallel_for), merged per tensor in chunk order (Chan), so
// the result does not depend on the thread count.
std::vector<Moments> tensor_moments_cpu(const std::vector<at::Tensor>& grads) {
  const std::vector<Chunk> chunks = make_chunks(grads);
  std::vector<Moments> parts(chunks.size());
  cpu::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[ch.t].scalar_type(), "ge_moments", [&] {
        parts[c] = chunk_moments(grads[ch.t].const_data_ptr<scalar_t>() + ch.a, ch.b - ch.a);
      });
    }
  });
  std::vector<Moments> out(grads.size(), Moments{0.0, 0.0, 0.0});
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].t] = merge_moments(out[chunks[c].t], parts[c]);
  return out;
}

constexpr int64_t kGeBlock = 2048;  // elements whose normals are drawn into one stack buffer (a multiple of 64)

// Update pass of one chunk: x = k x + scale n for elements [a, b) of p, normals from counter ctr0 + a / 4 on.
template <typename scalar_t>
void update_chunk(scalar_t* p, int64_t a, int64_t b, double k, const Moments& m, uint64_t seed, uint64_t ctr0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = ge_noise_scale<opmath_t>(m);
  const opmath_t kk = static_cast<opmath_t>(k);
  alignas(64) float z[kGeBlock];
  for (int64_t e0 = a; e0 < b; e0 += kGeBlock) {
    const int64_t e1 = std::min(b, e0 + kGeBlock);
    cpu::philox_normal4_block(seed, ctr0 + static_cast<uint64_t>(e0 / 4), (e1 - e0 + 3) / 4, z);
    scalar_t* x = p + e0;
    const int64_t len = e1 - e0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      cpu::ge_update_f32(x, z, kk, scale, len);
    } else {
      for (int64_t e = 0; e < len; ++e)
        x[e] = static_cast<scalar_t>(ge_update<opmath_t>(static_cast<opmath_t>(x[e]), kk, scale, static_cast<opmath_t>(z[e])));
    }
  }
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
  const std::vector<Moments> moments = tensor_moments_cpu(grads);
  std::vector<uint64_t> ctr0(T);  // first counter of tensor t: offset + base_t / 4
  for (int64_t t = 0, base = 0; t < T; base += pad4(grads[t].numel()), ++t)
    ctr0[t] = static_cast<uint64_t>(offset) + static_cast<uint64_t>(base / 4);
  const std::vector<Chunk> chunks = make_chunks(grads);
  cpu::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const double kk = kv[group_index.empty() ? ch.t : group_index[ch.t]];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[ch.t].scalar_type(), kGe, [&] {
        update_chunk(grads[ch.t].mutable_data_ptr<scalar_t>(), ch.a, ch.b, kk, moments[ch.t],
                     static_cast<uint64_t>(seed), ctr0[ch.t]);
      });
    }
  });
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
  const std::vector<Moments> moments = tensor_moments_cpu(grads);
  for (size_t t = 0; t < grads.size(); ++t) o[t] = unbiased_std(moments[t]);
  return out;
}

}  // namespace mmk
