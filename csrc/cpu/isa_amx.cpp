// The GSQ GEMM on AMX tiles (Intel Sapphire Rapids and later: amx-tile + amx-bf16), for bf16
// activations. oneDNN runs vLLM's dense bf16 layers on these tiles, and from 8 rows of x on a
// vector dot product cannot keep up with them; this kernel feeds the same tiles from 2/3-bit codes.
//
// Roles: the weights are the A operand (16 output channels x 32 bf16), x the B operand (16 pairs
// of k x 16 tokens, the VNNI layout), C is 16 channels x 16 tokens in fp32; tdpbf16ps takes 16 x
// 16 x 32 multiply-adds.
//
// Per tile of 16 output channels, the whole K is dequantized once into a buffer of A tiles,
// block by block between the tile products of the first (up to 4) 16-token tiles of x; more
// tokens (prefill) are multiplied through the same buffer, so they reuse one dequantization.
// The k order inside a block of 128 codes is the avx512bf16 kernel's (quarter i, then group h,
// then byte j: code i*Q + j of group h), so one A-tile row is what one vpermw gives: the 32
// words of (row n, block b, quarter i). x is packed in that k order as B tiles (xt, gemm_args.h)
// by pack_x_entry below, which the dispatcher calls once per GEMM.
//
// The group scale cannot be applied to C afterwards (one A tile row spans the block's 32/Q
// groups), so it is folded into the lookup table: entry h*8 + u holds bf16((u - offset) * s[n, h]),
// and the index of word w is its code | (w's group << 3). A weight is therefore rounded to bf16
// once, as vLLM's dense bf16 layer holds it; with bf16 scales that is exact for 2-bit and
// ternary codes (|u - offset| <= 2), and for 3-bit only codes +-3 round. The products and the
// fp32 sums are the tiles'.
//
// Rows past N (the last channel tile) are zero in A and never stored. x rows past M are zero in B.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm_args.h"  // outside the namespace below: one GemmArgs type for every file

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma")
#include <immintrin.h>

namespace gsq_isa_amx {

#include "kernel_common.h"

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: A (0, 1) 16 x 32 bf16, B (2, 3) 16 pairs x 16 tokens, C (4..7)
// 16 x 16 fp32.
static void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

#include "hi_masks.h"  // the 3-bit planes' lane masks, as the avx512bf16 kernel reads them

// The scales of groups [i, i + groups) of the flat scale array in lanes 0.. of a vector, zero in
// the others (a missing group's weights are then zero): one masked vector load, no scalar stores
// for a vector load to wait on.
static inline __m512 block_scales(const GemmArgs& a, int64_t i, int64_t groups) {
  const __mmask8 k = static_cast<__mmask8>((1u << groups) - 1);
  if (a.scales_bf16) {
    const __m128i raw = _mm_maskz_loadu_epi16(k, static_cast<const uint16_t*>(a.scales) + i);
    return _mm512_castps128_ps512(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16)));
  }
  return _mm512_castps128_ps512(_mm_maskz_loadu_ps(k, static_cast<const float*>(a.scales) + i));
}

