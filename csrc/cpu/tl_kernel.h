// Table-lookup (T-MAC-style) decode GEMM for GSQ 2/3-bit weights, M = 1..4 rows of x per call (the
// dispatcher runs more as passes of 4): no weight is ever dequantized. Written once over a
// vector-traits type V (tl_avx2.cpp: 32-byte vectors, tl_avx512.cpp: 64-byte), each file compiling
// it under its own target, as gemm_simd.h is.
//
// The planes are the ones repack_for_cpu writes (gsq_vllm/cpu_gemm.py; the checkpoint is unchanged):
// lo byte j of group g holds codes j, j+Q, j+2Q, j+3Q (Q = G/4) at bits 0-1, 2-3, 4-5, 6-7, so
// its low nibble is the 2-bit codes of the pair (j, j+Q) and its high nibble those of (j+2Q, j+3Q);
// hi (3-bit) byte e holds bit 2 of codes 8e..8e+7, low nibble codes 8e..8e+3, high nibble 8e+4..8e+7.
//
// Tables (built per row m of x and group g, tl_build): for every nibble of the planes a 16-entry
// int8 table of the partial sums that nibble can select, the 2-bit codes centred (l - 3/2):
//   lo nibble of pair (a, b), 2-bit codes l:   T[la + 4 lb] = x_a (la - 3/2) + x_b (lb - 3/2)
//   hi nibble of codes c..c+3, bit h:          T[h0 + 2 h1 + 4 h2 + 8 h3] = ((s0 x_c + s1 x_c+1) + s2 x_c+2) + s3 x_c+3,
//                                              s_i = 2 h_i - 1
// so that sum_k x_k (u_k - offset) = sum_lo T[nibble] + 2 sum_hi T[nibble] - 1/2 sum_k x_k, since a
// 2-bit code is u - 2 = (l - 3/2) - 1/2 and a 3-bit one u - 4 = (l - 3/2) + 2 (2h - 1) - 1/2 (ternary
// is stored as 2-bit); the centring term c = -1/2 sum_{k in g} x_k enters once per group.
// Rounding, per group and plane, in float32: the step is a = amax / 127, amax the largest |entry| the
// plane's tables can hold: lo 3/2 (|x_a| + |x_b|) over the group's pairs, hi (|x_0| + |x_1|) + (|x_2| +
// |x_3|) over its quads (centring the codes and fitting the step to the tables, not to 4 max|x|,
// makes it ~2.5x finer on an LLM's activations, whose groups are led by an outlier); an entry is
// q = round_half_even(e * (127 / amax)) in [-127, 127], e the float32 value of
// (x_a (la - 2) + x_b (lb - 2)) + (x_a + x_b) / 2 (lo) or of the signed sum above (hi): every product
// in them is exact, so with or without an FMA each sum is rounded once. c enters as c / a_lo steps
// (float32) added to the lo plane's integer sum before the scale. Each lookup is then off by at most
// a / 2 of its plane (plus the rounding of e), so per group |error| <= |s| (a_lo G/4 + a_hi G/4)
// (G/2 lo lookups, G/4 hi lookups counted twice; no hi term at 2 bits): tests/test_cpu_tl.py checks
// that bound against the float product and the exact result of this rounding.
//
// Kernel: output rows in tiles of 16. Per super-chunk of W stream bytes of a plane (W = vector
// bytes), the 16 rows' bytes are loaded and byte-transposed inside each 16-byte lane (4 unpack
// stages), so vector t holds byte 16l + t of every row in lane l, row r at byte r. The 16 bytes of
// a lane then share one table: one vpshufb per nibble looks up 16 rows at once (the index is the
// nibble, no unpacking of codes). The two results (low and high nibble) are interleaved and summed
// per row by vpmaddubsw (x1 for lo, x2 for hi) into int16 (at most 16 steps of |508| before each
// flush: no overflow); once per group the int16 sums are widened, converted, centred (lo plane)
// and scaled by s[n, g] * a[m, g] (one FMA per 16 rows): the group scale is applied once per group.
#pragma once

