// The SIMD GEMM (gemm_simd.h) for AVX2 + FMA: 8 float lanes, tiles of up to 4 activation rows
// (2 x 4 accumulators + temporaries fit the 16 ymm registers). Compiled for AVX2 whatever the
// build machine is; the dispatcher calls it only when cpuid reports AVX2 and FMA.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace gsq_isa_avx2 {

struct V {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kMaxTile = 4;
  static constexpr int kAccRegs = 8;  // accumulators kept in registers (dot_rows' chains)
  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float v) { return _mm256_set1_ps(v); }
  static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static inline I load_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static inline I and_mask(I v, int mask) { return _mm256_and_si256(v, _mm256_set1_epi32(mask)); }
  // Lane l gets bit (bit0 + l) of the hi plane at bit `to`; bit0 is a multiple of 8, so the
  // 8 bits are one byte. The byte is broadcast and each lane tests its own bit with a compare:
  // simple ops only (variable shifts made the 3-bit kernel ~3x slower than the 2-bit one on a
  // 2-core AVX2 EPYC).
  static inline I or_hi_bits(I u, const uint8_t* plane, int bit0, int to) {
    const I bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const I set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi8(static_cast<char>(plane[bit0 / 8])), bit), bit);
    return _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi32(1 << to)));
  }
  static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // float32 -> bf16, round to nearest even (finite inputs: dequantized weights)
  static inline void store_bf16(uint16_t* p, F v) {
    const I b = _mm256_castps_si256(v);
    const I odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const I r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), odd), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  static inline F load_bf16(const uint16_t* p) {  // 8 bf16 -> float32: the bits, 16 places up
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static inline float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "gemm_simd.h"

}  // namespace gsq_isa_avx2

GemmRowsFn gsq_gemm_rows_avx2 = &gsq_isa_avx2::gemm_rows_entry;
DequantRowsFn gsq_dequant_rows_avx2 = &gsq_isa_avx2::dequant_rows_entry;
DenseRowsFn gsq_dense_rows_avx2 = &gsq_isa_avx2::dense_rows_entry;

#pragma GCC pop_options
