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
//
// With few rows of x one output row's work is a short chain of dependent FMAs, which leaves the
// core waiting on FMA latency. So a tile is T output rows x R rows of x (each x vector loaded
// once for T rows), and each sum is split over C independent partial sums (quarters i with
// i % C == c), with T * R * C <= V::kAccRegs accumulators in registers. On a 2-core AVX2 EPYC VM
// this took the dense kernel below from 153 to 117 us on qkv at M = 1; the GSQ kernel stayed
// within noise there (~5 weights per ns per core), bound by its unpacking (README, "AVX2 only").
#pragma once

#include <cstdint>
#include <cstring>

#include "gemm_args.h"
#include "kernel_common.h"

// Partial sums per (output row, x row); out_rows (output rows per tile) is in kernel_common.h.
template <int Acc>
constexpr int chains() {
  constexpr int c = V::kAccRegs / Acc;
  return c >= 4 ? 4 : c >= 2 ? 2 : 1;
}

template <int G, bool Three, int R, int T>
static inline void dot_rows(const GemmArgs& a, int64_t n, int64_t m0, float out[T][R]) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int L = V::kLanes;
  constexpr int Q = G / 4;
  constexpr int C = chains<T * R>();
  static_assert(Q % L == 0, "a quarter group must hold whole vectors");
  const int64_t K = a.NG * G;
  F acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = V::zero();
  for (int64_t g = 0; g < a.NG; ++g) {
    F part[T][C][R];
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < C; ++c)
        for (int r = 0; r < R; ++r) part[t][c][r] = V::zero();
    for (int j0 = 0; j0 < Q; j0 += L) {
      I bytes[T];
      for (int t = 0; t < T; ++t) bytes[t] = V::load_u8(a.lo + ((n + t) * a.NG + g) * Q + j0);  // L bytes -> int32 lanes
      for (int i = 0; i < 4; ++i) {
        const int64_t k = g * G + i * Q + j0;
        F x[R];
        for (int r = 0; r < R; ++r) x[r] = V::load(a.xs + (m0 + r) * K + k);
        for (int t = 0; t < T; ++t) {
          I u = V::and_mask(bytes[t], 3 << (2 * i));
          if constexpr (Three) u = V::or_hi_bits(u, a.hi + ((n + t) * a.NG + g) * (G / 8), i * Q + j0, 2 * i + 2);
          const F w = V::to_float(u);
          for (int r = 0; r < R; ++r) part[t][i % C][r] = V::fma(w, x[r], part[t][i % C][r]);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      for (int c = 1; c < C; ++c)
        for (int r = 0; r < R; ++r) part[t][0][r] = V::add(part[t][0][r], part[t][c][r]);
      const F s = V::set1(load_scale(a, (n + t) * a.NG + g));
      // The code offset: xsum holds offset * sum_k x[m, k] of the group in its first lane.
      for (int r = 0; r < R; ++r)
        acc[t][r] = V::fma(s, V::sub(part[t][0][r], V::load(a.xsum + ((m0 + r) * a.NG + g) * 16)), acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t][r] = V::hsum(acc[t][r]);
}

// The entry point each ISA file exports (as isa_name::gemm_rows_entry): all rows of x against
// output rows [n0, n1), T output rows at a time, then one at a time. A quarter group must hold
// whole vectors (AVX-512 sends G = 32 to AVX2).
static void gemm_rows_entry(const GemmArgs& a, int64_t n0, int64_t n1) {
  with_layout(a.G, a.bits, [&](auto g, auto three) {
    constexpr int G = decltype(g)::value;
    constexpr bool Three = decltype(three)::value;
    if constexpr ((G / 4) % V::kLanes == 0)
      over_row_tiles<V::kMaxTile>(a.M, [&](auto r, int64_t m0) {
        constexpr int R = decltype(r)::value;
        store_out_tiles<R, out_rows<R>()>(a, m0, n0, n1, [&](auto t, int64_t n, float(*out)[R]) {
          dot_rows<G, Three, R, decltype(t)::value>(a, n, m0, out);
        });
      });
  });
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
  with_layout(d.G, d.bits, [&](auto g, auto three) {
    if constexpr ((decltype(g)::value / 4) % V::kLanes == 0)
      dequant_rows<decltype(g)::value, decltype(three)::value>(d, n0, n1);
  });
}

// Dense bf16 weights (DenseArgs): the same tile walk, each 8/16 bf16 weights widened to float32
// once (a zero-extend and a 16-bit shift) for R rows of x. K need not be a multiple of the lanes.
template <int R>
static inline void dense_dot_rows(const DenseArgs& a, int64_t n, int64_t m0, float out[R]) {
  using F = typename V::F;
  constexpr int L = V::kLanes;
  const int64_t K = a.K, Kv = K / L * L;
  constexpr int C = chains<R>();
  const uint16_t* w = a.w + n * K;
  F acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = V::zero();
  int64_t k = 0;
  for (; k + C * L <= Kv; k += C * L)
    for (int c = 0; c < C; ++c) {
      const F wv = V::load_bf16(w + k + c * L);
      for (int r = 0; r < R; ++r) acc[c][r] = V::fma(wv, V::load(a.x + (m0 + r) * K + k + c * L), acc[c][r]);
    }
  for (; k < Kv; k += L) {
    const F wv = V::load_bf16(w + k);
    for (int r = 0; r < R; ++r) acc[0][r] = V::fma(wv, V::load(a.x + (m0 + r) * K + k), acc[0][r]);
  }
  for (int c = 1; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[0][r] = V::add(acc[0][r], acc[c][r]);
  for (int r = 0; r < R; ++r) {
    out[r] = V::hsum(acc[0][r]);
    for (int64_t k = Kv; k < K; ++k) out[r] += a.x[(m0 + r) * K + k] * bf16_to_float(w[k]);
  }
}

static void dense_rows_entry(const DenseArgs& a, int64_t n0, int64_t n1) {
  over_row_tiles<V::kMaxTile>(a.M, [&](auto r, int64_t m0) {
    constexpr int R = decltype(r)::value;
    store_tile<R>(a, m0, n0, n1, [&](int64_t n, float* out) { dense_dot_rows<R>(a, n, m0, out); });
  });
}
