// Vectorised CPU Philox4x32-10 + Box-Muller (csrc/philox.h's stream and transform, 16 counters per AVX-512 step).
// CPU only (the .cu files never include it). The extension is built for the baseline x86-64 ISA, so the AVX-512
// code sits in functions with a target attribute and runs only where the CPU reports AVX-512F/DQ at run time;
// elsewhere (and for the tails) the scalar header code runs. Same words as philox.h (integer math, exact); the
// normals use the double-precision log / sin+cos of SLEEF (the library torch itself links and exports; torch's
// own double torch.log/cos/sin on CPU call the same 1-ulp routines), rounded once to float as in philox.h: within
// 1 fp32 ulp of the scalar path, and bit-equal except where a double lands at an fp32 rounding tie (~1e-8).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>

#include "noise_math.h"
#include "philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MMK_X86_VEC 1
// GCC 12 reports its own _mm512_undefined_* idiom (`__m512 __Y = __Y;`) as uninitialized once inlined here.
// (Left off for the rest of the including file: the warning is reported wherever the intrinsics are inlined.)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

// SLEEF's 8-lane double routines (exported by libtorch_cpu; sleef.h only declares them under -mavx512f). Weak: a
// torch without them still loads the extension, and the scalar path runs (cpu_isa() checks them).
extern "C" {
struct MmkSleefM512d2 {
  __m512d x, y;  // sincos: x = sin, y = cos (Sleef___m512d_2)
};
__attribute__((target("avx512f"), weak)) __m512d Sleef_logd8_u10(__m512d);
__attribute__((target("avx512f"), weak)) MmkSleefM512d2 Sleef_sincosd8_u10(__m512d);
__attribute__((target("avx512f"), weak)) __m512d Sleef_cosd8_u10(__m512d);
}
#endif

namespace mmk {
namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

// The vector path this CPU runs, chosen once: AVX-512F/DQ, else AVX2, where torch also exports the SLEEF routines;
// else the scalar header code. MMKERNELS_CPU_ISA=scalar|avx2 pins a lower one (tests run every path that way).
inline Isa cpu_isa();

// Scalar path: normals of counters ctr0 .. ctr0 + count - 1, out[4 q + j] = n_j(ctr0 + q).
inline void philox_normal4_block_scalar(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
  for (int64_t q = 0; q < count; ++q) {
    const Normals4 z = philox_normal4(seed, ctr0 + static_cast<uint64_t>(q));
    for (int j = 0; j < 4; ++j) out[4 * q + j] = z.n[j];
  }
}

}  // namespace cpu
}  // namespace mmk

#if defined(MMK_X86_VEC)
#include "cpu_avx2.h"
#endif

namespace mmk {
namespace cpu {

inline Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(MMK_X86_VEC)
    const char* pin = std::getenv("MMKERNELS_CPU_ISA");
    const std::string want = pin ? pin : "";
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && Sleef_logd8_u10 &&
                        Sleef_sincosd8_u10 && Sleef_cosd8_u10;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && sleef_d4_available();
    if (want == "scalar") return Isa::kScalar;
    if (avx512 && want != "avx2") return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

#if defined(MMK_X86_VEC)
#define MMK_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))

// (hi, lo) of the 32x32 -> 64-bit products M * c in each of the 16 lanes.
MMK_AVX512 inline void mulhilo16(__m512i m, __m512i c, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(m, c);                                          // lanes 0, 2, ..: 64-bit
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(m, 32), _mm512_srli_epi64(c, 32));  // lanes 1, 3, ..
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Box-Muller (philox.h box_muller) on 8 word pairs: (r cos theta, r sin theta) rounded to float.
MMK_AVX512 inline void box_muller8(__m256i a, __m256i b, __m256* n_cos, __m256* n_sin) {
  const __m512d half = _mm512_set1_pd(0.5), two_m32 = _mm512_set1_pd(2.3283064365386962890625e-10);
  const __m512d ua = _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu32_pd(a), half), two_m32);
  const __m512d ub = _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu32_pd(b), half), two_m32);
  const __m512d r = _mm512_sqrt_pd(_mm512_mul_pd(_mm512_set1_pd(-2.0), Sleef_logd8_u10(ua)));
  const MmkSleefM512d2 sc = Sleef_sincosd8_u10(_mm512_mul_pd(_mm512_set1_pd(6.283185307179586), ub));
  *n_cos = _mm512_cvtpd_ps(_mm512_mul_pd(r, sc.y));
  *n_sin = _mm512_cvtpd_ps(_mm512_mul_pd(r, sc.x));
}