// Dequantizes block b (128 codes: 4 A tiles, one per quarter) of the 16 output rows n0.. into
// abuf: abuf[((b * 4 + i) * 16 + r) * 32 + w] = bf16 weight of row n0 + r at word w of quarter i.
template <int G, bool Three>
struct BlockDequant {
  static constexpr int Q = G / 4, V = 32 / Q;
  __m512 code_vals;  // entry e: (e & 7) - offset, for the groups in lanes 0-7 / 8-15
  __m512i gidx;      // word w: its group << 3, the table row it indexes
  __m512i three = _mm512_set1_epi16(3), four = _mm512_set1_epi16(4);
  __m512i lanes_lo = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512i lanes_hi = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);

  BlockDequant() {
    alignas(64) float vals[16];
    alignas(64) uint16_t g[32];
    for (int e = 0; e < 16; ++e) vals[e] = static_cast<float>((e & 7) - (Three ? 4 : 2));
    for (int w = 0; w < 32; ++w) g[w] = static_cast<uint16_t>((w / Q) << 3);
    code_vals = _mm512_load_ps(vals);
    gidx = _mm512_load_si512(g);
  }

  void operator()(const GemmArgs& a, int64_t n0, int64_t b, uint16_t* abuf) const {
    const int64_t g0 = b * V, groups = a.NG - g0 < V ? a.NG - g0 : V;
    uint16_t* out = abuf + b * 4 * 512;
    for (int r = 0; r < 16; ++r) {
      const int64_t n = n0 + r;
      if (n >= a.N) {  // past the last channel: zero rows, never stored
        for (int i = 0; i < 4; ++i) _mm512_store_si512(out + i * 512 + r * 32, _mm512_setzero_si512());
        continue;
      }
      const uint8_t* lo = a.lo + (n * a.NG + g0) * Q;
      const __m256i raw = groups == V
          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))
          : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << (groups * Q)) - 1), lo);
      const __m512i words = _mm512_cvtepu8_epi16(raw);
      uint32_t hm[4];
      if constexpr (Three) hi_masks<G>(a.hi + (n * a.NG + g0) * (G / 8), groups, hm);
      const __m512 s4 = block_scales(a, n * a.NG + g0, groups);
      // entries 0..15 (groups 0, 1) from the low half; 16..31 (groups 2, 3) only at G = 32
      const __m512 lo_half = _mm512_mul_ps(_mm512_permutexvar_ps(lanes_lo, s4), code_vals);
      const __m512 hi_half = V > 2 ? _mm512_mul_ps(_mm512_permutexvar_ps(lanes_hi, s4), code_vals) : lo_half;
      const __m512i lut = (__m512i)_mm512_cvtne2ps_pbh(hi_half, lo_half);
      for (int i = 0; i < 4; ++i) {
        // (code i of each byte) | group << 3: one ternary-logic op, (A & B) | C
        __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 2 * i), three, gidx, 0xEA);
        if constexpr (Three) idx = _mm512_mask_add_epi16(idx, static_cast<__mmask32>(hm[i]), idx, four);
        _mm512_store_si512(out + i * 512 + r * 32, _mm512_permutexvar_epi16(idx, lut));
      }
    }
  }
};

// Tiles: A 0 and 1 (alternate k steps), B 2 and 3, C 4..7. AMX tiles are not renamed, so a tile
// reloaded while the previous product still reads it must wait; alternating two A and two B
// tiles leaves the next loads free of the current product. The C tiles split the sums so that
// consecutive products never depend on each other: up to 16 tokens, C 4..7 hold k steps 0..3
// mod 4 of one token tile; up to 32, C 4/5 the even k steps of token tiles 0/1 and C 6/7 the odd
// ones; up to 64, C 4..7 token tiles 0..3. The split sums are added in write_y. (On this
// machine neither changed the timings measurably: dequantization, packing and the write-out
// of y were what cost; a one-chain tdpbf16ps loop ran as fast as four chains.) Tile numbers are
// immediates in the intrinsics (pasted into the instruction text), hence the spelled-out cases.
static inline void zero_c() {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}

