// AGM Shapley forwards (ICCV 2023, Eq. 1-3; docs/methods/agm.md): entry points and CPU twins.
//
// Subsets are bitmasks S = 1 .. 2^M - 1 (bit m set = modality m present), row S - 1 of every table.
// shapley_masked_batch: for M inputs [B, ...] builds M outputs [num_blocks * B, ...]; block S - 1 (S = 1 ..
//   num_blocks) holds input m where bit m of S is set and zeros elsewhere (or, with fill, fill[m] - one row of
//   modality m, e.g. enc_m(0) - repeated over the B rows). num_blocks = 2^M - 2 gives the muted subsets (the full
//   set excluded), 2^M - 1 appends the full set as the last block.
// shapley_responses: values [2^M - 1, B, ...] (the model's output on each subset, v(empty) = 0) ->
//   phi [M, B, ...] with phi_m = sum_S w_m(S) v(S) in the input dtype, accumulated in float (double for double).
// shapley_responses_backward: grad_v[S - 1] = sum_m kappa_m w_m(S) grad_phi[m]; when every grad_phi[m] is the
//   same g (loss on sum_m phi_m = f(all)), this is c(S) g with c(S) = sum_m kappa_m w_m(S).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "ops.h"
#include "parallel_cpu.h"
#include "shapley_math.h"

namespace mmk {
namespace {

// M from the number of subset rows 2^M - 1; 0 if it is not of that form with 2 <= M <= 8.
int modalities_from_subsets(int64_t s) {
  for (int M = 2; M <= kMaxModalities; ++M)
    if (s == num_subsets(M)) return M;
  return 0;
}

template <typename T>
std::vector<T> weight_table(int M) {  // [2^M - 1][M]
  const int S = num_subsets(M);
  std::vector<T> w(static_cast<size_t>(S) * M);
  for (int s = 1; s <= S; ++s)
    for (int m = 0; m < M; ++m) w[(s - 1) * M + m] = static_cast<T>(shapley_weight(M, static_cast<uint32_t>(s), m));
  return w;
}

}  // namespace

at::Tensor shapley_weights(int64_t num_modalities) {
  TORCH_CHECK(num_modalities >= 2 && num_modalities <= kMaxModalities,
              "shapley_weights: num_modalities must be between 2 and 8, got ", num_modalities);
  const int M = static_cast<int>(num_modalities);
  const std::vector<double> w = weight_table<double>(M);
  at::Tensor out = at::empty({num_subsets(M), M}, at::TensorOptions().dtype(at::kDouble));
  std::memcpy(out.mutable_data_ptr<double>(), w.data(), w.size() * sizeof(double));
  return out.to(at::kFloat);
}

std::vector<at::Tensor> shapley_masked_batch(const std::vector<at::Tensor>& inputs, int64_t num_blocks,
                                             const c10::optional<std::vector<at::Tensor>>& fill) {
  const char* op = "shapley_masked_batch";
  const int64_t M = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(M >= 2 && M <= kMaxModalities, op, ": inputs must hold between 2 and 8 modalities, got ", M);
  TORCH_CHECK(num_blocks == (int64_t(1) << M) - 2 || num_blocks == (int64_t(1) << M) - 1, op, ": num_blocks must be 2^M - 2 = ",
              (int64_t(1) << M) - 2, " or 2^M - 1 = ", (int64_t(1) << M) - 1, ", got ", num_blocks);
  const int64_t B = inputs[0].dim() >= 1 ? inputs[0].size(0) : -1;
  for (int64_t m = 0; m < M; ++m) {
    const std::string name = "inputs[" + std::to_string(m) + "]";
    const at::Tensor& x = inputs[m];
    TORCH_CHECK(x.defined() && x.dim() >= 1, op, ": ", name, " must have shape [B, ...], got ",
                x.defined() ? x.sizes() : at::IntArrayRef{});
    TORCH_CHECK(x.size(0) == B && B > 0, op, ": ", name, " must have batch size ", B, " (that of inputs[0], > 0), got ",
                x.size(0));
    check_contiguous(x, op, name.c_str());
    check_same_device(x, inputs[0].device(), op, name.c_str(), "inputs[0]");
  }
  const bool has_fill = fill.has_value();
  if (has_fill) {  // fill[m]: one row of modality m, [1, ...] or [...], same dtype and device, contiguous
    TORCH_CHECK(static_cast<int64_t>(fill->size()) == M, op, ": fill must hold one tensor per modality (", M, "), got ",
                fill->size());
    for (int64_t m = 0; m < M; ++m) {
      const std::string name = "fill[" + std::to_string(m) + "]";
      const at::Tensor& f = (*fill)[m];
      const at::Tensor& x = inputs[m];
      TORCH_CHECK(f.defined(), op, ": ", name, " must be a tensor");
      const at::IntArrayRef row = x.sizes().slice(1);
      const bool row_shape = f.sizes() == row;
      const bool one_row = f.dim() == x.dim() && f.size(0) == 1 && f.sizes().slice(1) == row;
      TORCH_CHECK(row_shape || one_row, op, ": ", name, " must have shape [1, ...] or [...] with one row of inputs[", m,
                  "] (", row, "), got ", f.sizes());
      TORCH_CHECK(f.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of inputs[", m, "] (",
                  x.scalar_type(), "), got ", f.scalar_type());
      check_contiguous(f, op, name.c_str());
      check_same_device(f, x.device(), op, name.c_str(), ("inputs[" + std::to_string(m) + "]").c_str());
    }
  }
  if (inputs[0].is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return shapley_masked_batch_cuda(inputs, num_blocks, has_fill ? *fill : std::vector<at::Tensor>{});
#else
    TORCH_CHECK(false, op, ": mmkernels._C was built without CUDA kernels, got CUDA tensors");
#endif
  }
  std::vector<at::Tensor> outs;
  outs.reserve(M);
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor& x = inputs[m];
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape[0] = num_blocks * B;
    at::Tensor out = at::empty(shape, x.options());
    const size_t bytes = x.numel() * x.element_size();
    const size_t row_bytes = bytes / B;
    const char* src = static_cast<const char*>(x.const_data_ptr());
    const char* fill_row = has_fill ? static_cast<const char*>((*fill)[m].const_data_ptr()) : nullptr;
    char* dst = static_cast<char*>(out.mutable_data_ptr());
    cpu::parallel_for(0, num_blocks, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {  // block s holds subset S = s + 1; zero bits are 0.0 in every float format
        char* blk = dst + s * bytes;
        if (((s + 1) >> m) & 1) std::memcpy(blk, src, bytes);
        else if (fill_row == nullptr) std::memset(blk, 0, bytes);
        else for (int64_t i = 0; i < B; ++i) std::memcpy(blk + i * row_bytes, fill_row, row_bytes);
      }
    });
    outs.push_back(out);
  }
  return outs;
}

