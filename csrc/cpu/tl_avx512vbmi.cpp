// The table-lookup decode kernel (tables and rounding: tl_kernel.h; built by tl_build.h) for AVX-512
// with VBMI and VNNI (Ice Lake, Zen 4 on): a layout that needs neither unpacking nor lane juggling.
//
// Per super-chunk of 64 stream bytes, the tile's 16 rows are transposed as 16 x 16 dwords (4 stages
// of vpermt2d), so vector d holds bytes 4d..4d+3 of every row, row r in dword r. The four bytes of a
// dword are four different tables; vpermb (a 64-byte table, 6-bit index) serves all four at once:
// the index is the nibble | (byte % 4) << 4 (one vpternlogd), the register the four tables of those
// bytes. vpdpbusd then sums each dword's four looked-up bytes (x1 lo plane, x2 hi plane) into the
// row's int32 sum: per 64 codes of 16 rows, 2 vpermb + 2 vpdpbusd per row of x, against
// tl_kernel.h's 2 vpshufb + 2 unpacks + 2 vpmaddubsw + 2 adds; the group's int32 sums are converted
// and scaled once per group (s[n, g] * a[m, g], one FMA per 16 rows; the scales of 16 groups x 16 rows
// loaded and transposed once, tl_avx512_common.h).
// Compiled for these extensions whatever the build machine is; the dispatcher calls it only when
// cpuid reports them.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"  // outside the namespace: one set of argument types for every file
#include "tl_args.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own _mm512_undefined_* in the intrinsics
#include <immintrin.h>

namespace gsq_tlk_avx512vbmi {

#include "kernel_common.h"
#include "tl_avx512_common.h"

struct V : TlTableEntries512 {
  static constexpr int L = 4, W = 64;
  // Stream byte o: its dword o / 4 has 128 table bytes, the four low-nibble tables (byte o % 4's at
  // 16 (o % 4)), then the four high-nibble ones: one vpermb register each.
  static constexpr int kNib1 = 64;
  static inline int64_t table_offset(int64_t o) { return (o / 4) * 128 + (o % 4) * 16; }
};

#include "tl_build.h"

// One plane (P stream bytes per row, Bg per group, lookups weighted Mult) of the tile into facc.
template <int Bg, int Mult, int R>
static inline void plane(const TlArgs& a, const uint8_t* const rows[16], int64_t P, const int8_t* tbase,
                         const int32_t sidx[16], const uint8_t* next, __m512 facc[R]) {
  constexpr int F = Bg / 4;  // vectors (dwords of the rows) per group
  constexpr int C = R == 1 && F >= 2 ? 4 : 2;
  constexpr int kPlane = Mult == 1 ? 0 : 1;  // whose steps: the lo plane's or the hi plane's
  const __m512i low4 = _mm512_set1_epi8(0x0f), pat = _mm512_set1_epi32(0x30201000), mult = _mm512_set1_epi8(Mult);
  const int64_t slice = (16 * P / ((P + 63) / 64) + 63) / 64 * 64;  // next tile's prefetch, as tl_kernel.h
  const int64_t rtb = a.row_table_bytes, NG = a.NG;  // locals: a's fields are not reloaded per lookup
  float ta[R];
  TlScaleCache scales;
  for (int64_t off = 0; off < P; off += 64) {
    const int64_t valid = P - off < 64 ? P - off : 64;  // a multiple of Bg (P is NG * Bg, Bg divides 64)
    if (next != nullptr)
      for (int64_t b = 0; b < slice; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + (off / 64) * slice + b), _MM_HINT_T1);
    __m512i r[16];
    if (valid == 64) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows[i] + off);
    } else {
      const __mmask64 k = (~0ull) >> (64 - valid);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi8(k, rows[i] + off);
    }
    tl_transpose16_epi32(r);
    const int8_t* tm0[R];  // this super-chunk's tables of each row of x
    for (int m = 0; m < R; ++m) tm0[m] = tbase + m * rtb + (off / 4) * 128;
