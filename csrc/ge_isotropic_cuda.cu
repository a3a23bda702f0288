// CUDA kernels of the OGM-GE isotropic noise over many tensors (see ge_isotropic.cpp for the rule, the noise
// layout and the CPU twin). Two multi-tensor passes, as torch._foreach: tensors are cut into chunks of kGeChunk
// values and one block handles one chunk of any tensor (metadata passed by value as a kernel argument, at most
// kMaxTensors tensors per launch, tensors grouped by dtype).
//   pass 1 (statistics): each block sums its chunk in double and writes the chunk's (n, mean, M2) to a workspace;
//   pass 2 (update): each block merges its tensor's chunk moments in a fixed order (Chan) into the unbiased std,
//   reads k[group] from device memory and rewrites its chunk as k * g + (std + 1e-8) * n, n from Philox.
// No host synchronisation: k, the statistics and the noise never leave the device.
#include "cuda_utils.cuh"
#include "noise_math.h"
#include "ops.h"
#include "philox.h"

#include <ATen/OpMathType.h>

#include <map>

namespace mmk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGeChunk = 65536;  // the CPU twin uses the same chunking
constexpr int kMaxTensors = 96;      // keeps the metadata struct under the 4 KiB kernel-argument limit

struct GeMeta {
  void* ptr[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t noise_base[kMaxTensors];  // padded stream position of element 0 (a multiple of 4)
  int32_t chunk_begin[kMaxTensors + 1];  // cumulative chunk count of this launch
  int32_t group[kMaxTensors];  // index into k; with no group_index (ge_tensor_std) the tensor's list index
  int32_t ws_begin;  // workspace row of this launch's first chunk
  int32_t ntensors;
};

__device__ __forceinline__ int find_tensor(const GeMeta& meta, int chunk) {
  int lo = 0, hi = meta.ntensors - 1;  // the last t with chunk_begin[t] <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.chunk_begin[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename scalar_t>
__device__ __forceinline__ bool aligned4(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) == 0;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ge_stats_kernel(const GeMeta meta, double* __restrict__ ws) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[32];
  const int chunk = blockIdx.x;
  const int t = find_tensor(meta, chunk);
  const scalar_t* p = static_cast<const scalar_t*>(meta.ptr[t]);
  const int64_t n = meta.numel[t];
  const int64_t a = static_cast<int64_t>(chunk - meta.chunk_begin[t]) * kGeChunk, b = min(n, a + kGeChunk);
  double s = 0.0, ss = 0.0;
  if (aligned4(p)) {
    for (int64_t e = a + 4 * threadIdx.x; e < b; e += 4 * blockDim.x) {
      if (e + 4 <= b) {
        const cuda::Pack<scalar_t, 4> v = *reinterpret_cast<const cuda::Pack<scalar_t, 4>*>(p + e);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const double x = static_cast<double>(static_cast<opmath_t>(v.v[j]));
          s += x;
          ss += x * x;
        }
      } else {
        for (int64_t f = e; f < b; ++f) {
          const double x = static_cast<double>(static_cast<opmath_t>(p[f]));
          s += x;
          ss += x * x;
        }
      }
    }
  } else {
    for (int64_t e = a + threadIdx.x; e < b; e += blockDim.x) {
      const double x = static_cast<double>(static_cast<opmath_t>(p[e]));
      s += x;
      ss += x * x;
    }
  }
  s = cuda::block_sum(s, scratch);
  ss = cuda::block_sum(ss, scratch);
  if (threadIdx.x == 0) {
    const Moments m = moments_from_sums(static_cast<double>(b - a), s, ss);
    double* w = ws + 3 * static_cast<int64_t>(meta.ws_begin + chunk);
    w[0] = m.n, w[1] = m.mean, w[2] = m.m2;
  }
}

