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
  static inline B load_partial(const void* p, int n) {  // n bytes, a multiple of 4; zeros after (vpmaskmovd: no fault past them)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_epi32(static_cast<const int*>(p), _mm256_cmpgt_epi32(_mm256_set1_epi32(n / 4), lane));
  }
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
  static inline FR fr_add1(FR v, float c) {
    const __m256 k = _mm256_set1_ps(c);
    return {_mm256_add_ps(v.a, k), _mm256_add_ps(v.b, k)};
  }
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
  // s[n, g] of a tile's 16 rows (sidx[r] = n * NG), 8 groups at a time: each row's 8 scales loaded
  // and widened, then two 8 x 8 transposes, so a group's scales are two aligned loads (as
  // tl_avx512_common.h; a gather per group is far slower on AMD cores). The last block of a row
  // (NG not a multiple of 8) is copied scalar: no byte past the tensor is read.
  struct ScaleCache {
    alignas(32) float v[8][16];
    int64_t g0 = -1;
    static inline void transpose8(__m256i r[8]) {
      __m256i t[8], u[8];
      for (int p = 0; p < 4; ++p) {
        t[2 * p] = _mm256_unpacklo_epi32(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_epi32(r[2 * p], r[2 * p + 1]);
      }
      for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: u[4h + d] holds dwords d (low lane), d + 4 (high lane)
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
      }
      for (int d = 0; d < 4; ++d) {
        r[d] = _mm256_permute2x128_si256(u[d], u[4 + d], 0x20);
        r[d + 4] = _mm256_permute2x128_si256(u[d], u[4 + d], 0x31);
      }
    }
    inline FR get(const TlArgs& a, const int32_t* sidx, int64_t g) {
      const int64_t b = g & ~int64_t{7};
      if (b != g0) {
        const int64_t cnt = a.NG - b < 8 ? a.NG - b : 8;
        for (int half = 0; half < 2; ++half) {
          __m256i r[8];
          for (int i = 0; i < 8; ++i) {
            const int64_t at = sidx[8 * half + i] + b;
            if (cnt == 8 && a.scales_bf16) {
              const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.scales) + at));
              r[i] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
            } else if (cnt == 8) {
              r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const float*>(a.scales) + at));
            } else {
              alignas(32) float t[8] = {};
              for (int64_t c = 0; c < cnt; ++c)
                t[c] = a.scales_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.scales)[at + c]) : static_cast<const float*>(a.scales)[at + c];
              r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
            }
          }
          transpose8(r);
          for (int d = 0; d < 8; ++d) _mm256_store_si256(reinterpret_cast<__m256i*>(v[d] + 8 * half), r[d]);
        }
        g0 = b;
      }
      return {_mm256_load_ps(v[g - g0]), _mm256_load_ps(v[g - g0] + 8)};
    }
  };

  // Table build (tl_build.h): round(e * inv) -> 16 int8, half to even (vcvtps2dq) and saturated.
  static inline void store_q(int8_t* d, __m256 e0, __m256 e1, float inv) {
    const __m256 v = _mm256_set1_ps(inv);
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(e0, v)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(e1, v));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // 16 int16 in order
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  }
  // As tl_avx512_common.h: (x_a (la - 2) + x_b (lb - 2)) + (x_a + x_b) / 2, each sum rounded once.
  static inline void entries2(float xa, float xb, float inv, int8_t* d) {
    const __m256 a = _mm256_set1_ps(xa), b = _mm256_set1_ps(xb), h = _mm256_set1_ps(0.5f * (xa + xb));
    __m256 e[2];
    for (int i = 0; i < 2; ++i)
      e[i] = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(kTlCoefA + 8 * i), a),
                                         _mm256_mul_ps(_mm256_load_ps(kTlCoefB + 8 * i), b)), h);
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
