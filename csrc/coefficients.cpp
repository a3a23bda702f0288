// CPU twin of the fused coefficient op (docs/methods/ogm.md and docs/architecture.md; the Triton kernel's job on CUDA): per-modality scores,
// discrepancy ratios, coefficients, flag and AGM state in one call. Rows (m, i) are scored in parallel
// (at::parallel_for over rows; 16-lane AVX-512 max / exp over the classes where the CPU has it), summed per modality
// in row order in double (independent of the thread count), then the tail math of coefficients_math.h runs once.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "coefficients_math.h"
#include "ops.h"
#include "parallel_cpu.h"
#include "philox_vec_cpu.h"  // cpu_isa(), MMK_X86_VEC


namespace mmk {
namespace {

constexpr const char* kOp = "balance_coefficients";

// log softmax(x)[y] of one row of C contiguous floats: (x_y - max) - log sum_c exp(x_c - max) (torch's order).
// NaN or +inf logits, or a row of -inf, give NaN (as torch.log_softmax).
float row_logp_scalar(const float* x, int64_t C, int64_t y) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < C; ++c) mx = x[c] > mx ? x[c] : mx;
  float sum = 0.0f;
  for (int64_t c = 0; c < C; ++c) sum += expf(x[c] - mx);
  return (x[y] - mx) - logf(sum);
}

#if defined(MMK_X86_VEC)
#define MMK_AVX512 __attribute__((target("avx512f,avx512dq")))

// exp(d) for d <= 0 (d = x - max): 2^n p(r), d = n ln 2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial (about
// 1 fp32 ulp, the accuracy of torch's own expf). d is clamped at -87.3 (exp ~ 1e-38 instead of a smaller value or 0:
// the row sum holds exp(0) = 1, so this changes nothing); NaN lanes are tracked by the caller.
MMK_AVX512 inline __m512 exp_nonpos16(__m512 d) {
  d = _mm512_max_ps(d, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), d);  // Cody-Waite: ln 2 = 0.693359375 - 2.12194440e-4
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

MMK_AVX512 float row_logp_avx512(const float* x, int64_t C, int64_t y) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = ninf;
  int64_t c = 0;
  for (; c + 16 <= C; c += 16) vmax = _mm512_max_ps(_mm512_loadu_ps(x + c), vmax);  // a NaN lane is dropped here
  if (c < C) vmax = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, static_cast<__mmask16>((1u << (C - c)) - 1u), x + c), vmax);
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  __mmask16 nan = 0;  // lanes where x - max is NaN: a NaN logit, +inf (inf - inf), or a row of -inf
  c = 0;
  for (; c + 32 <= C; c += 32) {
    const __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + c), vmx), d1 = _mm512_sub_ps(_mm512_loadu_ps(x + c + 16), vmx);
    nan |= _mm512_cmp_ps_mask(d0, d1, _CMP_UNORD_Q);
    s0 = _mm512_add_ps(s0, exp_nonpos16(d0));
    s1 = _mm512_add_ps(s1, exp_nonpos16(d1));
  }
  for (; c < C; c += 16) {  // masked lanes hold -inf: exp(-inf - max) ~ 0
    const __mmask16 m = C - c >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (C - c)) - 1u);
    const __m512 d = _mm512_sub_ps(_mm512_mask_loadu_ps(ninf, m, x + c), vmx);
    nan |= _mm512_mask_cmp_ps_mask(m, d, d, _CMP_UNORD_Q);
    s0 = _mm512_add_ps(s0, exp_nonpos16(d));
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();  // as torch.log_softmax
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  return (x[y] - mx) - logf(sum);
}
#undef MMK_AVX512

#define MMK_AVX2 __attribute__((target("avx2,fma")))