// n0..n3 of 8 counters (lane q = counter q) -> 32 floats in element order (out[4 q + j]).
MMK_AVX512 inline void store_interleaved(__m256 n0, __m256 n1, __m256 n2, __m256 n3, float* out) {
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 q04 = _mm256_shuffle_ps(t0, t2, 0x44), q15 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 q26 = _mm256_shuffle_ps(t1, t3, 0x44), q37 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(q04, q15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(q26, q37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(q04, q15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(q26, q37, 0x31));
}

// The words (x0, x1, x2, x3) of the 16 counters ctr0 .. ctr0 + 15, lane q = counter ctr0 + q (philox.h, lane-wise).
MMK_AVX512 inline void philox_words_x16(uint64_t seed, uint64_t ctr0, __m512i* w) {
  const uint32_t lo0 = static_cast<uint32_t>(ctr0), hi0 = static_cast<uint32_t>(ctr0 >> 32);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo0)), iota);
  // carry into the high word where the low word wrapped (at most once over 16 counters)
  __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(hi0)),
                                     _mm512_cmplt_epu32_mask(c0, _mm512_set1_epi32(static_cast<int>(lo0))),
                                     _mm512_set1_epi32(static_cast<int>(hi0)), _mm512_set1_epi32(1));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    __m512i hi0v, lo0v, hi1v, lo1v;
    mulhilo16(m0, c0, &hi0v, &lo0v);
    mulhilo16(m1, c2, &hi1v, &lo1v);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1v, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1v;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0v, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0v;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

MMK_AVX512 inline __m256i half8(__m512i v, int h) {
  return h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
}

// 16 counters ctr0 .. ctr0 + 15 at once -> out[0 .. 64) (all four normals, element order).
MMK_AVX512 inline void philox_normal4_x16(uint64_t seed, uint64_t ctr0, float* out) {
  __m512i w[4];
  philox_words_x16(seed, ctr0, w);
  for (int h = 0; h < 2; ++h) {  // counters 8h .. 8h + 7
    __m256 n0, n1, n2, n3;
    box_muller8(half8(w[0], h), half8(w[1], h), &n0, &n1);
    box_muller8(half8(w[2], h), half8(w[3], h), &n2, &n3);
    store_interleaved(n0, n1, n2, n3, out + 32 * h);
  }
}

// n0 only (the covariance tap's z_i: r cos theta of words 0, 1) of 16 counters -> out[0 .. 16).
MMK_AVX512 inline void philox_normal0_x16(uint64_t seed, uint64_t ctr0, float* out) {
  __m512i w[4];
  philox_words_x16(seed, ctr0, w);
  const __m512d half = _mm512_set1_pd(0.5), two_m32 = _mm512_set1_pd(2.3283064365386962890625e-10);
  for (int h = 0; h < 2; ++h) {
    const __m512d ua = _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu32_pd(half8(w[0], h)), half), two_m32);
    const __m512d ub = _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu32_pd(half8(w[1], h)), half), two_m32);
    const __m512d r = _mm512_sqrt_pd(_mm512_mul_pd(_mm512_set1_pd(-2.0), Sleef_logd8_u10(ua)));
    const __m512d c = Sleef_cosd8_u10(_mm512_mul_pd(_mm512_set1_pd(6.283185307179586), ub));
    _mm256_storeu_ps(out + 8 * h, _mm512_cvtpd_ps(_mm512_mul_pd(r, c)));
  }
}

MMK_AVX512 inline void philox_normal0_block_avx512(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
  int64_t q = 0;
  for (; q + 16 <= count; q += 16) philox_normal0_x16(seed, ctr0 + static_cast<uint64_t>(q), out + q);
  for (; q < count; ++q) out[q] = philox_normal(seed, ctr0 + static_cast<uint64_t>(q));
}

MMK_AVX512 inline void philox_normal4_block_avx512(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
  int64_t q = 0;
  for (; q + 16 <= count; q += 16) philox_normal4_x16(seed, ctr0 + static_cast<uint64_t>(q), out + 4 * q);
  philox_normal4_block_scalar(seed, ctr0 + static_cast<uint64_t>(q), count - q, out + 4 * q);
}

// Sum and sum of squares of n floats in double (8 lanes x 2 accumulators), added to *s, *ss. A float's square is
// exact in double, so the FMA GCC forms from q + a * a rounds exactly as the separate add.
MMK_AVX512 inline void sum_sumsq_f32_avx512(const float* p, int64_t n, double* s, double* ss) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), q0 = _mm512_setzero_pd(), q1 = _mm512_setzero_pd();
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(p + e)), b = _mm512_cvtps_pd(_mm256_loadu_ps(p + e + 8));
    s0 = _mm512_add_pd(s0, a);
    s1 = _mm512_add_pd(s1, b);
    q0 = _mm512_add_pd(q0, _mm512_mul_pd(a, a));
    q1 = _mm512_add_pd(q1, _mm512_mul_pd(b, b));
  }
  double ts = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)), tss = _mm512_reduce_add_pd(_mm512_add_pd(q0, q1));
  for (; e < n; ++e) {
    const double x = p[e];
    ts += x;
    tss += x * x;
  }
  *s += ts;
  *ss += tss;
}
// o[e] = g[e] * f (one rounding per element, as mul_rn).
MMK_AVX512 inline void scale_f32_avx512(const float* g, float f, float* o, int64_t n) {
  const __m512 vf = _mm512_set1_ps(f);
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) _mm512_storeu_ps(o + e, _mm512_mul_ps(_mm512_loadu_ps(g + e), vf));
  if (e < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - e)) - 1u);
    _mm512_mask_storeu_ps(o + e, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, g + e), vf));
  }
}
// x[e] = k x[e] + scale z[e]: each product rounded, then the sum (noise_math.h ge_update). GCC contracts a*b + c
// into an FMA for C++ whenever the target has FMA (AVX-512 does), which would change the bits: the explicit-rounding
// intrinsics are never contracted.
#define MMK_RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
MMK_AVX512 inline __m512 ge_update16(__m512 vk, __m512 x, __m512 vs, __m512 z) {
  return _mm512_add_round_ps(_mm512_mul_round_ps(vk, x, MMK_RN), _mm512_mul_round_ps(vs, z, MMK_RN), MMK_RN);
}
#undef MMK_RN

