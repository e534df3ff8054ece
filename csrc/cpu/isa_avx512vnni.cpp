// Opt-in int8-activation GEMM for AVX-512 VNNI (vpdpbusd: 64 u8 x s8 multiply-adds per
// instruction), as llama.cpp's integer dot products do. Chosen only when asked for
// (GSQ_CPU_ISA=avx512vnni): it rounds the activations, so it changes the model's numbers.
//
// The dispatcher (gsq_cpu_gemm.cpp) quantizes x per (row m, group g) to int8 with scale
// a[m, g] = max|x| / 127 and packs it in this kernel's byte order. Per 64 lo bytes (a "block" of
// 64/Q groups, 256 codes) and quarter i, the unsigned 2-bit codes are (byte >> 2i) & 3 in place
// (3-bit: +4 where the hi plane's bit is set), so byte p of the vector is code i*Q + j of group
// h = p / Q (j = p % Q); xq holds q[m, (block*V + h)*G + i*Q + j] at the same byte. int32 lane l
// of vpdpbusd sums bytes 4l..4l+3, all of group h = 4l / Q, over the four quarters; the block's
// epilogue subtracts offset * sum_k q[m, g, k] (in the group's first lane), turns the exact
// integers into float once and scales them by s[n, g] * a[m, g] per lane.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
#include <immintrin.h>

namespace gsq_isa_avx512vnni {

#include "kernel_common.h"

// Lane l of the result holds the scale of group 4l / Q of the block (0 past the last group):
// loaded straight from the scale array (masked), no round trip through the stack.
template <int G>
static inline __m512 lane_scales(const GemmArgs& a, int64_t idx, int64_t groups) {
  constexpr int V = 256 / G;  // groups per block
  const __mmask16 valid = static_cast<__mmask16>((1u << groups) - 1);
  __m512 s;  // the V scales in lanes 0..V-1
  if (a.scales_bf16) {
    const __m256i raw = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(a.scales) + idx);
    s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    s = _mm512_maskz_loadu_ps(valid, static_cast<const float*>(a.scales) + idx);
  }
  if constexpr (V == 2) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), s);
  } else if constexpr (V == 4) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), s);
  } else {  // V == 8
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), s);
  }
}

// Lane mask of quarter i of a block: bits [i*Q, i*Q + Q) of each group's hi plane, group h's at
// mask bits h*Q.
template <int G>
static inline __mmask64 hi_mask(const uint8_t* planes, int64_t groups, int i) {
  constexpr int Q = G / 4, E = G / 8, QB = Q / 8;
  uint64_t m = 0;
  for (int64_t h = 0; h < groups; ++h) {
    uint64_t bits = 0;
    std::memcpy(&bits, planes + h * E + i * QB, QB);
    m |= bits << (h * Q);
  }
  return static_cast<__mmask64>(m);
}

template <int G, bool Three, int R>
static inline void dot_rows(const GemmArgs& a, int64_t n, int64_t m0, float out[R]) {
  constexpr int Q = G / 4, V = 256 / G;
  const int64_t NB = (a.NG + V - 1) / V;
  const uint8_t* lo_row = a.lo + n * a.NG * Q;
  const uint8_t* hi_row = Three ? a.hi + n * a.NG * (G / 8) : nullptr;
  const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g0 = b * V, groups = a.NG - g0 < V ? a.NG - g0 : V;
    const __m512i raw = groups == V ? _mm512_loadu_si512(lo_row + g0 * Q)
                                    : _mm512_maskz_loadu_epi8((1ull << (groups * Q)) - 1, lo_row + g0 * Q);
    __m512i part[R];
    for (int r = 0; r < R; ++r) part[r] = _mm512_setzero_si512();
    for (int i = 0; i < 4; ++i) {
      __m512i u = _mm512_and_si512(_mm512_srli_epi16(raw, 2 * i), three);
      if constexpr (Three) u = _mm512_mask_add_epi8(u, hi_mask<G>(hi_row + g0 * (G / 8), groups, i), u, four);
      const int8_t* xq = a.xq + ((m0 * NB + b) * 4 + i) * 64;
      for (int r = 0; r < R; ++r) part[r] = _mm512_dpbusd_epi32(part[r], u, _mm512_loadu_si512(xq + r * NB * 256));
    }
    const __m512 ws = lane_scales<G>(a, n * a.NG + g0, groups);
    for (int r = 0; r < R; ++r) {
      const int64_t mb = ((m0 + r) * NB + b) * 16;
      // The code offset: offset * sum_k q[m, g, k] sits in the first lane of group g (xc), so
      // subtracting it from the exact integer sums removes it before the one conversion.
      const __m512i exact = _mm512_sub_epi32(part[r], _mm512_loadu_si512(a.xc + mb));
      const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(a.xa + mb));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), s, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// Output rows [n0, n1) for all rows of x, in tiles of up to 8 rows.
static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    over_row_tiles<8>(a.M, [&](auto r, int64_t m0) {
      constexpr int R = decltype(r)::value;
      store_tile<R>(a, m0, n0, n1, [&](int64_t n, float* out) {
        dot_rows<decltype(g)::value, decltype(three)::value, R>(a, n, m0, out);
      });
    });
  });
}

}  // namespace gsq_isa_avx512vnni

GemmRowsFn gsq_gemm_rows_avx512vnni = &gsq_isa_avx512vnni::gemm_rows_entry;

#pragma GCC pop_options
