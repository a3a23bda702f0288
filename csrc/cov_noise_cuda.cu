// CUDA kernels of the batch-covariance noise (see cov_noise.cpp for the math and the CPU twins).
//
// cov_noise_tap_backward, one launch: every block first recomputes the B normals z_i (Philox is counter-based,
// so any block can) into shared memory and sums them (double) for mean(z); it turns them into the row factors
// k + sigma (z_i - mean z) and then streams its share of the gradient. No grid-wide synchronisation is needed.
// Cost of the scheme: grid * B redundant normals, B / 512 per thread. The grid is a persistent one (at most 4
// blocks of 512 threads per SM, 1 per SM once B >= 1024), so the redundant work stays small against the B * R
// gradient elements of any non-trivial feature; kUnroll loads per thread keep enough bytes in flight at that
// occupancy. (A cheaper scheme on sm_90: thread-block clusters sharing the z sum through distributed shared
// memory, dividing the redundant work by the cluster size; not done here.)
// Batches larger than kSmemRows (z would not fit in the 48 KiB of shared memory a block gets without an opt-in)
// take two launches: the normals into a global [B] buffer, then every block sums them from L2 and reads z_i per
// row instead of recomputing them.
#include "cuda_utils.cuh"
#include "noise_math.h"
#include "ops.h"
#include "philox.h"

#include <ATen/OpMathType.h>

namespace mmk {
namespace {

constexpr int kThreads = 256;       // sample_cov_noise and the helper kernels
constexpr int kTapThreads = 512;    // the tap: large blocks shorten the per-thread share of the B normals
constexpr int kUnroll = 4;          // vector loads in flight per thread in the tap's streaming loop
// Rows whose z fit in dynamic shared memory. Static + dynamic shared memory of a block may not exceed 48 KiB
// without cudaFuncSetAttribute(MaxDynamicSharedMemorySize); both kernels also hold a static double scratch[32]
// for block_sum, so the float rows get 48 KiB - 256 B (12224 rows), not the full 48 KiB (12288 rows would fail
// to launch with an invalid-argument error).
constexpr int64_t kStaticSmemBytes = 32 * sizeof(double);
constexpr int64_t kSmemRows = (48 * 1024 - kStaticSmemBytes) / static_cast<int64_t>(sizeof(float));

// Sum of the B normals (recomputed from Philox, or read from z_global) -> mean(z) on every thread. With kSmem the
// normals are also kept in z_s[0..B) (thread t writes rows t, t + blockDim.x, ...).
template <bool kSmem>
__device__ __forceinline__ float normals_mean(float* z_s, const float* __restrict__ z_global, int64_t B, uint64_t seed,
                                              uint64_t offset, double* scratch) {
  double local = 0.0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const float z = kSmem ? philox_normal(seed, offset + static_cast<uint64_t>(i)) : z_global[i];
    if (kSmem) z_s[i] = z;
    local += static_cast<double>(z);
  }
  const double total = cuda::block_sum(local, scratch);
  return static_cast<float>(total / static_cast<double>(B));
}

template <typename scalar_t, typename index_t, int VEC, bool kSmem>
__global__ void __launch_bounds__(kTapThreads) cov_tap_bwd_kernel(const scalar_t* __restrict__ grad,
                                                               scalar_t* __restrict__ out, const float* __restrict__ k_ptr,
                                                               const float* __restrict__ z_global, float sigma,
                                                               uint64_t seed, uint64_t offset, index_t B, index_t R) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ float factor_s[];  // kSmem: the B row factors
  __shared__ double scratch[kStaticSmemBytes / sizeof(double)];
  const float z_mean = normals_mean<kSmem>(factor_s, z_global, B, seed, offset, scratch);
  const float k = *k_ptr;
  if (kSmem) {
    for (index_t i = threadIdx.x; i < B; i += blockDim.x)  // each thread converts the entries it wrote
      factor_s[i] = cov_row_factor(k, sigma, factor_s[i], z_mean);
    __syncthreads();
  }
  // Stream the gradient: kUnroll independent vector loads in flight per thread (the grid is small: about one
  // block per SM for large B), then the row factors and the stores.
  const index_t nvec = (B * R) / VEC;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v0 = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v0 < nvec; v0 += stride * kUnroll) {
    cuda::Pack<scalar_t, VEC> g[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t v = v0 + u * stride;
      if (v < nvec) g[u] = *reinterpret_cast<const cuda::Pack<scalar_t, VEC>*>(grad + v * VEC);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t v = v0 + u * stride;
      if (v >= nvec) break;
      const index_t e0 = v * VEC;
      index_t row = e0 / R, col = e0 - row * R;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = kSmem ? factor_s[row] : cov_row_factor(k, sigma, z_global[row], z_mean);
        g[u].v[j] = static_cast<scalar_t>(mul_rn(static_cast<opmath_t>(g[u].v[j]), static_cast<opmath_t>(f)));
        if (++col == R) col = 0, ++row;
      }
      *reinterpret_cast<cuda::Pack<scalar_t, VEC>*>(out + e0) = g[u];
    }
  }
}

__global__ void philox_normal_rows_kernel(float* __restrict__ z, int64_t B, uint64_t seed, uint64_t offset) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < B) z[i] = philox_normal(seed, offset + static_cast<uint64_t>(i));
}

__global__ void philox_normal4_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) {
    const Normals4 v = philox_normal4(seed, offset + static_cast<uint64_t>(i));
    *reinterpret_cast<float4*>(out + 4 * i) = make_float4(v.n[0], v.n[1], v.n[2], v.n[3]);
  }
}