// The 4 k steps of block b (its quarters, A tiles at abuf + (4b + i) * 512) against token tiles
// mt0 .. mt0 + T - 1 (B tiles at xt + ((mt * kt) + 4b + i) * 256).
template <int T>
static inline void block_products(const uint16_t* abuf, const uint32_t* xt, int64_t kt, int64_t mt0, int64_t b) {
  static_assert(T >= 1 && T <= 4, "token tiles per pass");
  const uint16_t* A = abuf + b * 4 * 512;
  const uint32_t* B = xt + (mt0 * kt + b * 4) * 256;
  const int64_t bt = kt * 256;  // next token tile
  if constexpr (T == 1) {
    _tile_loadd(0, A, 64);        _tile_loadd(2, B, 64);        _tile_dpbf16ps(4, 0, 2);
    _tile_loadd(1, A + 512, 64);  _tile_loadd(3, B + 256, 64);  _tile_dpbf16ps(5, 1, 3);
    _tile_loadd(0, A + 1024, 64); _tile_loadd(2, B + 512, 64);  _tile_dpbf16ps(6, 0, 2);
    _tile_loadd(1, A + 1536, 64); _tile_loadd(3, B + 768, 64);  _tile_dpbf16ps(7, 1, 3);
  } else if constexpr (T == 2) {
    for (int i = 0; i < 4; i += 2) {
      _tile_loadd(0, A + i * 512, 64);
      _tile_loadd(2, B + i * 256, 64);
      _tile_loadd(3, B + bt + i * 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_loadd(1, A + (i + 1) * 512, 64);
      _tile_loadd(2, B + (i + 1) * 256, 64);
      _tile_loadd(3, B + bt + (i + 1) * 256, 64);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  } else {
    for (int i = 0; i < 4; i += 2) {
      _tile_loadd(0, A + i * 512, 64);
      _tile_loadd(2, B + i * 256, 64);
      _tile_loadd(3, B + bt + i * 256, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      _tile_loadd(2, B + 2 * bt + i * 256, 64);
      _tile_dpbf16ps(6, 0, 2);
      if constexpr (T == 4) { _tile_loadd(3, B + 3 * bt + i * 256, 64); _tile_dpbf16ps(7, 0, 3); }
      _tile_loadd(1, A + (i + 1) * 512, 64);
      _tile_loadd(2, B + (i + 1) * 256, 64);
      _tile_loadd(3, B + bt + (i + 1) * 256, 64);
      _tile_dpbf16ps(4, 1, 2);
      _tile_dpbf16ps(5, 1, 3);
      _tile_loadd(2, B + 2 * bt + (i + 1) * 256, 64);
      _tile_dpbf16ps(6, 1, 2);
      if constexpr (T == 4) { _tile_loadd(3, B + 3 * bt + (i + 1) * 256, 64); _tile_dpbf16ps(7, 1, 3); }
    }
  }
}

// r[0..15] (16 x 16 floats, rows) -> its columns, in place: the usual four shuffle stages.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + k], 128-bit lane L: rows 4i..4i+3 of column 4L + k
    u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 x0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), x1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 y0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), y1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(x0, y0, 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
    r[4 + k] = _mm512_shuffle_f32x4(x1, y1, 0x88);
    r[12 + k] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
  }
}

// One 16 x 16 block of results, v[r] = channel nt + r over the 16 tokens of token tile mt, into
// y (tokens x channels): transposed, then each token's channels nt .. n1 go out as one store.
static void store_tokens(const GemmArgs& a, __m512 v[16], int64_t mt, int64_t nt, int64_t n1) {
  const int64_t rows = n1 - nt < 16 ? n1 - nt : 16;
  if (rows <= 0) return;
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  transpose16(v);
  for (int c = 0; c < 16; ++c) {
    const int64_t m = mt * 16 + c;
    if (m >= a.M) return;
    if (a.y_bf16)
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + m * a.N + nt, keep, (__m256i)_mm512_cvtneps_pbh(v[c]));
    else
      _mm512_mask_storeu_ps(static_cast<float*>(a.y) + m * a.N + nt, keep, v[c]);
  }
}

static inline void store_c(float* cbuf) {
  _tile_stored(4, cbuf, 64);
  _tile_stored(5, cbuf + 256, 64);
  _tile_stored(6, cbuf + 512, 64);
  _tile_stored(7, cbuf + 768, 64);
}

// y rows of token tiles mt0 .. mt0+T-1, output rows nt .. n1 (at most 16), from C 4..7, the
// split sums added first (see zero_c).
template <int T>
static void write_y(const GemmArgs& a, float* cbuf, int64_t mt0, int64_t nt, int64_t n1) {
  store_c(cbuf);
  for (int t = 0; t < T; ++t) {
    __m512 v[16];
    for (int r = 0; r < 16; ++r) {
      const float* c = cbuf + r * 16;
      if constexpr (T == 1)
        v[r] = _mm512_add_ps(_mm512_add_ps(_mm512_load_ps(c), _mm512_load_ps(c + 256)),
                             _mm512_add_ps(_mm512_load_ps(c + 512), _mm512_load_ps(c + 768)));
      else if constexpr (T == 2)
        v[r] = _mm512_add_ps(_mm512_load_ps(c + t * 256), _mm512_load_ps(c + (t + 2) * 256));
      else
        v[r] = _mm512_load_ps(c + t * 256);
    }
    store_tokens(a, v, mt0 + t, nt, n1);
  }
}

