// The GSQ GEMM for AVX-512 with BF16 dot products (vdpbf16ps: 32 multiply-adds per instruction,
// twice an fp32 FMA's), for bf16 activations, which is what vLLM hands a linear on CPU.
//
// Every value it multiplies is exact in bf16: the activations are bf16 already and a weight code
// minus its offset is a small integer (-4..3), so the products are the fp32 kernel's; only the
// order of the fp32 sums differs. Per 32 codes:
//   32 lo bytes -> 32 words (vpmovzxbw), shifted and masked to the 2-bit code of quarter i,
//   (3-bit: +4 where the hi plane's bit is set, the plane's 32 bits used as the lane mask),
//   vpermw through a 32-entry bf16 table of (u - offset)  -> 32 bf16 weights, no int->float,
//   then one vdpbf16ps per activation row.
// 32 lo bytes are 32/Q groups (Q = G/4 bytes per group), a "block" of 128 codes. The weights'
// word order inside a block is (group h, byte j) for quarter i, i.e. code i*Q + j of group h;
// the dispatcher packs x in that same order (xp[m][block][i][h*Q + j], zero past the last
// group), so a vector of x is one load. fp32 lane l of a dot product sums words 2l, 2l+1, so
// it belongs to group h = 2l / Q of the block: the block's scale vector has s[h] in those lanes.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
#include <immintrin.h>

namespace gsq_isa_avx512bf16 {

#include "kernel_common.h"

#include "hi_masks.h"

template <int G, bool Three, int R>
static inline void dot_rows(const GemmArgs& a, const __m512i lut, int64_t n, int64_t m0, float out[R]) {
  constexpr int Q = G / 4, V = 32 / Q;  // groups per block
  const int64_t NB = (a.NG + V - 1) / V;
  const uint8_t* lo_row = a.lo + n * a.NG * Q;
  const uint8_t* hi_row = Three ? a.hi + n * a.NG * (G / 8) : nullptr;
  const __m512i three = _mm512_set1_epi16(3), four = _mm512_set1_epi16(4);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g0 = b * V, groups = a.NG - g0 < V ? a.NG - g0 : V;
    const __m256i raw = groups == V
        ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo_row + g0 * Q))
        : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << (groups * Q)) - 1), lo_row + g0 * Q);
    const __m512i words = _mm512_cvtepu8_epi16(raw);
    uint32_t hm[4];
    if constexpr (Three) hi_masks<G>(hi_row + g0 * (G / 8), groups, hm);
    __m512 part[R];
    for (int r = 0; r < R; ++r) part[r] = _mm512_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      __m512i u = _mm512_and_si512(_mm512_srli_epi16(words, 2 * i), three);
      if constexpr (Three) u = _mm512_mask_add_epi16(u, static_cast<__mmask32>(hm[i]), u, four);
      const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(u, lut);
      const uint16_t* xq = a.xp + ((m0 * NB + b) * 4 + i) * 32;
      for (int r = 0; r < R; ++r)
        part[r] = _mm512_dpbf16_ps(part[r], w, (__m512bh)_mm512_loadu_si512(xq + r * NB * 128));
    }
    __m512 s;
    if constexpr (V == 4) {  // G = 32: lanes 4h..4h+3 take s[h]
      // The four scales are loaded as one vector, not gathered through a float[4] on the stack:
      // four scalar stores read back by one 16-byte load miss store-to-load forwarding, which
      // made this kernel 2.6x slower at G = 32 than at G = 64 (2-core EPYC, 2026-12-06).
      const int64_t i0 = n * a.NG + g0;
      const __mmask8 live = static_cast<__mmask8>((1u << groups) - 1);
      const __m128 s4 = a.scales_bf16
          ? _mm_castsi128_ps(_mm_slli_epi32(
                _mm_cvtepu16_epi32(_mm_maskz_loadu_epi16(live, static_cast<const uint16_t*>(a.scales) + i0)), 16))
          : _mm_maskz_loadu_ps(live, static_cast<const float*>(a.scales) + i0);
      s = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                _mm512_castps128_ps512(s4));
    } else {
      float sv[V];
      for (int h = 0; h < V; ++h) sv[h] = h < groups ? load_scale(a, n * a.NG + g0 + h) : 0.f;
      if constexpr (V == 1) {
        s = _mm512_set1_ps(sv[0]);
      } else {  // V == 2: lanes 0-7 and 8-15
        s = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sv[0]), _mm512_set1_ps(sv[1]));
      }
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(s, part[r], acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Output rows [n0, n1) for all rows of x, in tiles of up to 8 rows.
static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    constexpr int G = decltype(g)::value;
    constexpr bool Three = decltype(three)::value;
    alignas(64) uint16_t table[32] = {0};  // bf16(u - offset) for every code u
    const int offset = Three ? 4 : 2;
    for (int u = 0; u < (Three ? 8 : 4); ++u) table[u] = float_to_bf16(static_cast<float>(u - offset));
    const __m512i lut = _mm512_load_si512(table);
    over_row_tiles<8>(a.M, [&](auto r, int64_t m0) {
      constexpr int R = decltype(r)::value;
      store_tile<R>(a, m0, n0, n1, [&](int64_t n, float* out) { dot_rows<G, Three, R>(a, lut, n, m0, out); });
    });
  });
}

}  // namespace gsq_isa_avx512bf16

GemmRowsFn gsq_gemm_rows_avx512bf16 = &gsq_isa_avx512bf16::gemm_rows_entry;

#pragma GCC pop_options