// exp_nonpos16 on 8 lanes (2^n built in the exponent bits: n is in [-126, 0] after the clamp).
MMK_AVX2 inline __m256 exp_nonpos8(__m256 d) {
  d = _mm256_max_ps(d, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(d, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), d);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

MMK_AVX2 float row_logp_avx2(const float* x, int64_t C, int64_t y) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) vmax = _mm256_max_ps(_mm256_loadu_ps(x + c), vmax);  // a NaN lane is dropped here
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = lanes[0];
  for (int i = 1; i < 8; ++i) mx = lanes[i] > mx ? lanes[i] : mx;
  for (int64_t t = c; t < C; ++t) mx = x[t] > mx ? x[t] : mx;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 s0 = _mm256_setzero_ps();
  int nan = 0;  // x - max NaN: a NaN logit, +inf (inf - inf), or a row of -inf
  c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + c), vmx);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(d, d, _CMP_UNORD_Q));
    s0 = _mm256_add_ps(s0, exp_nonpos8(d));
  }
  _mm256_store_ps(lanes, s0);
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; c < C; ++c) {
    const float d = x[c] - mx;
    nan |= d != d;
    sum += expf(d);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return (x[y] - mx) - logf(sum);
}
#undef MMK_AVX2
#endif

float row_logp_f32(const float* x, int64_t C, int64_t y) {
#if defined(MMK_X86_VEC)
  if (cpu::cpu_isa() == cpu::Isa::kAvx512) return row_logp_avx512(x, C, y);
  if (cpu::cpu_isa() == cpu::Isa::kAvx2) return row_logp_avx2(x, C, y);
#endif
  return row_logp_scalar(x, C, y);
}

double row_logp_f64(const double* x, int64_t C, int64_t cs, int64_t y) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < C; ++c) mx = x[c * cs] > mx ? x[c * cs] : mx;
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) sum += std::exp(x[c * cs] - mx);
  return (x[y * cs] - mx) - std::log(sum);
}

// The score of one valid row (fp16 / bf16 / strided rows are converted to a contiguous fp32 row first).
template <typename scalar_t>
double row_value(const scalar_t* x, int64_t C, int64_t cs, int64_t y, bool ce, std::vector<float>& row) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    const double logp = row_logp_f64(x, C, cs, y);
    const double floor = static_cast<double>(kLogProbFloor);
    return ce ? -(logp < floor ? floor : logp) : std::exp(logp);
  } else {
    float logp;
    if (std::is_same_v<scalar_t, float> && cs == 1) {
      logp = row_logp_f32(reinterpret_cast<const float*>(x), C, y);
    } else {
      row.resize(C);
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<float>(x[c * cs]);
      logp = row_logp_f32(row.data(), C, y);
    }
    return static_cast<double>(row_score(logp, ce));
  }
}

template <typename label_t>
void score_rows(const std::vector<at::Tensor>& xs, bool stacked, const label_t* labels, int64_t M, int64_t B,
                int64_t C, int64_t ignore_index, bool ce, std::vector<double>& val) {
  const at::Tensor& x0 = xs[0];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), kOp, [&] {
    std::vector<const scalar_t*> base(M);  // modality m: row i at base[m] + i rs[m], class c at + c cs[m]
    std::vector<int64_t> rs(M), cs(M);
    for (int64_t m = 0; m < M; ++m) {
      const at::Tensor& xm = stacked ? x0 : xs[m];
      base[m] = xm.const_data_ptr<scalar_t>() + (stacked ? m * x0.stride(0) : 0);
      rs[m] = xm.stride(stacked ? 1 : 0), cs[m] = xm.stride(stacked ? 2 : 1);
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    cpu::parallel_for(0, M * B, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> row;  // a converted / gathered row when the classes are not fp32 and contiguous
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t m = r / B, i = r % B;
        const int64_t y = static_cast<int64_t>(labels[i]);
        if (y == ignore_index) {  // counts nowhere (its logits may be anything)
          val[r] = 0.0;
          continue;
        }
        if (y < 0 || y >= C) {  // a valid row with an out-of-range label: NaN score, flag 1
          val[r] = std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        val[r] = row_value(base[m] + i * rs[m], C, cs[m], y, ce, row);
      }
    });
  });
}

}  // namespace

