// The table build (and the tile walk) of the table-lookup decode kernels (tl_kernel.h states the tables and their
// rounding), over the vector traits V of the file that includes it: V::entries2 / entries4 write
// one 16-entry table, V::table_offset(o) says where stream byte o's two tables go (the layout is
// the kernel's: tl_kernel.h's for vpshufb, tl_avx512vbmi.cpp's for vpermb), V::kNib1 where the
// second (high nibble's) table is from the first.
#pragma once

#include <cstdint>

// Where the two tables (nibble 0, then nibble 1 at +16 L) of stream byte o start in a plane's
// tables: super-chunk o / W, then the step t = o % 16 (32 L bytes: the L lanes' tables per nibble),
// then the lane l = (o % W) / 16.
static inline int64_t tl_table_offset(int64_t o) { return V::table_offset(o); }

// Bytes of the lo plane's tables of a row of x with K columns: the hi plane's tables start there.
static inline int64_t tl_lo_table_bytes(int64_t K) { return (K / 4 + V::W - 1) / V::W * 32 * V::W; }

// Eight lanes' |x| (AVX: every table-lookup file's target has it).
static inline __m256 tl_abs8(const float* p) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_loadu_ps(p)); }
static inline float tl_hmax8(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline float tl_hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// A group's table steps' amax per plane and its sum (tl_kernel.h), float32: amax[0] = 3/2 times the
// largest |x_a| + |x_b| over its lo pairs, amax[1] (3-bit) the largest (|x_0| + |x_1|) + (|x_2| + |x_3|)
// over its quads of consecutive x (the same values lane by lane as one at a time: max is exact, and
// rounding 3/2 s is monotone in s).
template <int G, bool Three>
static inline void tl_group_stats(const float* xg, float amax[2], float& sum) {
  constexpr int Q = G / 4;  // a multiple of 8
  __m256 mlo = _mm256_setzero_ps(), mhi = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
  for (int j = 0; j < Q; j += 8)
    for (int p = 0; p < 4; p += 2)
      mlo = _mm256_max_ps(mlo, _mm256_add_ps(tl_abs8(xg + j + p * Q), tl_abs8(xg + j + (p + 1) * Q)));
  for (int k = 0; k < G; k += 8) {
    acc = _mm256_add_ps(acc, _mm256_loadu_ps(xg + k));
    if constexpr (Three) {
      const __m256 v = tl_abs8(xg + k);
      const __m256 pairs = _mm256_add_ps(v, _mm256_permute_ps(v, 0xB1));          // |x0| + |x1| in lanes 0, 1
      mhi = _mm256_max_ps(mhi, _mm256_add_ps(pairs, _mm256_permute_ps(pairs, 0x4E)));  // + (|x2| + |x3|)
    }
  }
  amax[0] = 1.5f * tl_hmax8(mlo);
  amax[1] = tl_hmax8(mhi);
  sum = tl_hsum8(acc);
}

template <int G, bool Three>
static void tl_build(const float* x, int64_t M, int64_t NG, int8_t* tables, float* ta, float* tc, int64_t rtb) {
  constexpr int Q = G / 4;
  const int64_t K = NG * G;
  const int64_t lo_bytes = tl_lo_table_bytes(K);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* tm = tables + m * rtb;
    for (int64_t g = 0; g < NG; ++g) {
      const float* xg = x + m * K + g * G;
      float amax[2], inv[2], sum;
      tl_group_stats<G, Three>(xg, amax, sum);
      for (int p = 0; p < 2; ++p) {
        inv[p] = amax[p] > 0.f ? 127.f / amax[p] : 0.f;
        ta[(m * 2 + p) * NG + g] = amax[p] / 127.f;
      }
      tc[m * NG + g] = -0.5f * sum * inv[0];  // the centring, in lo steps
      for (int j = 0; j < Q; ++j) {
        int8_t* d = tm + tl_table_offset(g * Q + j);
        V::entries2(xg[j], xg[j + Q], inv[0], d);
        V::entries2(xg[j + 2 * Q], xg[j + 3 * Q], inv[0], d + V::kNib1);
      }
      if constexpr (Three)
        for (int e = 0; e < Q / 2; ++e) {
          int8_t* d = tm + lo_bytes + tl_table_offset(g * (Q / 2) + e);
          V::entries4(xg + 8 * e, inv[1], d);
          V::entries4(xg + 8 * e + 4, inv[1], d + V::kNib1);
        }
    }
  }
}

static void tl_build_entry(const float* x, int64_t M, int64_t NG, int G, int bits, int8_t* tables, float* ta,
                           float* tc, int64_t rtb) {
  with_layout(G, bits, [&](auto g, auto three) {
    tl_build<decltype(g)::value, decltype(three)::value>(x, M, NG, tables, ta, tc, rtb);
  });
}

// Every 16-row tile of output rows [n0, n1), through `tile(G, Three, R, n, nrows)` with the group
// size, the bit width and R (the rows of x, 1..4) as compile-time constants: the walk both kernel
// families (tl_kernel.h, tl_avx512vbmi.cpp) share.
template <typename Tile>
static inline void tl_for_tiles(const TlArgs& a, int64_t n0, int64_t n1, Tile&& tile) {
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    auto run = [&](auto r) {
      for (int64_t n = n0; n < n1; n += 16) tile(g, three, r, n, n1 - n < 16 ? n1 - n : 16);
    };
    switch (a.M) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      default: run(std::integral_constant<int, 4>{}); break;
    }
  });
}

// The 16 rows of the tile at output row n0 (nrows of them real): each row's lo and hi plane bytes and
// the index of its first group scale. Rows past N repeat the last one (their sums are not stored).
template <int G, bool Three>
static inline void tl_tile_rows(const TlArgs& a, int64_t n0, int64_t nrows, const uint8_t* lo_rows[16],
                                const uint8_t* hi_rows[16], int32_t sidx[16]) {
  constexpr int Q = G / 4;
  for (int r = 0; r < 16; ++r) {
    const int64_t n = n0 + (r < nrows ? r : nrows - 1);
    lo_rows[r] = a.lo + n * a.NG * Q;
    hi_rows[r] = Three ? a.hi + n * a.NG * (Q / 2) : nullptr;
    sidx[r] = static_cast<int32_t>(n * a.NG);
  }
}
