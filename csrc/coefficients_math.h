// Math of the fused coefficient op (docs/methods/, one page per method): the score of one row and the tail scores -> ratios ->
// coefficients -> flag -> AGM state, as plain inline functions (host/device style of noise_math.h). The CPU twin
// (coefficients.cpp) calls them; they follow mmkernels/reference/coefficients.py operation by operation in fp32, so the twin
// matches the reference up to the order of the score sums.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace mmk {

enum CoeffMethod : int { kOgmGe = 0, kOgm = 1, kOpm = 2, kAgm = 3, kMlb = 4 };  // coefficients.METHODS order
constexpr int kMaxModalities = 8;
constexpr float kLogProbFloor = -18.420680743952367f;  // log(1e-8): AGM's 'ce' treats p < 1e-8 as 1e-8

struct CoeffParams {
  int method;
  float alpha, q_base, lam, beta_max, clip;
  bool has_clip, z_sigmoid, ratio_difference;
  int tie;
};

// Score of one valid row from logp = log softmax(u)[y]: 'prob' softmax[y] (TPAMI Eq. 6-7), 'ce' -max(logp, log 1e-8)
// (AGM Eq. 4). NaN stays NaN (as torch.clamp).
MMK_HD float row_score(float logp, bool ce) {
  if (!ce) return expf(logp);
  return -(logp < kLogProbFloor ? kLogProbFloor : logp);
}

// z of TPAMI Eq. 8 / 11: tanh(x - 1), or sigmoid(x) (Tab. 15).
MMK_HD float z_map(float x, bool sigmoid) { return sigmoid ? 1.0f / (1.0f + expf(-x)) : tanhf(x - 1.0f); }

MMK_HD bool finite_all(const float* v, int n) {
  for (int i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

MMK_HD float sum_of(const float* v, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += v[i];
  return s;
}

// TPAMI Eq. 7: rho_m = 1/(M-1) sum_{j != m} s_m / s_j; 'difference' (Tab. 15, on batch means): 1 + (M s_m - sum s)/(M-1).
MMK_HD void ratio_tpami(const float* s, int M, bool difference, float* rho) {
  const float total = sum_of(s, M);
  for (int m = 0; m < M; ++m) {
    if (difference) {
      rho[m] = 1.0f + (s[m] * static_cast<float>(M) - total) / static_cast<float>(M - 1);
    } else {
      float acc = 0.0f;
      for (int j = 0; j < M; ++j) acc += j == m ? 0.0f : s[m] / s[j];
      rho[m] = acc / static_cast<float>(M - 1);
    }
  }
}

// AGM Eq. 7 / 9: exp(M/(M-1) (mean_k s_k - s_m)).
MMK_HD void agm_strength(const float* s, int M, float* out) {
  const float mean = sum_of(s, M) / static_cast<float>(M);
  const float c = static_cast<float>(static_cast<double>(M) / static_cast<double>(M - 1));
  for (int m = 0; m < M; ++m) out[m] = expf(c * (mean - s[m]));
}

// The tail of the pipeline (reference.balance_from_sums_ref): score sums [M] (fp32) and the valid-row count ->
// out = [scores M | ratios M | coefficients M | flag]; AGM's running state (s_hat [M], steps) is read and, when the
// flag is 0 and a state is given, updated (AGM Eq. 10). flag: 2 no valid row, else 1 a non-finite score, ratio or
// coefficient, else 0; coefficients neutral (k = 1, q = 0, kappa = 1) when the flag is not 0. Without a state
// (keep_state false) pass s_hat = zeros and steps = 0: no history, tau = 1.
MMK_HD void coefficients_from_sums(const float* sums, float count, int M, const CoeffParams& p, float* s_hat,
                                   float* steps, bool keep_state, float* out) {
  float s[kMaxModalities], rho[kMaxModalities], k[kMaxModalities];
  const bool means = p.method == kAgm;
  for (int m = 0; m < M; ++m) s[m] = means ? sums[m] / count : sums[m];
  float neutral = 1.0f;
  if (p.method == kOgmGe) {  // authors' CVPR 2022 code; M > 2: TPAMI ratio
    if (M == 2) {
      rho[0] = s[0] / s[1];
      rho[1] = s[1] / s[0];
      const bool first_suppressed = p.tie == 0 ? !(rho[1] > 1.0f) : rho[0] > 1.0f;  // at a tie: modality `tie`
      k[0] = first_suppressed ? 1.0f - tanhf(p.alpha * rho[0]) : 1.0f;
      k[1] = first_suppressed ? 1.0f : 1.0f - tanhf(p.alpha * rho[1]);
    } else {
      ratio_tpami(s, M, false, rho);
      for (int m = 0; m < M; ++m) k[m] = rho[m] > 1.0f ? 1.0f - tanhf(p.alpha * rho[m]) : 1.0f;
    }
  } else if (p.method == kOgm || p.method == kOpm) {  // TPAMI Eq. 11 / Eq. 8
    float mean_s[kMaxModalities];
    for (int m = 0; m < M; ++m) mean_s[m] = sums[m] / count;
    ratio_tpami(p.ratio_difference ? mean_s : s, M, p.ratio_difference, rho);
    for (int m = 0; m < M; ++m) {
      if (p.method == kOgm) {
        const float v = 1.0f - p.alpha * z_map(rho[m], p.z_sigmoid);
        k[m] = rho[m] > 1.0f ? (v < 0.0f ? 0.0f : v) : 1.0f;
      } else {
        const float v = p.q_base * (1.0f + p.lam * z_map(rho[m], p.z_sigmoid));
        k[m] = rho[m] > 1.0f ? (v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v)) : 0.0f;
      }
    }
    if (p.method == kOpm) neutral = 0.0f;
  } else if (p.method == kAgm) {  // AGM Eq. 7-9; no history (steps == 0): s_hat = 0, tau = 1 (Alg. 1)
    float tau[kMaxModalities];
    agm_strength(s, M, rho);
    agm_strength(s_hat, M, tau);
    for (int m = 0; m < M; ++m) {
      float diff = (*steps > 0.0f ? tau[m] : 1.0f) - rho[m];
      if (p.has_clip && diff > p.clip) diff = p.clip;
      k[m] = expf(p.alpha * diff);
    }
  } else {  // MLB Eq. 5-7
    const float total = sum_of(s, M);
    for (int m = 0; m < M; ++m) {
      rho[m] = (total - s[m]) / (static_cast<float>(M - 1) * s[m]);
      const float beta = rho[m] > 1.0f ? p.beta_max : 2.0f;
      k[m] = 1.0f + (beta - 1.0f) * tanhf(p.alpha * (rho[m] - 1.0f));
    }
  }
  const float flag = count == 0.0f ? 2.0f : (finite_all(s, M) && finite_all(rho, M) && finite_all(k, M) ? 0.0f : 1.0f);
  for (int m = 0; m < M; ++m) {
    out[m] = s[m];
    out[M + m] = rho[m];
    out[2 * M + m] = flag == 0.0f ? k[m] : neutral;
  }
  out[3 * M] = flag;
  if (p.method == kAgm && flag == 0.0f && keep_state) {  // AGM Eq. 10: cumulative mean since step 1
    const float t = *steps + 1.0f;
    for (int m = 0; m < M; ++m) s_hat[m] = *steps > 0.0f ? s_hat[m] + (s[m] - s_hat[m]) / t : s[m];
    *steps = t;
  }
}

}  // namespace mmk
