// The table-lookup decode kernel (tl_kernel.h) for AVX2: 32-byte vectors, vpshufb's two 16-byte
// lanes are two tables per lookup. Compiled for AVX2 whatever the build machine is; the dispatcher
// calls it only when cpuid reports AVX2 and FMA (and, on AVX-512 machines, when asked: the tests
// run it there too).
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace: one set of argument types for every file
#include "tl_args.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace gsq_tlk_avx2 {

#include "kernel_common.h"

struct V {
  using B = __m256i;
  struct FR {
    __m256 a, b;  // output rows 0..7, 8..15
  };
  static constexpr int L = 2, W = 32;
  static constexpr int kNib1 = 16 * L;  // tl_kernel.h's layout: a step's L lanes' tables per nibble
  static inline int64_t table_offset(int64_t o) { return (o / W) * 32 * W + (o % 16) * 32 * L + ((o % W) / 16) * 16; }
  static inline B loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static inline void store(void* p, B v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static inline B zero() { return _mm256_setzero_si256(); }
  static inline B set1_8(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
  static inline B and_(B a, B b) { return _mm256_and_si256(a, b); }
  static inline B srli4(B v) { return _mm256_srli_epi16(v, 4); }
  static inline B shuffle(B t, B i) { return _mm256_shuffle_epi8(t, i); }
  static inline B unpacklo8(B a, B b) { return _mm256_unpacklo_epi8(a, b); }
  static inline B unpackhi8(B a, B b) { return _mm256_unpackhi_epi8(a, b); }
  static inline B unpacklo16(B a, B b) { return _mm256_unpacklo_epi16(a, b); }
  static inline B unpackhi16(B a, B b) { return _mm256_unpackhi_epi16(a, b); }
  static inline B unpacklo32(B a, B b) { return _mm256_unpacklo_epi32(a, b); }
  static inline B unpackhi32(B a, B b) { return _mm256_unpackhi_epi32(a, b); }
  static inline B unpacklo64(B a, B b) { return _mm256_unpacklo_epi64(a, b); }
  static inline B unpackhi64(B a, B b) { return _mm256_unpackhi_epi64(a, b); }
  static inline B maddubs(B u, B s) { return _mm256_maddubs_epi16(u, s); }
  static inline B add16(B a, B b) { return _mm256_add_epi16(a, b); }

  static inline FR fr_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static inline FR fr_mul(FR s, float a) {
    const __m256 v = _mm256_set1_ps(a);
    return {_mm256_mul_ps(s.a, v), _mm256_mul_ps(s.b, v)};
  }
  static inline FR fr_fma(FR v, FR s, FR acc) { return {_mm256_fmadd_ps(v.a, s.a, acc.a), _mm256_fmadd_ps(v.b, s.b, acc.b)}; }
  static inline void fr_store(float* p, FR v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
  }
  // Lane l's int16 sums (rows 0..7 in acc_a, 8..15 in acc_b) as float32.
  static inline FR lane_rows(B aa, B bb, int l) {
    const __m128i x = l == 0 ? _mm256_castsi256_si128(aa) : _mm256_extracti128_si256(aa, 1);
    const __m128i y = l == 0 ? _mm256_castsi256_si128(bb) : _mm256_extracti128_si256(bb, 1);
    return {_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(x)), _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(y))};
  }
  // s[n, g] of the tile's 16 rows (sidx[r] = n * NG): gathers; a bf16 scale is read as the high
  // half of the 32-bit word 2 bytes before it, except scale 0 of the tensor (`scalar`).
  static inline FR scales16(const TlArgs& a, const int32_t* sidx, int64_t g, bool scalar) {
    const __m256i gi = _mm256_set1_epi32(static_cast<int>(g));
    const __m256i i0 = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(sidx)), gi);
    const __m256i i1 = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(sidx + 8)), gi);
    if (!a.scales_bf16) {
      const float* s = static_cast<const float*>(a.scales);
      return {_mm256_i32gather_ps(s, i0, 4), _mm256_i32gather_ps(s, i1, 4)};
    }
    if (scalar) {
      alignas(32) float t[16];
      for (int r = 0; r < 16; ++r) t[r] = bf16_to_float(static_cast<const uint16_t*>(a.scales)[sidx[r] + g]);
      return {_mm256_load_ps(t), _mm256_load_ps(t + 8)};
    }
    const int* base = reinterpret_cast<const int*>(static_cast<const char*>(a.scales) - 2);
    const __m256i hi16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    return {_mm256_castsi256_ps(_mm256_and_si256(_mm256_i32gather_epi32(base, i0, 2), hi16)),
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_i32gather_epi32(base, i1, 2), hi16))};
  }

  struct ScaleCache {  // tl_kernel.h asks per group; here each is two gathers
    inline FR get(const TlArgs& a, const int32_t* sidx, int64_t g) { return scales16(a, sidx, g, g == 0 && sidx[0] == 0); }
  };

  // Table build.
  static inline float absmax(const float* x, int n) {  // n a multiple of 8
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
  static inline void store_q(int8_t* d, __m256 e0, __m256 e1, float inv) {  // round(e * inv) -> 16 int8
    const __m256 v = _mm256_set1_ps(inv);
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(e0, v)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(e1, v));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // 16 int16 in order
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  }
  static inline void entries2(float xa, float xb, float inv, int8_t* d) {
    const __m256 a = _mm256_set1_ps(xa), b = _mm256_set1_ps(xb);
    __m256 e[2];
    for (int h = 0; h < 2; ++h)
      e[h] = _mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(kTlCoefA + 8 * h), a), _mm256_mul_ps(_mm256_load_ps(kTlCoefB + 8 * h), b));
    store_q(d, e[0], e[1], inv);
  }
  static inline void entries4(const float* x, float inv, int8_t* d) {
    __m256 e[2];
    for (int h = 0; h < 2; ++h) {
      e[h] = _mm256_mul_ps(_mm256_load_ps(kTlSign[0] + 8 * h), _mm256_set1_ps(x[0]));
      for (int i = 1; i < 4; ++i) e[h] = _mm256_add_ps(e[h], _mm256_mul_ps(_mm256_load_ps(kTlSign[i] + 8 * h), _mm256_set1_ps(x[i])));
    }
    store_q(d, e[0], e[1], inv);
  }
};

#include "tl_kernel.h"

}  // namespace gsq_tlk_avx2

TlKernel gsq_tl_avx2 = {gsq_tlk_avx2::V::W, &gsq_tlk_avx2::tl_build_entry, &gsq_tlk_avx2::tl_rows_entry};

#pragma GCC pop_options
