// Math of the noise ops, shared by the CPU twins and the CUDA kernels (docs/methods/ogm_ge.md).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace mmk {

// Row factor of the covariance tap (TPAMI Eq. 13-17 with z-centering): row i of the incoming gradient is
// multiplied by k + sigma * (z_i - mean(z)). Evaluated in this exact order with correctly rounded float
// operations on both CPU and CUDA, so both backends give the same bits.
MMK_HD float cov_row_factor(float k, float sigma, float z, float z_mean) {
  return add_rn(k, mul_rn(sigma, sub_rn(z, z_mean)));
}

// Sample count, mean and sum of squared deviations of a set of values (for the unbiased std of OGM-GE).
struct Moments {
  double n, mean, m2;
};

// Moments of one chunk from its double-precision sum and sum of squares. The chunk is small (<= 65536
// values), so the cancellation in ss - s * mean is benign in double; chunks are then merged with Chan's rule.
MMK_HD Moments moments_from_sums(double n, double s, double ss) {
  if (n <= 0.0) return Moments{0.0, 0.0, 0.0};
  const double mean = s / n;
  double m2 = ss - s * mean;
  if (m2 < 0.0) m2 = 0.0;
  return Moments{n, mean, m2};
}

// Chan, Golub, LeVeque parallel merge of two moment sets.
MMK_HD Moments merge_moments(Moments a, Moments b) {
  if (a.n <= 0.0) return b;
  if (b.n <= 0.0) return a;
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// Unbiased standard deviation (as torch.std), NaN for fewer than two values (as torch.std).
// A tensor with fewer than 2 elements has no unbiased std; it is defined as 0 (so GE adds only 1e-8 * n to a PReLU
// weight or a scalar bias instead of turning it into NaN).
MMK_HD float unbiased_std(Moments m) {
  if (m.n < 2.0) return 0.0f;
  return static_cast<float>(sqrt(m.m2 / (m.n - 1.0)));
}

// OGM-GE noise scale of the authors' code (std of the Gaussian draw): the tensor's std as read back to the host
// (float for float/half/bfloat16 gradients, double for double ones) plus 1e-8, added in double.
template <typename opmath_t>
MMK_HD opmath_t ge_noise_scale(Moments m) {
  const double sd = m.n < 2.0 ? 0.0 : sqrt(m.m2 / (m.n - 1.0));  // std := 0 below 2 elements (see unbiased_std)
  return static_cast<opmath_t>(static_cast<double>(static_cast<opmath_t>(sd)) + 1e-8);
}

// OGM-GE update of one gradient element (authors' rule, docs/methods/ogm_ge.md): k * g + scale * n, each product
// rounded, then the sum (as the two-step `grad * k + noise` of the authors' loop).
template <typename opmath_t>
MMK_HD opmath_t ge_update(opmath_t g, opmath_t k, opmath_t scale, opmath_t n) {
  return add_rn(mul_rn(k, g), mul_rn(scale, n));
}

// Tensor elements are laid out on the noise stream padded to multiples of 4, so that one Philox call serves
// four consecutive elements: element j of a tensor whose padded base is `base` (a multiple of 4) takes normal
// slot (base + j) % 4 of counter offset + (base + j) / 4.
MMK_HD int64_t pad4(int64_t n) { return (n + 3) & ~int64_t(3); }

}  // namespace mmk
