// Shapley weights of AGM (ICCV 2023, Eq. 1-3) with v(empty) = 0, shared by host and device.
// Subsets are bitmasks S = 1 .. 2^M - 1 (bit m set = modality m present), stored at index S - 1.
#pragma once

#include <cstdint>

#include "common.h"

namespace mmk {

constexpr int kMaxModalities = 8;

MMK_HD int popcount_u32(uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __popc(s);
#else
  return __builtin_popcount(s);
#endif
}

MMK_HD double factorial_small(int n) {
  double f = 1.0;
  for (int i = 2; i <= n; ++i) f *= static_cast<double>(i);
  return f;
}

// Coefficient w_m(S) of v(S) in phi_m = sum_{T not containing m} |T|! (M - |T| - 1)! / M! (v(T + m) - v(T)):
//   m in S:     + (|S| - 1)! (M - |S|)! / M!
//   m not in S: - |S|! (M - |S| - 1)! / M!
// All factorials are exact in double for M <= 8; the quotient is rounded once.
MMK_HD double shapley_weight(int M, uint32_t S, int m) {
  const int t = popcount_u32(S);
  if ((S >> m) & 1u) return factorial_small(t - 1) * factorial_small(M - t) / factorial_small(M);
  return -(factorial_small(t) * factorial_small(M - t - 1) / factorial_small(M));
}

// Number of subset rows: the 2^M - 1 non-empty subsets.
MMK_HD int num_subsets(int M) { return (1 << M) - 1; }

}  // namespace mmk