// Moments of tensor t from its chunks' workspace rows: lane l merges rows l, l + 32, ... in order, then a fixed
// butterfly across the warp. Deterministic.
__device__ __forceinline__ Moments warp_merge(const double* __restrict__ ws, int r0, int r1) {
  const int lane = threadIdx.x & 31;
  Moments m{0.0, 0.0, 0.0};
  for (int r = r0 + lane; r < r1; r += 32) m = merge_moments(m, Moments{ws[3 * r], ws[3 * r + 1], ws[3 * r + 2]});
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    Moments other{__shfl_xor_sync(0xffffffffu, m.n, o), __shfl_xor_sync(0xffffffffu, m.mean, o),
                  __shfl_xor_sync(0xffffffffu, m.m2, o)};
    m = (lane & o) ? merge_moments(other, m) : merge_moments(m, other);  // same operand order on both lanes
  }
  return m;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) ge_update_kernel(const GeMeta meta, const double* __restrict__ ws,
                                                             const double* __restrict__ k, uint64_t seed,
                                                             uint64_t offset) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t scale_s;
  const int chunk = blockIdx.x;
  const int t = find_tensor(meta, chunk);
  if (threadIdx.x < 32) {
    const Moments m = warp_merge(ws, meta.ws_begin + meta.chunk_begin[t], meta.ws_begin + meta.chunk_begin[t + 1]);
    if (threadIdx.x == 0) scale_s = ge_noise_scale<opmath_t>(m);
  }
  __syncthreads();
  const opmath_t scale = scale_s;
  const opmath_t kk = static_cast<opmath_t>(k[meta.group[t]]);
  scalar_t* p = static_cast<scalar_t*>(meta.ptr[t]);
  const int64_t n = meta.numel[t];
  const int64_t a = static_cast<int64_t>(chunk - meta.chunk_begin[t]) * kGeChunk, b = min(n, a + kGeChunk);
  const uint64_t ctr0 = offset + static_cast<uint64_t>(meta.noise_base[t] / 4);
  const bool vec = aligned4(p);
  for (int64_t e = a + 4 * threadIdx.x; e < b; e += 4 * blockDim.x) {  // e is a multiple of 4
    const Normals4 z = philox_normal4(seed, ctr0 + static_cast<uint64_t>(e / 4));
    if (vec && e + 4 <= b) {
      cuda::Pack<scalar_t, 4> v = *reinterpret_cast<const cuda::Pack<scalar_t, 4>*>(p + e);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        v.v[j] = static_cast<scalar_t>(
            ge_update<opmath_t>(static_cast<opmath_t>(v.v[j]), kk, scale, static_cast<opmath_t>(z.n[j])));
      *reinterpret_cast<cuda::Pack<scalar_t, 4>*>(p + e) = v;
    } else {
      for (int j = 0; j < 4 && e + j < b; ++j)
        p[e + j] = static_cast<scalar_t>(
            ge_update<opmath_t>(static_cast<opmath_t>(p[e + j]), kk, scale, static_cast<opmath_t>(z.n[j])));
    }
  }
}

// The tensor std only (for ge_tensor_std): one warp per tensor merges its chunks and writes the std at the
// tensor's list index (meta.group[t]: make_batches was called without group_index).
__global__ void ge_std_kernel(const GeMeta meta, const double* __restrict__ ws, float* __restrict__ out) {
  const int t = blockIdx.x;
  if (threadIdx.x < 32) {
    const Moments m = warp_merge(ws, meta.ws_begin + meta.chunk_begin[t], meta.ws_begin + meta.chunk_begin[t + 1]);
    if (threadIdx.x == 0) out[meta.group[t]] = unbiased_std(m);
  }
}

struct Batch {
  GeMeta meta;
  int nchunks;
  at::ScalarType dtype;
};