#pragma GCC unroll 16
    for (int d0 = 0; d0 < 16; d0 += F) {
      if (4 * d0 >= valid) break;
      // C independent vpdpbusd chains per row of x (its latency, not its throughput, bounds one chain)
      __m512i acc[R][C];
      for (int m = 0; m < R; ++m)
        for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int d = d0; d < d0 + F; ++d) {
        const __m512i il = _mm512_ternarylogic_epi32(r[d], low4, pat, 0xEA);  // (v & 0x0f) | (byte % 4) << 4
        const __m512i ih = _mm512_ternarylogic_epi32(_mm512_srli_epi16(r[d], 4), low4, pat, 0xEA);
        constexpr int H = C / 2;
        for (int m = 0; m < R; ++m) {
          const int8_t* tm = tm0[m] + d * 128;
          __m512i& al = acc[m][2 * (d % H)];
          __m512i& ah = acc[m][2 * (d % H) + 1];
          al = _mm512_dpbusd_epi32(al, mult, _mm512_permutexvar_epi8(il, _mm512_loadu_si512(tm)));
          ah = _mm512_dpbusd_epi32(ah, mult, _mm512_permutexvar_epi8(ih, _mm512_loadu_si512(tm + 64)));
        }
      }
      for (int m = 0; m < R; ++m)
        for (int c = 1; c < C; ++c) acc[m][0] = _mm512_add_epi32(acc[m][0], acc[m][c]);
      const int64_t g = (off + 4 * d0) / Bg;  // a flush is one whole group (Bg <= 64)
      const __m512 s = scales.get(a, sidx, g);
      for (int m = 0; m < R; ++m) ta[m] = a.ta[(2 * m + kPlane) * NG + g];
      for (int m = 0; m < R; ++m) {
        __m512 q = _mm512_cvtepi32_ps(acc[m][0]);
        if constexpr (Mult == 1) q = _mm512_add_ps(q, _mm512_set1_ps(a.tc[m * NG + g]));  // the centring, with the lo plane
        facc[m] = _mm512_fmadd_ps(q, _mm512_mul_ps(s, _mm512_set1_ps(ta[m])), facc[m]);
      }
    }
  }
}

template <int G, bool Three, int R>
static void tile(const TlArgs& a, int64_t n0, int64_t nrows) {
  constexpr int Q = G / 4;
  const int64_t K = a.NG * G;
  const uint8_t* lo_rows[16];
  const uint8_t* hi_rows[16];
  alignas(64) int32_t sidx[16];
  tl_tile_rows<G, Three>(a, n0, nrows, lo_rows, hi_rows, sidx);
  __m512 facc[R];
  for (int m = 0; m < R; ++m) facc[m] = _mm512_setzero_ps();
  const bool more = n0 + 16 < a.N;
  plane<Q, 1, R>(a, lo_rows, K / 4, a.tables, sidx, more ? a.lo + (n0 + 16) * (K / 4) : nullptr, facc);
  if constexpr (Three) {
    const int64_t lo_bytes = tl_lo_table_bytes(K);
    plane<Q / 2, 2, R>(a, hi_rows, K / 8, a.tables + lo_bytes, sidx, more ? a.hi + (n0 + 16) * (K / 8) : nullptr, facc);
  }
  float* y = static_cast<float*>(a.y);
  for (int m = 0; m < R; ++m) {
    alignas(64) float out[16];
    _mm512_store_ps(out, facc[m]);
    for (int64_t r = 0; r < nrows; ++r) y[m * a.N + n0 + r] = out[r];
  }
}

static void rows_entry(const TlArgs& a, int64_t n0, int64_t n1) {
  tl_for_tiles(a, n0, n1, [&](auto g, auto three, auto r, int64_t n, int64_t nrows) {
    tile<decltype(g)::value, decltype(three)::value, decltype(r)::value>(a, n, nrows);
  });
}

}  // namespace gsq_tlk_avx512vbmi

TlKernel gsq_tl_avx512vbmi = {gsq_tlk_avx512vbmi::V::W, &gsq_tlk_avx512vbmi::tl_build_entry, &gsq_tlk_avx512vbmi::rows_entry};

#pragma GCC pop_options
