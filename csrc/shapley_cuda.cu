// CUDA kernels of the AGM Shapley forwards (see shapley.cpp for the definitions and the CPU twins).
//   masked batch: one launch for all modalities and subsets; block (x, y) copies (or zeroes, or fills with the
//     fill row repeated) one chunk of one modality's input into subset block y; dtype-agnostic (bytes, in the widest unit every size and address allows).
//   responses: one thread per output element reads the 2^M - 1 subset values once and accumulates the M phi_m with
//     the weight table (header math, built in shared memory by each block).
//   backward: one thread per element reads the M incoming gradients once and writes the 2^M - 1 subset gradients
//     with the table kappa_m w_m(S).
#include "cuda_utils.cuh"
#include "ops.h"
#include "shapley_math.h"

#include <ATen/OpMathType.h>

namespace mmk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCopyChunkBytes = 16384;
constexpr int kMaxSubsets = 255;

struct MaskMeta {
  const char* src[kMaxModalities];
  const char* fill[kMaxModalities];     // one row of each modality for the muted blocks, or nullptr (zeros)
  char* dst[kMaxModalities];
  int64_t bytes[kMaxModalities];        // bytes of one modality's input (= of one subset block)
  int64_t row_bytes[kMaxModalities];    // bytes of one row (= of fill[m])
  int64_t chunk_begin[kMaxModalities + 1];  // cumulative copy chunks per modality
  int M;
};

template <typename unit_t>
__global__ void __launch_bounds__(kThreads) masked_batch_kernel(const MaskMeta meta) {
  const int64_t chunk = blockIdx.x;
  int m = 0;
  while (m + 1 < meta.M && meta.chunk_begin[m + 1] <= chunk) ++m;
  const uint32_t S = blockIdx.y + 1;  // subset of this output block
  const int64_t units = meta.bytes[m] / static_cast<int64_t>(sizeof(unit_t));
  const int64_t per_chunk = kCopyChunkBytes / static_cast<int64_t>(sizeof(unit_t));
  const int64_t a = (chunk - meta.chunk_begin[m]) * per_chunk, b = min(units, a + per_chunk);
  const unit_t* src = reinterpret_cast<const unit_t*>(meta.src[m]);
  unit_t* dst = reinterpret_cast<unit_t*>(meta.dst[m]) + static_cast<int64_t>(blockIdx.y) * units;
  if ((S >> m) & 1u) {
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) dst[i] = src[i];
  } else if (meta.fill[m] != nullptr) {
    const unit_t* row = reinterpret_cast<const unit_t*>(meta.fill[m]);
    const int64_t row_units = meta.row_bytes[m] / static_cast<int64_t>(sizeof(unit_t));
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) dst[i] = row[i % row_units];
  } else {
    const unit_t zero{};  // all-zero bits are +0.0 in every float format
    for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) dst[i] = zero;
  }
}

template <typename opmath_t>
__device__ __forceinline__ void fill_weights(opmath_t* w_s, int M) {  // w_s[(S - 1) * 8 + m], zero for m >= M
  const int S = num_subsets(M);
  for (int i = threadIdx.x; i < S * kMaxModalities; i += blockDim.x) {
    const int s = i / kMaxModalities + 1, m = i % kMaxModalities;
    w_s[i] = m < M ? static_cast<opmath_t>(shapley_weight(M, static_cast<uint32_t>(s), m)) : opmath_t(0);
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) responses_kernel(const scalar_t* __restrict__ v,
                                                             scalar_t* __restrict__ phi, int64_t E,
                                                             int M) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t w_s[kMaxSubsets * kMaxModalities];
  fill_weights(w_s, M);
  const int S = num_subsets(M);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    opmath_t acc[kMaxModalities];
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) acc[m] = 0;
    for (int s = 0; s < S; ++s) {  // bitmask order, as the CPU twin
      const opmath_t x = static_cast<opmath_t>(v[s * E + e]);
#pragma unroll
      for (int m = 0; m < kMaxModalities; ++m) acc[m] = add_rn(acc[m], mul_rn(w_s[s * kMaxModalities + m], x));
    }
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m)
      if (m < M) phi[m * E + e] = static_cast<scalar_t>(acc[m]);
  }
}

template <typename gphi_t, typename out_t>
__global__ void __launch_bounds__(kThreads) responses_backward_kernel(const gphi_t* __restrict__ gphi,
                                                                      const float* __restrict__ kappa,
                                                                      out_t* __restrict__ gv, int64_t E, int M) {
  using opmath_t = at::opmath_type<gphi_t>;
  __shared__ opmath_t c_s[kMaxSubsets * kMaxModalities];  // kappa_m w_m(S), zero for m >= M
  const int S = num_subsets(M);
  for (int i = threadIdx.x; i < S * kMaxModalities; i += blockDim.x) {
    const int s = i / kMaxModalities + 1, m = i % kMaxModalities;
    c_s[i] = m < M ? mul_rn(static_cast<opmath_t>(kappa[m]),
                            static_cast<opmath_t>(shapley_weight(M, static_cast<uint32_t>(s), m)))
                   : opmath_t(0);
  }
  __syncthreads();
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    opmath_t g[kMaxModalities];
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) g[m] = m < M ? static_cast<opmath_t>(gphi[m * E + e]) : opmath_t(0);
    for (int s = 0; s < S; ++s) {
      opmath_t acc = 0;
#pragma unroll
      for (int m = 0; m < kMaxModalities; ++m)
        if (m < M) acc = add_rn(acc, mul_rn(c_s[s * kMaxModalities + m], g[m]));
      gv[s * E + e] = static_cast<out_t>(acc);
    }
  }
}