at::Tensor balance_coefficients_cpu(const std::vector<at::Tensor>& logits, const at::Tensor& labels,
                                    const c10::optional<at::Tensor>& s_hat, const c10::optional<at::Tensor>& steps,
                                    int64_t method, int64_t ignore_index, double alpha, double q_base, double lam,
                                    double beta_max, c10::optional<double> clip, bool z_sigmoid, bool ratio_difference,
                                    int64_t tie) {
  // The public wrapper (mmkernels.coefficients.balance_coefficients) validates; these checks keep the raw op safe.
  TORCH_CHECK(!logits.empty(), kOp, ": unimodal_logits must hold one stacked tensor [M, B, C] or M tensors [B, C]");
  const bool stacked = logits.size() == 1;
  const at::Tensor& x0 = logits[0];
  check_float_tensor(x0, kOp, "unimodal_logits");
  TORCH_CHECK(x0.device().is_cpu() && labels.device().is_cpu(), kOp, ": the CPU twin takes CPU tensors, got ",
              x0.device(), " and ", labels.device());
  TORCH_CHECK(x0.dim() == (stacked ? 3 : 2), kOp, ": unimodal_logits must be [M, B, C] or M tensors [B, C], got shape ",
              x0.sizes());
  const int64_t M = stacked ? x0.size(0) : static_cast<int64_t>(logits.size());
  const int64_t B = x0.size(stacked ? 1 : 0), C = x0.size(stacked ? 2 : 1);
  TORCH_CHECK(M >= 2 && M <= kMaxModalities, kOp, ": the number of modalities must be in [2, 8], got ", M);
  TORCH_CHECK(C >= 1, kOp, ": unimodal_logits must have at least one class, got C = ", C);
  for (int64_t m = 1; m < (stacked ? 1 : M); ++m)
    TORCH_CHECK(logits[m].sizes() == x0.sizes() && logits[m].scalar_type() == x0.scalar_type(), kOp,
                ": unimodal_logits[", m, "] must match unimodal_logits[0] in shape and dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && (labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt),
              kOp, ": labels must be int64/int32 of shape [", B, "], got ", labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(method >= 0 && method <= kMlb, kOp, ": method id must be in [0, 4], got ", method);
  const bool agm = method == kAgm;
  const bool keep_state = agm && s_hat.has_value() && steps.has_value();
  if (keep_state)
    TORCH_CHECK(s_hat->scalar_type() == at::kFloat && s_hat->numel() == M && s_hat->is_contiguous() &&
                    steps->scalar_type() == at::kFloat && steps->numel() == 1 && s_hat->device().is_cpu() &&
                    steps->device().is_cpu(),
                kOp, ": state must hold float32 CPU tensors s_hat [", M, "] and steps []");

  const at::Tensor y = labels.contiguous();
  std::vector<double> val(M * B);
  AT_DISPATCH_INDEX_TYPES(y.scalar_type(), kOp, [&] {
    score_rows(logits, stacked, y.const_data_ptr<index_t>(), M, B, C, ignore_index, agm, val);
  });
  int64_t valid = 0;
  AT_DISPATCH_INDEX_TYPES(y.scalar_type(), kOp, [&] {
    const index_t* l = y.const_data_ptr<index_t>();
    for (int64_t i = 0; i < B; ++i) valid += static_cast<int64_t>(l[i]) != ignore_index;
  });
  float sums[kMaxModalities];
  for (int64_t m = 0; m < M; ++m) {
    double s = 0.0;
    for (int64_t i = 0; i < B; ++i) s += val[m * B + i];
    sums[m] = static_cast<float>(s);
  }
  CoeffParams p{static_cast<int>(method), static_cast<float>(alpha), static_cast<float>(q_base), static_cast<float>(lam),
                static_cast<float>(beta_max), clip.has_value() ? static_cast<float>(*clip) : 0.0f, clip.has_value(),
                z_sigmoid, ratio_difference, static_cast<int>(tie)};
  float zeros[kMaxModalities] = {0.0f}, no_steps = 0.0f;
  float* hat = keep_state ? s_hat->mutable_data_ptr<float>() : zeros;
  float* st = keep_state ? steps->mutable_data_ptr<float>() : &no_steps;
  at::Tensor out = at::empty({3 * M + 1}, at::TensorOptions().dtype(at::kFloat));
  coefficients_from_sums(sums, static_cast<float>(valid), static_cast<int>(M), p, hat, st, keep_state,
                         out.mutable_data_ptr<float>());
  return out;
}

}  // namespace mmk