// Token tiles [mt0, mt0 + T) over all of K from the A tiles already in abuf: the extra passes
// of M > 64 when the thread has an odd channel tile left.
template <int T>
static void multiply_again(const GemmArgs& a, const uint16_t* abuf, int64_t NB, int64_t mt0, int64_t nt,
                           int64_t n1, float* cbuf) {
  zero_c();
  for (int64_t b = 0; b < NB; ++b) block_products<T>(abuf, a.xt, NB * 4, mt0, b);
  write_y<T>(a, cbuf, mt0, nt, n1);
}

// The extra passes of M > 64, two channel tiles (abuf0: nt, abuf1: nt + 16) by two token tiles
// (mt, mt + 1; the second only while inside M): C 4/5 = channel tile 0 x token tiles 0/1, C 6/7
// = channel tile 1. Every tile loaded feeds two products, so loads wait on products less than
// in a pass over one channel tile, where every B tile is loaded for one product.
static void multiply_pair(const GemmArgs& a, const uint16_t* abuf0, const uint16_t* abuf1, int64_t kt, int64_t mt,
                          int64_t nt, int64_t n1, float* cbuf) {
  const bool two = (mt + 1) * 16 < a.M;
  const uint32_t* B = a.xt + mt * kt * 256;
  const int64_t bt = kt * 256;
  zero_c();
  for (int64_t t = 0; t < kt; ++t) {
    _tile_loadd(0, abuf0 + t * 512, 64);
    _tile_loadd(2, B + t * 256, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_loadd(1, abuf1 + t * 512, 64);
    _tile_dpbf16ps(6, 1, 2);
    if (two) {
      _tile_loadd(3, B + bt + t * 256, 64);
      _tile_dpbf16ps(5, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  store_c(cbuf);
  for (int q = 0; q < (two ? 4 : 3); q += two ? 1 : 2) {  // (channel tile q / 2, token tile q % 2)
    __m512 v[16];
    for (int r = 0; r < 16; ++r) v[r] = _mm512_load_ps(cbuf + q * 256 + r * 16);
    store_tokens(a, v, mt + q % 2, nt + 16 * (q / 2), n1);
  }
}

// Output rows [n0, n1) for all rows of x; n0 is a multiple of 16 (the dispatcher splits by
// tiles). T0 = the token tiles of the first pass (min(tiles of M, 4)): that pass dequantizes
// block by block between the tile products, so the vector units and the tile unit work side by
// side. M > 64 needs further passes over the dequantized tiles: then channel tiles go in pairs
// and the further passes are 2 x 2 (multiply_pair).
template <int G, bool Three, int T0>
static void gemm_rows_tiles(const GemmArgs& a, int64_t n0, int64_t n1) {
  constexpr int V = 128 / G;
  const int64_t NB = (a.NG + V - 1) / V, MT = (a.M + 15) / 16, kt = NB * 4;
  const bool more = MT > T0;
  static thread_local std::vector<uint16_t> abuf_store;
  abuf_store.resize((more ? 2 : 1) * kt * 512 + 32);
  uint16_t* abuf0 = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(abuf_store.data()) + 63) & ~uintptr_t{63});
  uint16_t* abuf1 = abuf0 + kt * 512;
  alignas(64) float cbuf[4 * 256];
  const BlockDequant<G, Three> dequant;
  auto first_pass = [&](int64_t nt, uint16_t* abuf) {
    zero_c();
    // One block ahead: a tile load cannot take data still in the store buffer, so the tiles
    // multiplied are the ones written an iteration before.
    dequant(a, nt, 0, abuf);
    for (int64_t b = 0; b < NB; ++b) {
      if (b + 1 < NB) dequant(a, nt, b + 1, abuf);
      block_products<T0>(abuf, a.xt, kt, 0, b);
    }
    write_y<T0>(a, cbuf, 0, nt, n1);
  };
  configure_tiles();
  for (int64_t nt = n0; nt < n1; nt += more ? 32 : 16) {
    first_pass(nt, abuf0);
    if (!more) continue;
    if (nt + 16 < n1) {
      first_pass(nt + 16, abuf1);
      for (int64_t mt = T0; mt < MT; mt += 2) multiply_pair(a, abuf0, abuf1, kt, mt, nt, n1, cbuf);
      continue;
    }
    for (int64_t mt = T0; mt < MT; mt += 4) {
      switch (MT - mt < 4 ? MT - mt : 4) {
        case 1: multiply_again<1>(a, abuf0, NB, mt, nt, n1, cbuf); break;
        case 2: multiply_again<2>(a, abuf0, NB, mt, nt, n1, cbuf); break;
        case 3: multiply_again<3>(a, abuf0, NB, mt, nt, n1, cbuf); break;
        default: multiply_again<4>(a, abuf0, NB, mt, nt, n1, cbuf); break;
      }
    }
  }
  _tile_release();
}

static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  const int64_t MT = (a.M + 15) / 16;
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    constexpr int G = decltype(g)::value;
    constexpr bool Three = decltype(three)::value;
    switch (MT < 4 ? MT : 4) {
      case 1: gemm_rows_tiles<G, Three, 1>(a, n0, n1); break;
      case 2: gemm_rows_tiles<G, Three, 2>(a, n0, n1); break;
      case 3: gemm_rows_tiles<G, Three, 3>(a, n0, n1); break;
      default: gemm_rows_tiles<G, Three, 4>(a, n0, n1); break;
    }
  });
}