MMK_AVX512 inline void ge_update_f32_avx512(float* x, const float* z, float k, float scale, int64_t n) {
  const __m512 vk = _mm512_set1_ps(k), vs = _mm512_set1_ps(scale);
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) _mm512_storeu_ps(x + e, ge_update16(vk, _mm512_loadu_ps(x + e), vs, _mm512_loadu_ps(z + e)));
  if (e < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - e)) - 1u);
    _mm512_mask_storeu_ps(x + e, m, ge_update16(vk, _mm512_maskz_loadu_ps(m, x + e), vs, _mm512_maskz_loadu_ps(m, z + e)));
  }
}
#undef MMK_AVX512
#endif

// x[e] = k x[e] + scale z[e] for e < n (fp32, ge_update's rounding).
inline void ge_update_f32(float* __restrict x, const float* __restrict z, float k, float scale, int64_t n) {
#if defined(MMK_X86_VEC)
  if (cpu_isa() == Isa::kAvx512) return ge_update_f32_avx512(x, z, k, scale, n);
  if (cpu_isa() == Isa::kAvx2) return ge_update_f32_avx2(x, z, k, scale, n);
#endif
  for (int64_t e = 0; e < n; ++e) x[e] = ge_update<float>(x[e], k, scale, z[e]);
}

// o[e] = g[e] * f for e < n (fp32).
inline void scale_f32(const float* __restrict g, float f, float* __restrict o, int64_t n) {
#if defined(MMK_X86_VEC)
  if (cpu_isa() == Isa::kAvx512) return scale_f32_avx512(g, f, o, n);
  if (cpu_isa() == Isa::kAvx2) return scale_f32_avx2(g, f, o, n);
#endif
  for (int64_t e = 0; e < n; ++e) o[e] = g[e] * f;
}

// Normals of counters ctr0 .. ctr0 + count - 1 into out[0 .. 4 count): out[4 q + j] = n_j(ctr0 + q).
inline void philox_normal4_block(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
#if defined(MMK_X86_VEC)
  if (cpu_isa() == Isa::kAvx512) return philox_normal4_block_avx512(seed, ctr0, count, out);
  if (cpu_isa() == Isa::kAvx2) return philox_normal4_block_avx2(seed, ctr0, count, out);
#endif
  philox_normal4_block_scalar(seed, ctr0, count, out);
}

// The covariance tap's normals: out[q] = n0(ctr0 + q) for q < count.
inline void philox_normal0_block(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
#if defined(MMK_X86_VEC)
  if (cpu_isa() == Isa::kAvx512) return philox_normal0_block_avx512(seed, ctr0, count, out);
  if (cpu_isa() == Isa::kAvx2) return philox_normal0_block_avx2(seed, ctr0, count, out);
#endif
  for (int64_t q = 0; q < count; ++q) out[q] = philox_normal(seed, ctr0 + static_cast<uint64_t>(q));
}

// s += sum x, ss += sum x^2 over n floats, in double.
inline void sum_sumsq_f32(const float* p, int64_t n, double* s, double* ss) {
#if defined(MMK_X86_VEC)
  if (cpu_isa() == Isa::kAvx512) return sum_sumsq_f32_avx512(p, n, s, ss);
  if (cpu_isa() == Isa::kAvx2) return sum_sumsq_f32_avx2(p, n, s, ss);
#endif
  double a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 4 <= n; e += 4)
    for (int i = 0; i < 4; ++i) {
      const double x = p[e + i];
      a[i] += x;
      b[i] += x * x;
    }
  for (; e < n; ++e) {
    const double x = p[e];
    a[0] += x;
    b[0] += x * x;
  }
  *s += (a[0] + a[1]) + (a[2] + a[3]);
  *ss += (b[0] + b[1]) + (b[2] + b[3]);
}

}  // namespace cpu
}  // namespace mmk
