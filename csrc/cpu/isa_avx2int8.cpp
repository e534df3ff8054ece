// Opt-in int8-activation GEMM for AVX2 (vpmaddubsw: 32 u8 x s8 products, summed in pairs, per
// instruction), as llama.cpp's AVX2 integer dot products do. Chosen only when asked for
// (GSQ_CPU_ISA=avx2int8): it rounds the activations, exactly as the avx512vnni kernel does (the
// dispatcher quantizes x the same way for both), so it changes the model's numbers.
//
// Why it exists: on a 2-core AVX2-only EPYC the float kernel (gemm_simd.h) is bound by unpacking,
// about 3.5 instructions per 8 weights (mask, int->float, FMA, a share of the loads), ~5 weights
// per ns per core. Here 32 codes cost a shift and a mask, one vpmaddubsw per row of x, and one
// 16-bit add; the int32 widening, the offset, the conversion and the scales come once per 128.
//
// Layout. Per 32 lo bytes (a "block" of V = 32/Q groups, 128 codes) and quarter i, the unsigned
// 2-bit codes are (byte >> 2i) & 3 in place (3-bit: | 4 where the hi plane's bit is set), so byte
// p of the vector is code i*Q + j of group h = p / Q (j = p % Q); xq holds q[m, (b*V + h)*G +
// i*Q + j] at the same byte. vpmaddubsw sums bytes 2l, 2l+1 into int16 lane l; four quarters add
// up to at most 4 * 2 * 7 * 127 = 7112, so int16 holds them. vpmaddwd with ones then sums int16
// lanes 2l, 2l+1 into int32 lane l (bytes 4l..4l+3, all of group 4l / Q). The block's epilogue
// subtracts offset * sum_k q[m, g, k] (xc, in the group's first lane), turns the exact integers
// into float once and scales them by s[n, g] * a[m, g] per lane (xa).
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace gsq_isa_avx2int8 {

#include "kernel_common.h"

constexpr int kBlock = 32;  // lo bytes (and xq bytes per quarter) per block

// Byte shuffles that put, in byte p of quarter i's vector, the hi-plane byte holding bit 2 of
// that byte's code: group h = p / Q, code c = i*Q + p % Q, plane byte h*E + c / 8 (the block's
// planes are 16 contiguous bytes, broadcast to both 128-bit halves); bit p % 8 of it (Q is a
// multiple of 8, so c % 8 = p % 8).
template <int G>
struct HiShuffle {
  alignas(32) int8_t ctl[4][kBlock];
  constexpr HiShuffle() : ctl() {
    constexpr int Q = G / 4, E = G / 8;
    for (int i = 0; i < 4; ++i)
      for (int p = 0; p < kBlock; ++p) ctl[i][p] = static_cast<int8_t>((p / Q) * E + (i * Q + p % Q) / 8);
  }
};

// Lane l of the result: the scale of group 4l / Q of the block (0 past the last group).
template <int G>
static inline __m256 lane_scales(const GemmArgs& a, int64_t idx, int64_t groups) {
  constexpr int V = kBlock * 4 / G;
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t h = 0; h < groups; ++h) s[h] = load_scale(a, idx + h);
  if constexpr (V == 1) return _mm256_set1_ps(s[0]);
  else if constexpr (V == 2) return _mm256_set_m128(_mm_set1_ps(s[1]), _mm_set1_ps(s[0]));
  else return _mm256_setr_ps(s[0], s[0], s[1], s[1], s[2], s[2], s[3], s[3]);
}

// T output rows x R rows of x: each quarter's x vector is loaded once for T rows, each block's
// codes unpacked once for R rows.
template <int G, bool Three, int R, int T>
static inline void dot_rows(const GemmArgs& a, int64_t n, int64_t m0, float out[T][R]) {
  constexpr int Q = G / 4, E = G / 8, V = kBlock / Q;
  static constexpr HiShuffle<G> kShuffle;
  const int64_t NB = (a.NG + V - 1) / V;
  const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4), ones = _mm256_set1_epi16(1);
  const __m256i bitsel = _mm256_set1_epi64x(0x8040201008040201ll);  // byte p: 1 << (p % 8)
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t g0 = b * V, groups = a.NG - g0 < V ? a.NG - g0 : V;
    const uint8_t* lo[T];
    __m256i planes[T];
    alignas(32) uint8_t lo_tail[T][kBlock], hi_tail[T][16];
    for (int t = 0; t < T; ++t) {
      lo[t] = a.lo + ((n + t) * a.NG + g0) * Q;
      const uint8_t* hi = Three ? a.hi + ((n + t) * a.NG + g0) * E : nullptr;
      if (groups < V) {  // the row's last, partial block: copy what exists, zeros after
        std::memset(lo_tail[t], 0, kBlock);
        std::memcpy(lo_tail[t], lo[t], groups * Q);
        lo[t] = lo_tail[t];
        if constexpr (Three) {
          std::memset(hi_tail[t], 0, 16);
          std::memcpy(hi_tail[t], hi, groups * E);
          hi = hi_tail[t];
        }
      }
      if constexpr (Three) planes[t] = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)));
    }
    __m256i part[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) part[t][r] = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      __m256i x[R];
      for (int r = 0; r < R; ++r)
        x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (((m0 + r) * NB + b) * 4 + i) * kBlock));
      for (int t = 0; t < T; ++t) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo[t]));
        __m256i u = _mm256_and_si256(i == 0 ? raw : _mm256_srli_epi16(raw, 2 * i), three);
        if constexpr (Three) {
          const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kShuffle.ctl[i]));
          const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(planes[t], ctl), bitsel), bitsel);
          u = _mm256_or_si256(u, _mm256_and_si256(set, four));
        }
        for (int r = 0; r < R; ++r) part[t][r] = _mm256_add_epi16(part[t][r], _mm256_maddubs_epi16(u, x[r]));
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m256 ws = lane_scales<G>(a, (n + t) * a.NG + g0, groups);
      for (int r = 0; r < R; ++r) {
        const int64_t mb = ((m0 + r) * NB + b) * 8;
        // The code offset: offset * sum_k q[m, g, k] sits in the first lane of group g (xc), so
        // subtracting it from the exact integer sums removes it before the one conversion.
        const __m256i exact = _mm256_sub_epi32(_mm256_madd_epi16(part[t][r], ones),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xc + mb)));
        const __m256 s = _mm256_mul_ps(ws, _mm256_loadu_ps(a.xa + mb));
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), s, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t][r]), _mm256_extractf128_ps(acc[t][r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      out[t][r] = _mm_cvtss_f32(s);
    }
}

// Output rows [n0, n1) for all rows of x, in tiles of up to 4 rows of x.
static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    constexpr int G = decltype(g)::value;
    constexpr bool Three = decltype(three)::value;
    over_row_tiles<4>(a.M, [&](auto r, int64_t m0) {
      constexpr int R = decltype(r)::value;
      store_out_tiles<R, out_rows<R>()>(a, m0, n0, n1, [&](auto t, int64_t n, float(*out)[R]) {
        dot_rows<G, Three, R, decltype(t)::value>(a, n, m0, out);
      });
    });
  });
}

}  // namespace gsq_isa_avx2int8

GemmRowsFn gsq_gemm_rows_avx2int8 = &gsq_isa_avx2int8::gemm_rows_entry;

#pragma GCC pop_options
