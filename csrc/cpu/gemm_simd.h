// The SIMD GEMM for GSQ 2/3-bit weights, written once over a small vector-traits type V.
//
// Included by isa_avx2.cpp and isa_avx512.cpp, each inside its own namespace and under its own
// `#pragma GCC target`, so the same source becomes one AVX2+FMA and one AVX-512 kernel in the
// same library and the dispatcher (gsq_cpu_gemm.cpp) picks one at load from cpuid. Nothing here
// includes a torch header: an inline torch function compiled for AVX-512 here could otherwise be
// the copy the linker keeps for the whole library.
//
// Per output row n and group g (module doc of gsq_vllm/cpu_gemm.py for the planes):
//   y[m, n] = sum_g s[n, g] * ( sum_k xs[m, k] * (u_k << 2i) - offset * sum_k x[m, k] )
// where code k = i*Q + j sits in bits 2i..2i+1 of lo byte j (Q = G/4). Masking the byte with
// 3 << 2i instead of shifting it down saves one instruction per vector; the dispatcher hands us
// xs = x * 4^-i on quarter i, so the product is exact and the sum is the same dot product.
// Bit 2 of a 3-bit code (the hi plane, bit k of the group's plane = code k) is OR-ed in at
// bit 2i + 2 before the one int->float conversion. The offset is taken out once per group with
// the activations' group sums (one vector subtraction per group and row) instead of per weight.
//
// Rows of x are processed R at a time (R accumulators per output row in registers), so each
// group's codes are unpacked once for R rows.
#pragma once

#include <cstdint>
#include <cstring>

#include "gemm_args.h"

static inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does (NaN kept NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float load_scale(const GemmArgs& a, int64_t i) {
  return a.scales_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.scales)[i])
                       : static_cast<const float*>(a.scales)[i];
}

static inline void store_y(const GemmArgs& a, int64_t m, int64_t n, float v) {
  if (a.y_bf16)
    static_cast<uint16_t*>(a.y)[m * a.N + n] = float_to_bf16(v);
  else
    static_cast<float*>(a.y)[m * a.N + n] = v;
}

template <int G, bool Three, int R>
static inline void dot_rows(const GemmArgs& a, int64_t n, int64_t m0, float out[R]) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int L = V::kLanes;
  constexpr int Q = G / 4;
  static_assert(Q % L == 0, "a quarter group must hold whole vectors");
  const int64_t K = a.NG * G;
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::zero();
  const uint8_t* lo_row = a.lo + n * a.NG * Q;
  const uint8_t* hi_row = Three ? a.hi + n * a.NG * (G / 8) : nullptr;
  for (int64_t g = 0; g < a.NG; ++g) {
    F part[R];
    for (int r = 0; r < R; ++r) part[r] = V::zero();
    const uint8_t* lo = lo_row + g * Q;
    for (int j0 = 0; j0 < Q; j0 += L) {
      const I bytes = V::load_u8(lo + j0);  // L bytes, zero-extended to int32 lanes
      for (int i = 0; i < 4; ++i) {
        I u = V::and_mask(bytes, 3 << (2 * i));
        if constexpr (Three) u = V::or_hi_bits(u, hi_row + g * (G / 8), i * Q + j0, 2 * i + 2);
        const F w = V::to_float(u);
        const int64_t k = g * G + i * Q + j0;
        for (int r = 0; r < R; ++r) part[r] = V::fma(w, V::load(a.xs + (m0 + r) * K + k), part[r]);
      }
    }
    const F s = V::set1(load_scale(a, n * a.NG + g));
    // The code offset: xsum holds offset * sum_k x[m, k] of the group in its first lane.
    for (int r = 0; r < R; ++r)
      acc[r] = V::fma(s, V::sub(part[r], V::load(a.xsum + ((m0 + r) * a.NG + g) * 16)), acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = V::hsum(acc[r]);
}

template <int G, bool Three, int R>
static inline void tile_rows(const GemmArgs& a, int64_t m0, int64_t n0, int64_t n1) {
  float out[R];
  for (int64_t n = n0; n < n1; ++n) {
    dot_rows<G, Three, R>(a, n, m0, out);
    for (int r = 0; r < R; ++r) store_y(a, m0 + r, n, out[r]);
  }
}

// All rows of x against output rows [n0, n1): full tiles of kMaxTile rows, then one tail tile.
template <int G, bool Three>
static void gemm_rows(const GemmArgs& a, int64_t n0, int64_t n1) {
  constexpr int T = V::kMaxTile;
  int64_t m0 = 0;
  for (; m0 + T <= a.M; m0 += T) tile_rows<G, Three, T>(a, m0, n0, n1);
  switch (a.M - m0) {
    case 0: break;
#define GSQ_TAIL(r) case r: if constexpr (r < T) tile_rows<G, Three, (r < T ? r : 1)>(a, m0, n0, n1); break;
    GSQ_TAIL(1) GSQ_TAIL(2) GSQ_TAIL(3) GSQ_TAIL(4) GSQ_TAIL(5) GSQ_TAIL(6) GSQ_TAIL(7)
#undef GSQ_TAIL
  }
}

// The entry point each ISA file exports (as isa_name::gemm_rows_entry).
static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  const bool three = a.bits == 3;
  if (a.G == 64) {
    three ? gemm_rows<64, true>(a, n0, n1) : gemm_rows<64, false>(a, n0, n1);
  } else if (a.G == 128) {
    three ? gemm_rows<128, true>(a, n0, n1) : gemm_rows<128, false>(a, n0, n1);
  } else if constexpr (V::kLanes <= 8) {  // G = 32: a quarter group is 8 codes
    three ? gemm_rows<32, true>(a, n0, n1) : gemm_rows<32, false>(a, n0, n1);
  }
}

