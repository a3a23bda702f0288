// AVX2 versions of the vector kernels of philox_vec_cpu.h (which includes this file inside its x86 block), for CPUs
// without AVX-512: 8 counters per Philox step, Box-Muller on 4 doubles with SLEEF's 4-lane 1-ulp log / sincos / cos.
// The functions whose bits must match the scalar code are compiled for "avx2" without "fma", so the compiler cannot
// contract a * b + c. CPU only.
#pragma once

extern "C" {
struct MmkSleefM256d2 {
  __m256d x, y;  // sincos: x = sin, y = cos (Sleef___m256d_2)
};
__attribute__((target("avx2"), weak)) __m256d Sleef_logd4_u10(__m256d);
__attribute__((target("avx2"), weak)) MmkSleefM256d2 Sleef_sincosd4_u10(__m256d);
__attribute__((target("avx2"), weak)) __m256d Sleef_cosd4_u10(__m256d);
}

namespace mmk {
namespace cpu {

#define MMK_AVX2 __attribute__((target("avx2")))

inline bool sleef_d4_available() { return Sleef_logd4_u10 && Sleef_sincosd4_u10 && Sleef_cosd4_u10; }

// (hi, lo) of the 32x32 -> 64-bit products M * c in each of the 8 lanes.
MMK_AVX2 inline void mulhilo8(__m256i m, __m256i c, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(m, c);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(m, 32), _mm256_srli_epi64(c, 32));
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// The words of counters ctr0 .. ctr0 + 7 (lane q = counter ctr0 + q), philox.h lane-wise.
MMK_AVX2 inline void philox_words_x8(uint64_t seed, uint64_t ctr0, __m256i* w) {
  const uint32_t lo0 = static_cast<uint32_t>(ctr0), hi0 = static_cast<uint32_t>(ctr0 >> 32);
  const __m256i lo = _mm256_set1_epi32(static_cast<int>(lo0)), sign = _mm256_set1_epi32(INT32_MIN);
  __m256i c0 = _mm256_add_epi32(lo, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // unsigned c0 < lo0 (the low word wrapped): carry 1 into the high word (the mask is -1 there)
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, sign), _mm256_xor_si256(c0, sign));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(hi0)), wrapped);
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0v, lo0v, hi1v, lo1v;
    mulhilo8(m0, c0, &hi0v, &lo0v);
    mulhilo8(m1, c2, &hi1v, &lo1v);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1v, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1v;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0v, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0v;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

MMK_AVX2 inline __m128i half4(__m256i v, int h) { return h ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v); }

// (x + 0.5) / 2^32 of 4 words, exact in double (the uint32 read as int32 - 2^31, then + 2^31).
MMK_AVX2 inline __m256d open_unit4(__m128i x) {
  const __m256d xd = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_xor_si128(x, _mm_set1_epi32(INT32_MIN))),
                                   _mm256_set1_pd(2147483648.0));
  return _mm256_mul_pd(_mm256_add_pd(xd, _mm256_set1_pd(0.5)), _mm256_set1_pd(2.3283064365386962890625e-10));
}

MMK_AVX2 inline __m256d box_muller_radius4(__m128i a) {
  return _mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), Sleef_logd4_u10(open_unit4(a))));
}

MMK_AVX2 inline __m256d box_muller_angle4(__m128i b) {
  return _mm256_mul_pd(_mm256_set1_pd(6.283185307179586), open_unit4(b));
}

// 8 counters -> out[0 .. 32) (all four normals, element order).
MMK_AVX2 inline void philox_normal4_x8(uint64_t seed, uint64_t ctr0, float* out) {
  __m256i w[4];
  philox_words_x8(seed, ctr0, w);
  for (int h = 0; h < 2; ++h) {  // counters 4h .. 4h + 3
    __m128 n[4];
    for (int pair = 0; pair < 2; ++pair) {
      const __m256d r = box_muller_radius4(half4(w[2 * pair], h));
      const MmkSleefM256d2 sc = Sleef_sincosd4_u10(box_muller_angle4(half4(w[2 * pair + 1], h)));
      n[2 * pair] = _mm256_cvtpd_ps(_mm256_mul_pd(r, sc.y));
      n[2 * pair + 1] = _mm256_cvtpd_ps(_mm256_mul_pd(r, sc.x));
    }
    _MM_TRANSPOSE4_PS(n[0], n[1], n[2], n[3]);  // row q = (n0, n1, n2, n3) of counter 4h + q
    for (int q = 0; q < 4; ++q) _mm_storeu_ps(out + 16 * h + 4 * q, n[q]);
  }
}