// Cut the tensors (grouped by dtype, list order kept inside a group) into launches of <= kMaxTensors tensors.
std::vector<Batch> make_batches(const std::vector<at::Tensor>& grads, const std::vector<int64_t>& group) {
  std::vector<int64_t> base(grads.size());
  int64_t running = 0;
  for (size_t t = 0; t < grads.size(); ++t) base[t] = running, running += pad4(grads[t].numel());
  std::map<int, std::vector<int>> by_dtype;
  for (size_t t = 0; t < grads.size(); ++t)
    if (grads[t].numel() > 0) by_dtype[static_cast<int>(grads[t].scalar_type())].push_back(static_cast<int>(t));
  std::vector<Batch> batches;
  int ws = 0;
  for (auto& kv : by_dtype) {
    const std::vector<int>& ids = kv.second;
    for (size_t i0 = 0; i0 < ids.size(); i0 += kMaxTensors) {
      Batch bt{};
      bt.dtype = static_cast<at::ScalarType>(kv.first);
      GeMeta& m = bt.meta;
      m.ws_begin = ws;
      int chunks = 0;
      const size_t i1 = std::min(ids.size(), i0 + kMaxTensors);
      for (size_t i = i0; i < i1; ++i) {
        const int t = ids[i], j = static_cast<int>(i - i0);
        m.ptr[j] = grads[t].data_ptr();
        m.numel[j] = grads[t].numel();
        m.noise_base[j] = base[t];
        m.group[j] = static_cast<int32_t>(group.empty() ? t : group[t]);
        m.chunk_begin[j] = chunks;
        const int64_t c = (grads[t].numel() + kGeChunk - 1) / kGeChunk;
        TORCH_CHECK(chunks + c < (int64_t(1) << 30), "ge_isotropic_: too many elements in one call");
        chunks += static_cast<int>(c);
      }
      m.ntensors = static_cast<int32_t>(i1 - i0);
      m.chunk_begin[m.ntensors] = chunks;
      bt.nchunks = chunks;
      ws += chunks;
      batches.push_back(bt);
    }
  }
  return batches;
}

at::Tensor run_stats(const std::vector<Batch>& batches, const at::TensorOptions& opts, cudaStream_t stream) {
  int total = 0;
  for (const Batch& b : batches) total += b.nchunks;
  at::Tensor ws = at::empty({std::max(total, 1), 3}, opts.dtype(at::kDouble));
  for (const Batch& b : batches) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.dtype, "ge_stats_kernel", [&] {
      ge_stats_kernel<scalar_t><<<b.nchunks, kThreads, 0, stream>>>(b.meta, ws.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return ws;
}

}  // namespace

void ge_isotropic_cuda_(const std::vector<at::Tensor>& grads, const at::Tensor& k, const std::vector<int64_t>& group,
                        uint64_t seed, uint64_t offset) {
  const c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // k in double, as the CPU twin reads it (k rounded once to the gradient's opmath type, also for fp64 k)
  const at::Tensor kf = k.to(at::kDouble).reshape({-1}).contiguous();
  const std::vector<Batch> batches = make_batches(grads, group);
  if (batches.empty()) return;
  const at::Tensor ws = run_stats(batches, grads[0].options(), stream);  // pass 1 over all tensors
  for (const Batch& b : batches) {                                       // pass 2 over all tensors
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.dtype, "ge_update_kernel", [&] {
      ge_update_kernel<scalar_t><<<b.nchunks, kThreads, 0, stream>>>(b.meta, ws.const_data_ptr<double>(),
                                                                     kf.const_data_ptr<double>(), seed, offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor ge_tensor_std_cuda(const std::vector<at::Tensor>& grads) {
  const c10::cuda::CUDAGuard guard(grads[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::vector<Batch> batches = make_batches(grads, {});
  // empty tensors: NaN, as torch.std (a fill kernel; the others are written by ge_std_kernel at their list index,
  // so no host-built index is copied to the device: no host sync)
  at::Tensor out = at::full({static_cast<int64_t>(grads.size())}, NAN, grads[0].options().dtype(at::kFloat));
  if (batches.empty()) return out;
  const at::Tensor ws = run_stats(batches, grads[0].options(), stream);
  for (const Batch& b : batches) {
    ge_std_kernel<<<b.meta.ntensors, 32, 0, stream>>>(b.meta, ws.const_data_ptr<double>(), out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace mmk