#include <cstdint>
#include <cstring>

#include "tl_args.h"

#include "tl_build.h"

// r[i] = row i's W bytes -> out[t] = byte 16 l + t of rows 0..15 in lane l (row r at byte r).
static inline void tl_transpose16(const typename V::B r[16], uint8_t (*out)[V::W]) {
  using B = typename V::B;
  B s1[16], s2[16], s3[16];
  for (int p = 0; p < 8; ++p) {  // rows 2p, 2p+1: s1[2p + h] holds bytes [8h, 8h + 8) as row pairs
    s1[2 * p] = V::unpacklo8(r[2 * p], r[2 * p + 1]);
    s1[2 * p + 1] = V::unpackhi8(r[2 * p], r[2 * p + 1]);
  }
  for (int q = 0; q < 4; ++q)  // rows 4q..4q+3: s2[4q + kk] holds bytes [4kk, 4kk + 4) as row quads
    for (int h = 0; h < 2; ++h) {
      s2[4 * q + 2 * h] = V::unpacklo16(s1[4 * q + h], s1[4 * q + 2 + h]);
      s2[4 * q + 2 * h + 1] = V::unpackhi16(s1[4 * q + h], s1[4 * q + 2 + h]);
    }
  for (int o = 0; o < 2; ++o)  // rows 8o..8o+7: s3[8o + k2] holds bytes 2 k2, 2 k2 + 1 as row octets
    for (int kk = 0; kk < 4; ++kk) {
      s3[8 * o + 2 * kk] = V::unpacklo32(s2[8 * o + kk], s2[8 * o + 4 + kk]);
      s3[8 * o + 2 * kk + 1] = V::unpackhi32(s2[8 * o + kk], s2[8 * o + 4 + kk]);
    }
  for (int k2 = 0; k2 < 8; ++k2) {
    V::store(out[2 * k2], V::unpacklo64(s3[k2], s3[8 + k2]));
    V::store(out[2 * k2 + 1], V::unpackhi64(s3[k2], s3[8 + k2]));
  }
}

// One plane (stream of P bytes per output row, Bg bytes per group, lookups weighted by Mult)
// of the tile's 16 rows into facc (R rows of x, 16 output rows each).
#ifndef TL_PREFETCH
#define TL_PREFETCH 1024
#endif
constexpr int kTlPrefetch = TL_PREFETCH;  // bytes ahead in each row's stream (prefetching past a row's end is harmless)

#ifndef TL_HINT
#define TL_HINT _MM_HINT_T1
#endif