// Dequantization (the many-rows path): the same unpacking, each vector of codes turned into
// s * (u - offset) with one FMA: u << 2i times s * 4^-i minus s * offset, exact in float32 (a bf16
// scale times a 3-bit integer), then stored as float32 or rounded once to bf16.
template <int G, bool Three>
static void dequant_rows(const DequantArgs& d, int64_t n0, int64_t n1) {
  using F = typename V::F;
  constexpr int L = V::kLanes, Q = G / 4;
  const float offset = Three ? 4.f : 2.f;
  const int64_t width = (d.g1 - d.g0) * G;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = d.g0; g < d.g1; ++g) {
      const uint8_t* lo = d.lo + (n * d.NG + g) * Q;
      const uint8_t* hi = Three ? d.hi + (n * d.NG + g) * (G / 8) : nullptr;
      const float s = d.scales[n * d.NG + g];
      const F minus = V::set1(-s * offset);
      const int64_t o = n * width + (g - d.g0) * G;
      for (int j0 = 0; j0 < Q; j0 += L) {
        const auto bytes = V::load_u8(lo + j0);
        for (int i = 0; i < 4; ++i) {
          auto u = V::and_mask(bytes, 3 << (2 * i));
          if constexpr (Three) u = V::or_hi_bits(u, hi, i * Q + j0, 2 * i + 2);
          const F w = V::fma(V::to_float(u), V::set1(s / static_cast<float>(1 << (2 * i))), minus);
          if (d.out_bf16)
            V::store_bf16(static_cast<uint16_t*>(d.out) + o + i * Q + j0, w);
          else
            V::store(static_cast<float*>(d.out) + o + i * Q + j0, w);
        }
      }
    }
}

static void dequant_rows_entry(const DequantArgs& d, int64_t n0, int64_t n1) {
  const bool three = d.bits == 3;
  if (d.G == 64) {
    three ? dequant_rows<64, true>(d, n0, n1) : dequant_rows<64, false>(d, n0, n1);
  } else if (d.G == 128) {
    three ? dequant_rows<128, true>(d, n0, n1) : dequant_rows<128, false>(d, n0, n1);
  } else if constexpr (V::kLanes <= 8) {
    three ? dequant_rows<32, true>(d, n0, n1) : dequant_rows<32, false>(d, n0, n1);
  }
}