// x bf16 [M, K] -> xt (gemm_args.h): per (token tile mt, block b, quarter i) a B tile whose row
// p holds, for each of the 16 tokens, the pair of words 2p, 2p + 1 of the avx512bf16 order
// (word h*Q + j = x[m, (b*V + h)*G + i*Q + j]). Each token's 32 words come in as V masked
// loads (nothing is read past a missing group), then the 16 x 16 pairs are transposed in
// registers: the tile is one token per column. Zero past the last group and past row M.
static void pack_x_entry(const uint16_t* x, int64_t M, int64_t K, int64_t NG, int G, uint32_t* xt) {
  const int64_t Q = G / 4, V = 32 / Q, NB = (NG + V - 1) / V, MT = (M + 15) / 16;
  for (int64_t mt = 0; mt < MT; ++mt)
    for (int64_t b = 0; b < NB; ++b)
      for (int64_t i = 0; i < 4; ++i) {
        __m512 v[16];
        for (int c = 0; c < 16; ++c) {
          const int64_t m = mt * 16 + c;
          __m512i words = _mm512_setzero_si512();
          if (m < M)
            for (int64_t h = 0; h < V && b * V + h < NG; ++h) {
              const __mmask32 lanes = static_cast<__mmask32>(((1ull << Q) - 1) << (h * Q));
              // lane h*Q + j <- x[m, (b*V + h)*G + i*Q + j]: the pointer is offset back by h*Q
              words = _mm512_mask_loadu_epi16(words, lanes, x + m * K + (b * V + h) * G + i * Q - h * Q);
            }
          v[c] = _mm512_castsi512_ps(words);
        }
        transpose16(v);  // v[p] = pair p of the 16 tokens
        uint32_t* tile = xt + ((mt * NB + b) * 4 + i) * 256;
        for (int p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(tile + p * 16), v[p]);
      }
}

}  // namespace gsq_isa_amx

GemmRowsFn gsq_gemm_rows_amx = &gsq_isa_amx::gemm_rows_entry;
PackXFn gsq_pack_x_amx = &gsq_isa_amx::pack_x_entry;

#pragma GCC pop_options