at::Tensor shapley_responses(const at::Tensor& subset_outputs) {
  const char* op = "shapley_responses";
  const at::Tensor& v = subset_outputs;
  check_float_tensor(v, op, "subset_outputs");
  TORCH_CHECK(v.dim() >= 2, op, ": subset_outputs must have shape [2^M - 1, B, ...], got ", v.sizes());
  const int M = modalities_from_subsets(v.size(0));
  TORCH_CHECK(M > 0, op, ": subset_outputs.shape[0] must be 2^M - 1 for M in 2..8 (3, 7, 15, ..., 255), got ", v.size(0));
  TORCH_CHECK(v.size(1) > 0, op, ": subset_outputs must have a non-empty batch, got shape ", v.sizes());
  check_contiguous(v, op, "subset_outputs");
  if (v.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return shapley_responses_cuda(v, M);
#else
    TORCH_CHECK(false, op, ": mmkernels._C was built without CUDA kernels, got a CUDA tensor");
#endif
  }
  const int S = num_subsets(M);
  const int64_t E = v.numel() / S;
  std::vector<int64_t> shape(v.sizes().begin(), v.sizes().end());
  shape[0] = M;
  at::Tensor phi = at::empty(shape, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "mmk_dispatch", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<opmath_t> w = weight_table<opmath_t>(M);
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* out = phi.mutable_data_ptr<scalar_t>();
    cpu::parallel_for(0, E, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        opmath_t acc[kMaxModalities] = {};
        for (int s = 0; s < S; ++s) {  // subsets in bitmask order, as the CUDA kernel
          const opmath_t x = static_cast<opmath_t>(vp[s * E + e]);
          for (int m = 0; m < M; ++m) acc[m] = add_rn(acc[m], mul_rn(w[s * M + m], x));
        }
        for (int m = 0; m < M; ++m) out[m * E + e] = static_cast<scalar_t>(acc[m]);
      }
    });
  });
  return phi;
}