int64_t grid_for(int64_t E) {
  return std::max<int64_t>(1, std::min<int64_t>((E + kThreads - 1) / kThreads, cuda::num_sms() * 8));
}

}  // namespace

std::vector<at::Tensor> shapley_masked_batch_cuda(const std::vector<at::Tensor>& inputs, int64_t num_blocks,
                                                  const std::vector<at::Tensor>& fill) {
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int M = static_cast<int>(inputs.size());
  const int64_t B = inputs[0].size(0);
  MaskMeta meta{};
  meta.M = M;
  std::vector<at::Tensor> outs;
  int64_t align = 16;  // widest unit that divides every size and address
  for (int m = 0; m < M; ++m) {
    const at::Tensor& x = inputs[m];
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape[0] = num_blocks * B;
    outs.push_back(at::empty(shape, x.options()));
    meta.src[m] = static_cast<const char*>(x.const_data_ptr());
    meta.dst[m] = static_cast<char*>(outs[m].mutable_data_ptr());
    meta.bytes[m] = x.numel() * x.element_size();
    meta.row_bytes[m] = meta.bytes[m] / B;
    meta.fill[m] = fill.empty() ? nullptr : static_cast<const char*>(fill[m].const_data_ptr());
    for (int64_t v : {meta.bytes[m], meta.row_bytes[m], static_cast<int64_t>(reinterpret_cast<uintptr_t>(meta.src[m])),
                      static_cast<int64_t>(reinterpret_cast<uintptr_t>(meta.dst[m])),
                      static_cast<int64_t>(reinterpret_cast<uintptr_t>(meta.fill[m]))})
      while (align > 1 && v % align != 0) align >>= 1;
  }
  int64_t chunks = 0;
  for (int m = 0; m < M; ++m) {
    meta.chunk_begin[m] = chunks;
    chunks += (meta.bytes[m] + kCopyChunkBytes - 1) / kCopyChunkBytes;
  }
  meta.chunk_begin[M] = chunks;
  if (chunks == 0) return outs;
  TORCH_CHECK(chunks < (int64_t(1) << 31), "shapley_masked_batch: inputs too large");
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(num_blocks));
  switch (align) {
    case 16: masked_batch_kernel<uint4><<<grid, kThreads, 0, stream>>>(meta); break;
    case 8: masked_batch_kernel<uint2><<<grid, kThreads, 0, stream>>>(meta); break;
    case 4: masked_batch_kernel<uint32_t><<<grid, kThreads, 0, stream>>>(meta); break;
    case 2: masked_batch_kernel<uint16_t><<<grid, kThreads, 0, stream>>>(meta); break;
    default: masked_batch_kernel<uint8_t><<<grid, kThreads, 0, stream>>>(meta); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outs;
}

at::Tensor shapley_responses_cuda(const at::Tensor& values, int M) {
  const c10::cuda::CUDAGuard guard(values.device());
  const int S = num_subsets(M);
  const int64_t E = values.numel() / S;
  std::vector<int64_t> shape(values.sizes().begin(), values.sizes().end());
  shape[0] = M;
  at::Tensor phi = at::empty(shape, values.options());
  if (E == 0) return phi;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "shapley_responses_cuda", [&] {
    responses_kernel<scalar_t><<<grid_for(E), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        values.const_data_ptr<scalar_t>(), phi.mutable_data_ptr<scalar_t>(), E, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return phi;
}

at::Tensor shapley_responses_backward_cuda(const at::Tensor& grad_phi, const at::Tensor& kappa, at::ScalarType out_dtype,
                                           int M) {
  const c10::cuda::CUDAGuard guard(grad_phi.device());
  const int S = num_subsets(M);
  const int64_t E = grad_phi.numel() / M;
  std::vector<int64_t> shape(grad_phi.sizes().begin(), grad_phi.sizes().end());
  shape[0] = S;
  at::Tensor gv = at::empty(shape, grad_phi.options().dtype(out_dtype));
  if (E == 0) return gv;
  AT_DISPATCH_FLOATING_TYPES(grad_phi.scalar_type(), "shapley_responses_backward_cuda", [&] {
    using gphi_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "shapley_responses_backward_cuda_out", [&] {
      responses_backward_kernel<gphi_t, scalar_t><<<grid_for(E), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_phi.const_data_ptr<gphi_t>(), kappa.const_data_ptr<float>(), gv.mutable_data_ptr<scalar_t>(), E, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gv;
}

}  // namespace mmk
