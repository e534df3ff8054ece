// The table-lookup decode kernel (tl_kernel.h) for AVX-512 (F + BW + VL + DQ): 64-byte vectors,
// vpshufb's four 16-byte lanes are four tables per lookup, the scales of 16 groups loaded and
// transposed at once (tl_avx512_common.h), the table build 16 entries per vector (vpmovsdb). Where
// cpuid also has VBMI and VNNI, tl_avx512vbmi.cpp is chosen instead. Compiled for AVX-512 whatever
// the build machine is; the dispatcher calls it only when cpuid reports all four extensions.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace: one set of argument types for every file
#include "tl_args.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own _mm512_undefined_* in the intrinsics
#include <immintrin.h>

namespace gsq_tlk_avx512 {

#include "kernel_common.h"
#include "tl_avx512_common.h"

struct V : TlTableEntries512 {
  using B = __m512i;
  using FR = __m512;  // output rows 0..15
  static constexpr int L = 4, W = 64;
  static constexpr int kNib1 = 16 * L;  // tl_kernel.h's layout: a step's L lanes' tables per nibble
  static inline int64_t table_offset(int64_t o) { return (o / W) * 32 * W + (o % 16) * 32 * L + ((o % W) / 16) * 16; }
  static inline B loadu(const void* p) { return _mm512_loadu_si512(p); }
  static inline B load_partial(const void* p, int n) { return _mm512_maskz_loadu_epi8((~0ull) >> (64 - n), p); }
  static inline void store(void* p, B v) { _mm512_storeu_si512(p, v); }
  static inline B zero() { return _mm512_setzero_si512(); }
  static inline B set1_8(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  static inline B and_(B a, B b) { return _mm512_and_si512(a, b); }
  static inline B srli4(B v) { return _mm512_srli_epi16(v, 4); }
  static inline B shuffle(B t, B i) { return _mm512_shuffle_epi8(t, i); }
  static inline B unpacklo8(B a, B b) { return _mm512_unpacklo_epi8(a, b); }
  static inline B unpackhi8(B a, B b) { return _mm512_unpackhi_epi8(a, b); }
  static inline B unpacklo16(B a, B b) { return _mm512_unpacklo_epi16(a, b); }
  static inline B unpackhi16(B a, B b) { return _mm512_unpackhi_epi16(a, b); }
  static inline B unpacklo32(B a, B b) { return _mm512_unpacklo_epi32(a, b); }
  static inline B unpackhi32(B a, B b) { return _mm512_unpackhi_epi32(a, b); }
  static inline B unpacklo64(B a, B b) { return _mm512_unpacklo_epi64(a, b); }
  static inline B unpackhi64(B a, B b) { return _mm512_unpackhi_epi64(a, b); }
  static inline B maddubs(B u, B s) { return _mm512_maddubs_epi16(u, s); }
  static inline B add16(B a, B b) { return _mm512_add_epi16(a, b); }

  static inline FR fr_zero() { return _mm512_setzero_ps(); }
  static inline FR fr_mul(FR s, float a) { return _mm512_mul_ps(s, _mm512_set1_ps(a)); }
  static inline FR fr_fma(FR v, FR s, FR acc) { return _mm512_fmadd_ps(v, s, acc); }
  static inline FR fr_add1(FR v, float c) { return _mm512_add_ps(v, _mm512_set1_ps(c)); }
  static inline void fr_store(float* p, FR v) { _mm512_storeu_ps(p, v); }
  static inline FR lane_rows(B aa, B bb, int l) {
    __m128i x, y;
    switch (l) {
      case 0: x = _mm512_extracti32x4_epi32(aa, 0); y = _mm512_extracti32x4_epi32(bb, 0); break;
      case 1: x = _mm512_extracti32x4_epi32(aa, 1); y = _mm512_extracti32x4_epi32(bb, 1); break;
      case 2: x = _mm512_extracti32x4_epi32(aa, 2); y = _mm512_extracti32x4_epi32(bb, 2); break;
      default: x = _mm512_extracti32x4_epi32(aa, 3); y = _mm512_extracti32x4_epi32(bb, 3); break;
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_inserti128_si256(_mm256_castsi128_si256(x), y, 1)));
  }
  using ScaleCache = TlScaleCache;  // tl_avx512_common.h: no gathers
};

#include "tl_kernel.h"

}  // namespace gsq_tlk_avx512

TlKernel gsq_tl_avx512 = {gsq_tlk_avx512::V::W, &gsq_tlk_avx512::tl_build_entry, &gsq_tlk_avx512::tl_rows_entry};

#pragma GCC pop_options
