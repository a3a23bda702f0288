// Declarations of the ops of mmkernels._C. Each family has a CPU twin (<family>.cpp, always built) and a CUDA
// launcher (<family>_cuda.cu, built when MMKERNELS_WITH_CUDA is defined; a different stem because setuptools
// names object files by stem). The .cpp entry points check the arguments, then run the CPU twin or call the
// CUDA launcher.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace mmk {

// ---- covariance noise (cov_noise.cpp / cov_noise_cuda.cu) ----
at::Tensor cov_noise_tap_backward(const at::Tensor& grad, const at::Tensor& k, double sigma, int64_t seed, int64_t offset);
at::Tensor sample_cov_noise(const at::Tensor& per_sample_grads, int64_t seed, int64_t offset);
at::Tensor philox_words_tensor(int64_t seed, int64_t offset, int64_t n);
at::Tensor philox_normals(int64_t seed, int64_t offset, int64_t n, at::Device device);

// ---- OGM-GE isotropic noise (ge_isotropic.cpp / ge_isotropic_cuda.cu) ----
void ge_isotropic_(const std::vector<at::Tensor>& grads, const at::Tensor& k, const std::vector<int64_t>& group_index,
                   int64_t seed, int64_t offset);
at::Tensor ge_tensor_std(const std::vector<at::Tensor>& grads);

// ---- AGM Shapley (shapley.cpp / shapley_cuda.cu) ----
at::Tensor shapley_weights(int64_t num_modalities);
std::vector<at::Tensor> shapley_masked_batch(const std::vector<at::Tensor>& inputs, int64_t num_blocks,
                                             const c10::optional<std::vector<at::Tensor>>& fill);
at::Tensor shapley_responses(const at::Tensor& subset_outputs);
at::Tensor shapley_responses_backward(const at::Tensor& grad_phi, const c10::optional<at::Tensor>& kappa,
                                      at::ScalarType out_dtype);

// ---- fused coefficient op, CPU twin (coefficients.cpp; the CUDA path is the Triton kernel) ----
// logits: one tensor [M, B, C] or M tensors [B, C] (any strides); method: 0 ogm_ge, 1 ogm, 2 opm, 3 agm, 4 mlb.
// Returns fp32 [3M + 1] = scores | ratios | coefficients | flag; AGM's s_hat [M] / steps [] updated in place.
at::Tensor balance_coefficients_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& labels,
                                    const c10::optional<at::Tensor>& s_hat, const c10::optional<at::Tensor>& steps,
                                    int64_t method, int64_t ignore_index, double alpha, double q_base, double lam,
                                    double beta_max, c10::optional<double> clip, bool z_sigmoid, bool ratio_difference,
                                    int64_t tie);

bool with_cuda();

#ifdef MMKERNELS_WITH_CUDA
at::Tensor cov_noise_tap_backward_cuda(const at::Tensor& grad, const at::Tensor& k, float sigma, uint64_t seed,
                                       uint64_t offset);
at::Tensor sample_cov_noise_cuda(const at::Tensor& g, uint64_t seed, uint64_t offset);
at::Tensor philox_normals_cuda(uint64_t seed, uint64_t offset, int64_t n, at::Device device);
void ge_isotropic_cuda_(const std::vector<at::Tensor>& grads, const at::Tensor& k, const std::vector<int64_t>& group,
                        uint64_t seed, uint64_t offset);
at::Tensor ge_tensor_std_cuda(const std::vector<at::Tensor>& grads);
std::vector<at::Tensor> shapley_masked_batch_cuda(const std::vector<at::Tensor>& inputs, int64_t num_blocks,
                                                  const std::vector<at::Tensor>& fill);
at::Tensor shapley_responses_cuda(const at::Tensor& values, int M);
at::Tensor shapley_responses_backward_cuda(const at::Tensor& grad_phi, const at::Tensor& kappa, at::ScalarType out_dtype,
                                           int M);
#endif

// Argument checks shared by the entry points (messages name the argument, the expectation and the value).
void check_float_tensor(const at::Tensor& t, const char* op, const char* name);
void check_contiguous(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& t, const at::Device& dev, const char* op, const char* name, const char* ref);

}  // namespace mmk
