// The SIMD GEMM (gemm_simd.h) for AVX-512 (F + BW + VL + DQ): 16 float lanes, tiles of up to
// 8 activation rows, and the 3-bit hi plane read straight into a mask register (16 codes' bit 2
// in one 16-bit load). Compiled for AVX-512 whatever the build machine is; the dispatcher calls
// it only when cpuid reports all four extensions. Group size 32 (8 codes per quarter, half a
// vector) goes to the AVX2 kernel instead.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>

namespace gsq_isa_avx512 {

struct V {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kMaxTile = 8;
  static constexpr int kAccRegs = 16;  // accumulators kept in registers (dot_rows' chains)
  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float v) { return _mm512_set1_ps(v); }
  static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static inline I load_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline I and_mask(I v, int mask) { return _mm512_and_si512(v, _mm512_set1_epi32(mask)); }
  // Lane l gets bit (bit0 + l) of the hi plane at bit `to`: the 16 bits are the lane mask.
  static inline I or_hi_bits(I u, const uint8_t* plane, int bit0, int to) {
    uint16_t bits;
    std::memcpy(&bits, plane + bit0 / 8, 2);
    return _mm512_mask_or_epi32(u, static_cast<__mmask16>(bits), u, _mm512_set1_epi32(1 << to));
  }
  static inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  // float32 -> bf16, round to nearest even (finite inputs: dequantized weights)
  static inline void store_bf16(uint16_t* p, F v) {
    const I b = _mm512_castps_si512(v);
    const I odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), odd), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static inline F load_bf16(const uint16_t* p) {  // 16 bf16 -> float32: the bits, 16 places up
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
};

#include "gemm_simd.h"

}  // namespace gsq_isa_avx512

GemmRowsFn gsq_gemm_rows_avx512 = &gsq_isa_avx512::gemm_rows_entry;
DequantRowsFn gsq_dequant_rows_avx512 = &gsq_isa_avx512::dequant_rows_entry;
DenseRowsFn gsq_dense_rows_avx512 = &gsq_isa_avx512::dense_rows_entry;

#pragma GCC pop_options
