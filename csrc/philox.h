// Counter-based Philox4x32-10 (Salmon, Moraes, Dror, Shaw, SC 2011) and the normal transform used by every
// noise op of mmkernels. Host and device share this code, so the CPU twins and the CUDA kernels draw the
// same bits for the same (seed, counter).
//
// Stream layout (the same as Triton's tl.randint4x with a 64-bit offset):
//   key     = (k0, k1)         = (seed & 0xffffffff, seed >> 32)
//   counter = (c0, c1, c2, c3) = (ctr & 0xffffffff, ctr >> 32, 0, 0),  ctr = offset + i  (mod 2^64)
//   one call gives 4 words (x0, x1, x2, x3).
// Normals (Box-Muller in double precision, rounded once to float):
//   u_j = (x_j + 0.5) / 2^32 in the open interval (0, 1), so log(u) is always finite;
//   n0 = r01 cos(2 pi u1), n1 = r01 sin(2 pi u1), r01 = sqrt(-2 ln u0);
//   n2 = r23 cos(2 pi u3), n3 = r23 sin(2 pi u3), r23 = sqrt(-2 ln u2).
// Double precision makes the float result independent of the platform's libm up to rare last-bit ties,
// and it is immune to nvcc's --use_fast_math (which only touches single-precision functions).
// Users of one normal per counter (the covariance tap: z_i) take n0.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace mmk {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Words4 {
  uint32_t x0, x1, x2, x3;
};

MMK_HD uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds on counter (c0..c3) and key (k0, k1).
MMK_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi_u32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi_u32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Words4{c0, c1, c2, c3};
}

// The 4 words of stream position `ctr` for `seed` (layout above).
MMK_HD Words4 philox_words(uint64_t seed, uint64_t ctr) {
  return philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// (x + 0.5) / 2^32: exact in double, strictly inside (0, 1).
MMK_HD double u32_to_open_unit(uint32_t x) { return (static_cast<double>(x) + 0.5) * 2.3283064365386962890625e-10; }

// Box-Muller on one pair of words -> two independent N(0, 1) floats.
MMK_HD void box_muller(uint32_t a, uint32_t b, float* n_cos, float* n_sin) {
  const double r = sqrt(-2.0 * log(u32_to_open_unit(a)));
  const double theta = 6.283185307179586 * u32_to_open_unit(b);
  *n_cos = static_cast<float>(r * cos(theta));
  *n_sin = static_cast<float>(r * sin(theta));
}

// The first normal n0 of position `ctr` (one normal per counter: the covariance tap's z_i).
MMK_HD float philox_normal(uint64_t seed, uint64_t ctr) {
  const Words4 w = philox_words(seed, ctr);
  float n0, n1;
  box_muller(w.x0, w.x1, &n0, &n1);
  return n0;
}

struct Normals4 {
  float n[4];
};

// All four normals (n0, n1, n2, n3) of position `ctr`.
MMK_HD Normals4 philox_normal4(uint64_t seed, uint64_t ctr) {
  const Words4 w = philox_words(seed, ctr);
  Normals4 out;
  box_muller(w.x0, w.x1, &out.n[0], &out.n[1]);
  box_muller(w.x2, w.x3, &out.n[2], &out.n[3]);
  return out;
}

}  // namespace mmk