// n0 of 8 counters -> out[0 .. 8).
MMK_AVX2 inline void philox_normal0_x8(uint64_t seed, uint64_t ctr0, float* out) {
  __m256i w[4];
  philox_words_x8(seed, ctr0, w);
  for (int h = 0; h < 2; ++h) {
    const __m256d v = _mm256_mul_pd(box_muller_radius4(half4(w[0], h)), Sleef_cosd4_u10(box_muller_angle4(half4(w[1], h))));
    _mm_storeu_ps(out + 4 * h, _mm256_cvtpd_ps(v));
  }
}

MMK_AVX2 inline void philox_normal4_block_avx2(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
  int64_t q = 0;
  for (; q + 8 <= count; q += 8) philox_normal4_x8(seed, ctr0 + static_cast<uint64_t>(q), out + 4 * q);
  philox_normal4_block_scalar(seed, ctr0 + static_cast<uint64_t>(q), count - q, out + 4 * q);
}

MMK_AVX2 inline void philox_normal0_block_avx2(uint64_t seed, uint64_t ctr0, int64_t count, float* out) {
  int64_t q = 0;
  for (; q + 8 <= count; q += 8) philox_normal0_x8(seed, ctr0 + static_cast<uint64_t>(q), out + q);
  for (; q < count; ++q) out[q] = philox_normal(seed, ctr0 + static_cast<uint64_t>(q));
}

MMK_AVX2 inline void sum_sumsq_f32_avx2(const float* p, int64_t n, double* s, double* ss) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), q0 = _mm256_setzero_pd(), q1 = _mm256_setzero_pd();
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) {
    const __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(p + e)), b = _mm256_cvtps_pd(_mm_loadu_ps(p + e + 4));
    s0 = _mm256_add_pd(s0, a);
    s1 = _mm256_add_pd(s1, b);
    q0 = _mm256_add_pd(q0, _mm256_mul_pd(a, a));
    q1 = _mm256_add_pd(q1, _mm256_mul_pd(b, b));
  }
  alignas(32) double ls[4], lq[4];
  _mm256_store_pd(ls, _mm256_add_pd(s0, s1));
  _mm256_store_pd(lq, _mm256_add_pd(q0, q1));
  double ts = (ls[0] + ls[1]) + (ls[2] + ls[3]), tss = (lq[0] + lq[1]) + (lq[2] + lq[3]);
  for (; e < n; ++e) {
    const double x = p[e];
    ts += x;
    tss += x * x;
  }
  *s += ts;
  *ss += tss;
}

MMK_AVX2 inline void scale_f32_avx2(const float* g, float f, float* o, int64_t n) {
  const __m256 vf = _mm256_set1_ps(f);
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) _mm256_storeu_ps(o + e, _mm256_mul_ps(_mm256_loadu_ps(g + e), vf));
  for (; e < n; ++e) o[e] = g[e] * f;
}

MMK_AVX2 inline void ge_update_f32_avx2(float* x, const float* z, float k, float scale, int64_t n) {
  const __m256 vk = _mm256_set1_ps(k), vs = _mm256_set1_ps(scale);
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(x + e, _mm256_add_ps(_mm256_mul_ps(vk, _mm256_loadu_ps(x + e)), _mm256_mul_ps(vs, _mm256_loadu_ps(z + e))));
  for (; e < n; ++e) x[e] = ge_update<float>(x[e], k, scale, z[e]);
}

#undef MMK_AVX2

}  // namespace cpu
}  // namespace mmk
