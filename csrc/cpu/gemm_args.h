// What the dispatcher (gsq_cpu_gemm.cpp) hands a CPU GEMM kernel: plain data only, no member
// functions, so no inline code is shared between files compiled for different ISAs.
#pragma once

#include <cstdint>

struct GemmArgs {
  const float* xs;       // [M, K] float32: x with quarter i of every group scaled by 4^-i
  const float* xsum;     // [M, K/G, 16] float32: offset * sum of x over the group in lane 0, zeros
  const uint16_t* xp;    // bf16 x in the avx512bf16 kernel's block order (isa_avx512bf16.cpp)
  const uint32_t* xt;    // the same order as AMX B tiles (isa_amx.cpp): [M/16 tiles][K/32 steps][16 pairs][16 rows]
  const int8_t* xq;      // int8 x in the avx512vnni kernel's block order (isa_avx512vnni.cpp)
  const float* xa;       //   its scales a[m, g] per fp32 lane of a block: [M, blocks, 16]
  const int32_t* xc;     //   offset * sum of q over group g, in the group's first lane: [M, blocks, 16]
  const uint8_t* lo;     // [N, K/G, G/4] bits 0-1 of the offset codes (gsq_vllm/cpu_gemm.py)
  const uint8_t* hi;     // [N, K/G, G/8] bit 2 (3-bit), else unused
  const void* scales;    // [N, K/G] bfloat16 or float32 (scales_bf16)
  void* y;               // [M, N] bfloat16 or float32 (y_bf16)
  int64_t M, N, NG;
  int G, bits;
  bool scales_bf16, y_bf16;
};

// The signature every ISA's entry point has: output rows [n0, n1) for all M rows of x.
using GemmRowsFn = void (*)(const GemmArgs&, int64_t n0, int64_t n1);

// The AMX kernel's packing of bf16 x [M, K] into B tiles (xt above), in isa_amx.cpp.
using PackXFn = void (*)(const uint16_t* x, int64_t M, int64_t K, int64_t NG, int G, uint32_t* xt);

// The blocked path's dequantization of groups [g0, g1) of every row into a dense block:
// out[n, (g - g0) * G + k] = s[n, g] * (u - offset), float32 or bfloat16 (round to nearest even).
struct DequantArgs {
  const uint8_t* lo;
  const uint8_t* hi;
  const float* scales;  // [N, K/G] float32
  void* out;            // [N, (g1 - g0) * G]
  int64_t NG, g0, g1;
  int G, bits;
  bool out_bf16;
};

using DequantRowsFn = void (*)(const DequantArgs&, int64_t n0, int64_t n1);

// A dense bf16 weight (a layer the checkpoint keeps unquantized, or lm_head) on a CPU with no
// bf16 dot product: y[m, n] = sum_k x[m, k] * w[n, k], each bf16 weight widened to float32 in
// registers (gsq::cpu_dense in gsq_cpu_gemm.cpp).
struct DenseArgs {
  const float* x;      // [M, K] float32
  const uint16_t* w;   // [N, K] bfloat16
  void* y;             // [M, N] bfloat16 or float32 (y_bf16)
  int64_t M, N, K;
  bool y_bf16;
};

using DenseRowsFn = void (*)(const DenseArgs&, int64_t n0, int64_t n1);

// A dense layer served with int8 weights and int8 activations (GSQ_CPU_DENSE=int8, opt-in; in
// dense_int8_avx2.cpp and, for CPUs without AVX2, gsq_cpu_gemm.cpp):
// y[m, n] = ws[n] * sum_b xa[m, b] * sum_{k in block b} xq[m, k] * wq[n, k], blocks of 32.
struct DenseInt8Args {
  const int8_t* xq;    // [M, Kp] int8, round(x * 127 / max|x| of the block), 0 past K
  const float* xa;     // [M, Kp / 32] float32: max|x| / 127 per block
  const int8_t* wq;    // [N, Kp] int8 in [-127, 127], 0 past K
  const float* ws;     // [N] float32: the row's max|w| / 127
  void* y;             // [M, N] float32: the dispatcher adds a bias before its one rounding
  int64_t M, N, Kp;
  bool y_bf16;         // always false (kernel_common.h's store_y reads it)
};

using DenseInt8RowsFn = void (*)(const DenseInt8Args&, int64_t n0, int64_t n1);