template <int Bg, int Mult, int R>
static inline void tl_plane(const TlArgs& a, const uint8_t* const rows[16], int64_t P, const int8_t* tbase,
                            const int32_t sidx[16], const uint8_t* next, typename V::FR facc[R]) {
  using B = typename V::B;
  constexpr int W = V::W, L = V::L, F = Bg < 16 ? Bg : 16;  // steps between flushes: one group per lane
  constexpr int kPlane = Mult == 1 ? 0 : 1;                   // whose steps: the lo plane's or the hi plane's
  const B low4 = V::set1_8(0x0f), mult = V::set1_8(Mult);
  alignas(64) uint8_t tr[16][W];
  typename V::ScaleCache scales;
  const int64_t rtb = a.row_table_bytes;  // a local: a's fields are not reloaded per lookup
  // The next tile's 16 rows of this plane are one contiguous block of 16 P bytes: prefetched in
  // equal slices, one per super-chunk, so memory sees one linear stream instead of 16 interleaved
  // ones (prefetches never fault: the last tile's slices past the plane are harmless).
  const int64_t slice = (16 * P / ((P + W - 1) / W) + 63) / 64 * 64;
  for (int64_t off = 0; off < P; off += W) {
    const int64_t valid = P - off < W ? P - off : W;
    if (next != nullptr)
      for (int64_t b = 0; b < slice; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + (off / W) * slice + b), TL_HINT);
    B r[16];
    if (valid == W) {
      for (int i = 0; i < 16; ++i) r[i] = V::loadu(rows[i] + off);
    } else {  // the row's last bytes (K/4 or K/8 not a multiple of W; a multiple of 4): masked loads
      for (int i = 0; i < 16; ++i) r[i] = V::load_partial(rows[i] + off, static_cast<int>(valid));
    }
    tl_transpose16(r, tr);
    const int8_t* tm0[R];  // this super-chunk's tables of each row of x
    for (int m = 0; m < R; ++m) tm0[m] = tbase + m * rtb + (off / W) * 32 * W;
    for (int tw = 0; tw < 16 && tw < valid; tw += F) {
      B acc_a[R], acc_b[R];  // int16 sums per (lane, row): rows 0..7, rows 8..15
      for (int m = 0; m < R; ++m) acc_a[m] = acc_b[m] = V::zero();
      for (int t = tw; t < tw + F; ++t) {
        const B v = V::loadu(tr[t]);
        const B il = V::and_(v, low4), ih = V::and_(V::srli4(v), low4);
        for (int m = 0; m < R; ++m) {
          const int8_t* tm = tm0[m] + t * 32 * L;
          const B rl = V::shuffle(V::loadu(tm), il), rh = V::shuffle(V::loadu(tm + 16 * L), ih);
          acc_a[m] = V::add16(acc_a[m], V::maddubs(mult, V::unpacklo8(rl, rh)));
          acc_b[m] = V::add16(acc_b[m], V::maddubs(mult, V::unpackhi8(rl, rh)));
        }
      }
      for (int l = 0; l < L; ++l) {
        const int64_t o = off + 16 * l + tw;
        if (o >= P) break;
        const int64_t g = o / Bg;
        const typename V::FR s = scales.get(a, sidx, g);
        // The centring term once per group: with the lo plane's sums, at the group's first flush
        const bool centre = Mult == 1 && o % Bg == 0;
        for (int m = 0; m < R; ++m) {
          const typename V::FR q = V::lane_rows(acc_a[m], acc_b[m], l);
          facc[m] = V::fr_fma(centre ? V::fr_add1(q, a.tc[m * a.NG + g]) : q,
                              V::fr_mul(s, a.ta[(2 * m + kPlane) * a.NG + g]), facc[m]);
        }
      }
    }
  }
}

template <int G, bool Three, int R>
static void tl_tile(const TlArgs& a, int64_t n0, int64_t nrows) {
  constexpr int Q = G / 4;
  const int64_t K = a.NG * G;
  const uint8_t* lo_rows[16];
  const uint8_t* hi_rows[16];
  alignas(64) int32_t sidx[16];
  tl_tile_rows<G, Three>(a, n0, nrows, lo_rows, hi_rows, sidx);
  typename V::FR facc[R];
  for (int m = 0; m < R; ++m) facc[m] = V::fr_zero();
  const bool more = n0 + 16 < a.N;
  tl_plane<Q, 1, R>(a, lo_rows, K / 4, a.tables, sidx, more ? a.lo + (n0 + 16) * (K / 4) : nullptr, facc);
  if constexpr (Three) {
    const int64_t lo_bytes = tl_lo_table_bytes(K);
    tl_plane<Q / 2, 2, R>(a, hi_rows, K / 8, a.tables + lo_bytes, sidx,
                          more ? a.hi + (n0 + 16) * (K / 8) : nullptr, facc);
  }
  float* y = static_cast<float*>(a.y);
  for (int m = 0; m < R; ++m) {
    alignas(64) float out[16];
    V::fr_store(out, facc[m]);
    for (int64_t r = 0; r < nrows; ++r) y[m * a.N + n0 + r] = out[r];
  }
}

static void tl_rows_entry(const TlArgs& a, int64_t n0, int64_t n1) {
  tl_for_tiles(a, n0, n1, [&](auto g, auto three, auto r, int64_t n, int64_t nrows) {
    tl_tile<decltype(g)::value, decltype(three)::value, decltype(r)::value>(a, n, nrows);
  });
}