at::Tensor shapley_responses_backward(const at::Tensor& grad_phi, const c10::optional<at::Tensor>& kappa,
                                      at::ScalarType out_dtype) {
  const char* op = "shapley_responses_backward";
  check_float_tensor(grad_phi, op, "grad_phi");
  TORCH_CHECK(grad_phi.dim() >= 2 && grad_phi.size(0) >= 2 && grad_phi.size(0) <= kMaxModalities, op,
              ": grad_phi must have shape [M, B, ...] with 2 <= M <= 8, got ", grad_phi.sizes());
  check_contiguous(grad_phi, op, "grad_phi");
  const int M = static_cast<int>(grad_phi.size(0));
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              op, ": out_dtype must be a floating dtype, got ", out_dtype);
  // a half/bfloat16 incoming gradient is widened to float (the accumulation type)
  const at::Tensor gphi = grad_phi.scalar_type() == at::kDouble ? grad_phi : grad_phi.to(at::kFloat);
  at::Tensor kap;
  if (kappa.has_value() && kappa->defined()) {
    check_float_tensor(*kappa, op, "kappa");
    TORCH_CHECK(kappa->numel() == M, op, ": kappa must hold one value per modality (", M, "), got shape ", kappa->sizes());
    check_same_device(*kappa, grad_phi.device(), op, "kappa", "grad_phi");
    kap = kappa->reshape({M}).to(at::kFloat).contiguous();
  } else {
    kap = at::ones({M}, grad_phi.options().dtype(at::kFloat));
  }
  if (gphi.is_cuda()) {
#ifdef MMKERNELS_WITH_CUDA
    return shapley_responses_backward_cuda(gphi, kap, out_dtype, M);
#else
    TORCH_CHECK(false, op, ": mmkernels._C was built without CUDA kernels, got a CUDA tensor");
#endif
  }
  const int S = num_subsets(M);
  const int64_t E = gphi.numel() / M;
  std::vector<int64_t> shape(gphi.sizes().begin(), gphi.sizes().end());
  shape[0] = S;
  at::Tensor gv = at::empty(shape, gphi.options().dtype(out_dtype));
  const at::Tensor kd = kap.to(at::kDouble);
  const double* kp = kd.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(gphi.scalar_type(), "mmk_dispatch", [&] {
    using gphi_t = scalar_t;
    using opmath_t = at::opmath_type<scalar_t>;
    // coef[S - 1][m] = kappa_m * w_m(S), rounded once to the accumulation type (as the CUDA kernel's table)
    std::vector<opmath_t> coef(static_cast<size_t>(S) * M);
    for (int s = 0; s < S; ++s)
      for (int m = 0; m < M; ++m)
        coef[s * M + m] = static_cast<opmath_t>(mul_rn(static_cast<opmath_t>(kp[m]),
                                                       static_cast<opmath_t>(shapley_weight(M, s + 1, m))));
    const gphi_t* gp = gphi.const_data_ptr<gphi_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "mmk_dispatch_out", [&] {
      scalar_t* out = gv.mutable_data_ptr<scalar_t>();
      cpu::parallel_for(0, E, 4096, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          opmath_t g[kMaxModalities];
          for (int m = 0; m < M; ++m) g[m] = static_cast<opmath_t>(gp[m * E + e]);
          for (int s = 0; s < S; ++s) {
            opmath_t acc = 0;
            for (int m = 0; m < M; ++m) acc = add_rn(acc, mul_rn(coef[s * M + m], g[m]));
            out[s * E + e] = static_cast<scalar_t>(acc);
          }
        }
      });
    });
  });
  return gv;
}

}  // namespace mmk
