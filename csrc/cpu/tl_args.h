// What the dispatcher (gsq_cpu_gemm.cpp) hands the table-lookup (T-MAC-style) decode kernels
// (tl_kernel.h, compiled per ISA in tl_avx2.cpp and tl_avx512.cpp): plain data only, like gemm_args.h.
#pragma once

#include <cstdint>

struct TlArgs {
  const int8_t* tables;  // [M][row_table_bytes]: the int8 lookup tables of each row of x (tl_kernel.h)
  const float* ta;       // [M, 2, K/G] float32: the steps a[m, p, g] of plane p's table entries (p = 0 lo, 1 hi)
  const float* tc;       // [M, K/G] float32: the centring term of group g in lo steps (tl_kernel.h)
  const uint8_t* lo;     // [N, K/G, G/4] bits 0-1 of the offset codes, as repack_for_cpu writes them
  const uint8_t* hi;     // [N, K/G, G/8] bit 2 (3-bit), else unused
  const void* scales;    // [N, K/G] bfloat16 or float32 (scales_bf16)
  void* y;               // [M, N] float32 (the dispatcher rounds to bf16 once, if asked)
  int64_t M, N, NG, row_table_bytes;
  int G, bits;
  bool scales_bf16;
};

// The tables' coefficients (tl_kernel.h): entry idx of a 2-bit pair is kTlCoefA[idx] x_a +
// kTlCoefB[idx] x_b, plus (x_a + x_b) / 2 (the centring of the codes); of four hi bits
// sum_i kTlSign[i][idx] x_i, summed in order i = 0..3.
alignas(64) static const float kTlCoefA[16] = {-2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1};
alignas(64) static const float kTlCoefB[16] = {-2, -2, -2, -2, -1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1};
alignas(64) static const float kTlSign[4][16] = {
    {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
    {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
    {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
    {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1}};

// Tables of every row of x (float32 [M, K]) into tables / ta / tc; then output rows [n0, n1).
using TlBuildFn = void (*)(const float* x, int64_t M, int64_t NG, int G, int bits, int8_t* tables, float* ta,
                           float* tc, int64_t row_table_bytes);
using TlRowsFn = void (*)(const TlArgs&, int64_t n0, int64_t n1);

struct TlKernel {
  int width;        // bytes of one vector (32: AVX2, 64: AVX-512): the tables' layout depends on it
  TlBuildFn build;
  TlRowsFn rows;
};

// Bytes of one row of x's tables for a K-column weight: the lo plane's stream (K/4 bytes per output
// row) and, at 3 bits, the hi plane's (K/8), each in whole super-chunks of `width` stream bytes,
// 32 table bytes per stream byte (two 16-entry tables, one per nibble).
inline int64_t tl_row_table_bytes(int64_t K, int bits, int width) {
  auto part = [&](int64_t stream) { return (stream + width - 1) / width * 32 * width; };
  return part(K / 4) + (bits == 3 ? part(K / 8) : 0);
}
