// Python bindings of mmkernels._C. The torch.library custom ops ("mmkernels::...") that call these functions are
// registered in mmkernels/ext_ops/. Import torch before this module.
#include <torch/extension.h>

#include <array>

#include "ops.h"
#include "philox.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmkernels C++/CUDA ops: covariance noise, OGM-GE isotropic noise, AGM Shapley forwards, coefficients (CPU)";
  m.def("with_cuda", &mmk::with_cuda, "True if the CUDA kernels were compiled into this module");

  m.def("cov_noise_tap_backward", &mmk::cov_noise_tap_backward, py::arg("grad"), py::arg("k"), py::arg("sigma"),
        py::arg("seed"), py::arg("offset"),
        "grad * (k + sigma * (z_i - mean z)) per row i, z_i = Philox normal n0 of counter offset + i");
  m.def("sample_cov_noise", &mmk::sample_cov_noise, py::arg("per_sample_grads"), py::arg("seed"), py::arg("offset"),
        "(z - mean z)^T G / B for G [B, P]; z as in cov_noise_tap_backward");
  m.def("philox_words", &mmk::philox_words_tensor, py::arg("seed"), py::arg("offset"), py::arg("n"),
        "int64 [n, 4]: the Philox4x32-10 words of counters offset .. offset + n - 1 (CPU)");
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
        const mmk::Words4 w = mmk::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
        return std::array<uint32_t, 4>{w.x0, w.x1, w.x2, w.x3};
      },
      py::arg("counter"), py::arg("key"), "the raw Philox4x32-10 block function (for known-answer tests)");
  m.def("philox_normals", &mmk::philox_normals, py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("device"),
        "float32 [n, 4]: the four Box-Muller normals of counters offset .. offset + n - 1");

  m.def("ge_isotropic_", &mmk::ge_isotropic_, py::arg("grads"), py::arg("k"), py::arg("group_index"), py::arg("seed"),
        py::arg("offset"), "in place: grad_t = k[group(t)] * grad_t + N(0, (std_t + 1e-8)^2)");
  m.def("ge_tensor_std", &mmk::ge_tensor_std, py::arg("grads"),
        "float32 [T]: the unbiased std of each tensor as the statistics pass of ge_isotropic_ computes it");

  m.def("balance_coefficients", &mmk::balance_coefficients_cpu, py::arg("logits"), py::arg("labels"), py::arg("s_hat"),
        py::arg("steps"), py::arg("method"), py::arg("ignore_index"), py::arg("alpha"), py::arg("q_base"), py::arg("lam"),
        py::arg("beta_max"), py::arg("clip"), py::arg("z_sigmoid"), py::arg("ratio_difference"), py::arg("tie"),
        "CPU: fp32 [3M + 1] scores | ratios | coefficients | flag of [M, B, C] logits (or M [B, C]); method 0 ogm_ge, "
        "1 ogm, 2 opm, 3 agm (s_hat, steps updated in place), 4 mlb");

  m.def("shapley_weights", &mmk::shapley_weights, py::arg("num_modalities"),
        "float32 [2^M - 1, M]: w_m(S) at row S - 1 (header math)");
  m.def("shapley_masked_batch", &mmk::shapley_masked_batch, py::arg("inputs"), py::arg("num_blocks"),
        py::arg("fill") = py::none(),
        "masked copies of M inputs for subsets S = 1 .. num_blocks stacked along the batch; muted rows of modality m "
        "hold zeros, or fill[m] (one row) when fill is given");
  m.def("shapley_responses", &mmk::shapley_responses, py::arg("subset_outputs"),
        "phi [M, B, ...] = sum_S w_m(S) v(S)");
  m.def("shapley_responses_backward", &mmk::shapley_responses_backward, py::arg("grad_phi"), py::arg("kappa"),
        py::arg("out_dtype"), "grad_v[S - 1] = sum_m kappa_m w_m(S) grad_phi[m]");
}
