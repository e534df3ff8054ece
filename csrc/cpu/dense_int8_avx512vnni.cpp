// Opt-in int8 dense layers (GSQ_CPU_DENSE=int8) for AVX-512 with VNNI: the same sums as
// dense_int8_avx2.cpp (weights int8 per output row, x int8 per block of 32, exact integer block
// sums scaled by the block's x scale, the row's weight scale last), two blocks per 64-byte vector.
//
// Why it exists: at one row of x (batch-1 decode) the AVX2 kernel stops short of the memory's speed
// on an AVX-512 machine: lm_head 49152 x 2048, one thread, 2-core AVX-512 EPYC (2026-12-07): 8.9 ms
// for its 100 MB (11 GB/s), no faster than bf16 gsq::cpu_dense with twice the bytes (dot_row below).
//
// Per 64 weights of one output row and one row of x: AVX-512 has no vpsignb, so x's sign comes
// from its sign bits as a mask (once per x vector) and a masked byte subtract negates w where x < 0;
// vpdpbusd multiplies |x| (u8, <= 127) by that (s8, |.| <= 127) and sums each four products into an
// int32 lane, exactly (no int16 step that could saturate). Lanes 0-7 hold block b, lanes 8-15
// block b + 1: one convert and one FMA with the two blocks' x scales per vector.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm_args.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on its own _mm512_undefined_* in the intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

namespace gsq_dense_int8_avx512vnni {

#include "kernel_common.h"

constexpr int kBlock = 32;
// Software prefetch distance, as in dense_int8_avx2.cpp: one line per 64 bytes read, 9 KiB ahead
// (here within noise of none).
constexpr int64_t kPrefetchBytes = 9216;

// x's part of one 64-byte step (blocks b and b + 1; only b when `last` is a lone final block):
// |x|, the mask of its negative bytes, and the two blocks' scales in lanes 0-7 and 8-15.
struct XStep {
  __m512i ax;
  __mmask64 neg;
  __m512 xs;
};

static inline XStep x_step(const DenseInt8Args& a, int64_t m, int64_t b, bool last) {
  const int64_t NB = a.Kp / kBlock;
  const int8_t* xp = a.xq + m * a.Kp + b * kBlock;
  const __m512i x = last ? _mm512_maskz_loadu_epi8(0xffffffffull, xp) : _mm512_loadu_si512(xp);
  const float lo = a.xa[m * NB + b], hi = last ? 0.f : a.xa[m * NB + b + 1];
  return {_mm512_abs_epi8(x), _mm512_movepi8_mask(x),
          _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1)};
}

// One output row x R rows of x. One row at a time, not dense_int8_avx2.cpp's tiles of 4 output
// rows that share each x vector: four interleaved row streams ran at half the speed of one here
// (lm_head 49152 x 2048, M = 1, one thread, 2-core AVX-512 EPYC, 2026-12-07: 8.8 ms against 5.0,
// where bf16 gsq::cpu_dense, one row at a time, took 9.9-10.1 for twice the bytes). x's part of a
// step is recomputed per output row: a few instructions per 64 weights, under the memory time.
template <int R>
static inline void dot_row(const DenseInt8Args& a, int64_t n, int64_t m0, float out[R]) {
  const int64_t NB = a.Kp / kBlock;
  const __m512i zero = _mm512_setzero_si512();
  const int8_t* wrow = a.wq + n * a.Kp;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; b += 2) {
    const bool last = b + 1 == NB;  // an odd count of blocks: the final one alone, upper half zero
    const int8_t* wp = wrow + b * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchBytes), _MM_HINT_T0);  // never faults
    const __m512i w = last ? _mm512_maskz_loadu_epi8(0xffffffffull, wp) : _mm512_loadu_si512(wp);
    for (int r = 0; r < R; ++r) {
      const XStep xs = x_step(a, m0 + r, b, last);
      const __m512i sw = _mm512_mask_sub_epi8(w, xs.neg, zero, w);  // w * sign(x); |x| = 0 zeroes the rest
      const __m512i quads = _mm512_dpbusd_epi32(zero, xs.ax, sw);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(quads), xs.xs, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) * a.ws[n];
}

static void rows_entry(const DenseInt8Args& a, int64_t n0, int64_t n1) {
  over_row_tiles<2>(a.M, [&](auto r, int64_t m0) {
    constexpr int R = decltype(r)::value;
    store_tile<R>(a, m0, n0, n1, [&](int64_t n, float* out) { dot_row<R>(a, n, m0, out); });
  });
}

}  // namespace gsq_dense_int8_avx512vnni

#pragma GCC pop_options

DenseInt8RowsFn gsq_dense_int8_rows_avx512vnni = &gsq_dense_int8_avx512vnni::rows_entry;