// A global [B] buffer of z for batches too large for shared memory (second launch reads it), else undefined.
at::Tensor normals_for_large_batch(int64_t B, uint64_t seed, uint64_t offset, const at::TensorOptions& opts,
                                   cudaStream_t stream) {
  if (B <= kSmemRows) return at::Tensor();
  at::Tensor z = at::empty({B}, opts.dtype(at::kFloat));
  philox_normal_rows_kernel<<<(B + kThreads - 1) / kThreads, kThreads, 0, stream>>>(z.mutable_data_ptr<float>(), B,
                                                                                      seed, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

}  // namespace

at::Tensor cov_noise_tap_backward_cuda(const at::Tensor& grad, const at::Tensor& k, float sigma, uint64_t seed,
                                       uint64_t offset) {
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor kf = k.to(at::kFloat).reshape({1}).contiguous();
  at::Tensor out = at::empty_like(grad, at::MemoryFormat::Contiguous);
  const int64_t B = grad.size(0), N = grad.numel(), R = N / B;
  if (N == 0) return out;
  const at::Tensor z_global = normals_for_large_batch(B, seed, offset, grad.options(), stream);
  const float* zg = z_global.defined() ? z_global.const_data_ptr<float>() : nullptr;
  const size_t smem = zg ? 0 : static_cast<size_t>(B) * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cov_noise_tap_backward_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec_ok = N % kVec == 0 && reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
    const int vec = vec_ok ? kVec : 1;
    const int64_t nvec = N / vec;
    // Redundant normals: grid * B (each thread computes B / 512 of them). Up to 4 blocks per SM (full occupancy)
    // for small batches, one block per SM from B = 1024 on, where the normals would otherwise dominate.
    const int64_t per_sm = B >= 1024 ? 1 : 4;
    const int64_t grid = std::max<int64_t>(
        1, std::min<int64_t>((nvec + kTapThreads * kUnroll - 1) / (kTapThreads * kUnroll), cuda::num_sms() * per_sm));
    auto launch = [&](auto kernel) {
      kernel<<<grid, kTapThreads, smem, stream>>>(grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                              kf.const_data_ptr<float>(), zg, sigma, seed, offset, B, R);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool small = N < (int64_t(1) << 30);  // int32 indexing with headroom for the strided loop
    if (zg == nullptr) {
      if (vec_ok) small ? launch(cov_tap_bwd_kernel<scalar_t, int32_t, kVec, true>)
                        : launch(cov_tap_bwd_kernel<scalar_t, int64_t, kVec, true>);
      else small ? launch(cov_tap_bwd_kernel<scalar_t, int32_t, 1, true>)
                 : launch(cov_tap_bwd_kernel<scalar_t, int64_t, 1, true>);
    } else {
      if (vec_ok) small ? launch(cov_tap_bwd_kernel<scalar_t, int32_t, kVec, false>)
                        : launch(cov_tap_bwd_kernel<scalar_t, int64_t, kVec, false>);
      else small ? launch(cov_tap_bwd_kernel<scalar_t, int32_t, 1, false>)
                 : launch(cov_tap_bwd_kernel<scalar_t, int64_t, 1, false>);
    }
  });
  return out;
}

namespace {

// h[p] = sum_i zc_i G[i, p] / B, one column per thread, rows in order (the CPU twin's order and rounding).
template <typename scalar_t, bool kSmem>
__global__ void __launch_bounds__(kThreads) sample_cov_noise_kernel(const scalar_t* __restrict__ G,
                                                                    at::opmath_type<scalar_t>* __restrict__ out,
                                                                    const float* __restrict__ z_global, int64_t B,
                                                                    int64_t P, uint64_t seed, uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  extern __shared__ float zc_s[];
  __shared__ double scratch[kStaticSmemBytes / sizeof(double)];
  const float z_mean = normals_mean<kSmem>(zc_s, z_global, B, seed, offset, scratch);
  if (kSmem) {
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) zc_s[i] = sub_rn(zc_s[i], z_mean);
    __syncthreads();
  }
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    opmath_t acc = 0;
#pragma unroll 8
    for (int64_t i = 0; i < B; ++i)
      acc = add_rn(acc, mul_rn(static_cast<opmath_t>(kSmem ? zc_s[i] : sub_rn(z_global[i], z_mean)),
                               static_cast<opmath_t>(G[i * P + p])));
    out[p] = div_rn(acc, static_cast<opmath_t>(B));
  }
}

}  // namespace

at::Tensor sample_cov_noise_cuda(const at::Tensor& g, uint64_t seed, uint64_t offset) {
  const c10::cuda::CUDAGuard guard(g.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = g.size(0), P = g.size(1);
  const auto out_dtype = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({P}, g.options().dtype(out_dtype));
  if (P == 0) return out;
  const at::Tensor z_global = normals_for_large_batch(B, seed, offset, g.options(), stream);
  const float* zg = z_global.defined() ? z_global.const_data_ptr<float>() : nullptr;
  const size_t smem = zg ? 0 : static_cast<size_t>(B) * sizeof(float);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((P + kThreads - 1) / kThreads, cuda::num_sms() * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sample_cov_noise_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto kernel = zg ? sample_cov_noise_kernel<scalar_t, false> : sample_cov_noise_kernel<scalar_t, true>;
    kernel<<<grid, kThreads, smem, stream>>>(g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<opmath_t>(), zg, B, P,
                                             seed, offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor philox_normals_cuda(uint64_t seed, uint64_t offset, int64_t n, at::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({n, 4}, at::TensorOptions().dtype(at::kFloat).device(device));
  if (n == 0) return out;
  philox_normal4_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<float>(), n, seed, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mmk
