// Every inline-PTX statement the GSQ kernels use, one wrapper per instruction.
//
// Kernels call only these functions for anything beyond plain C++ loads/stores
// and the cuda_fp16/cuda_bf16 intrinsics, so that the emulation build
// (GSQ_CUDA_EMU, see csrc/emu/) can swap this header for one that runs the
// same calls on CPU fibers. Section numbers refer to the PTX ISA 9.1 document
// ("Parallel Thread Execution ISA"); they move between versions, the titles
// do not.
#pragma once

#include <stdint.h>

#ifdef GSQ_CUDA_EMU
#include "emu/ptx_emu.h"
#else

namespace gsq::ptx {

// 9.7.14.5.14 "mma", fragments 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16
// with floating point type": d += a * b for a 16x16 (row) by 16x8 (col) tile,
// fp32 accumulators. a: 4 regs of 2 fp16, b: 2 regs, d: 4 floats.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Same instruction with bf16 inputs (.bf16 operands live in .b32 registers).
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The same two instructions with a zero accumulator (C = 0): d = a * b.
__device__ __forceinline__ void mma_m16n8k16_f16_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}
__device__ __forceinline__ void mma_m16n8k16_bf16_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}

// And with a separate accumulator input: d = a * b + c (c is not modified).
__device__ __forceinline__ void mma_m16n8k16_f16_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                    const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_bf16_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

// 9.7.9.9 "ld.global.nc": load through the non-coherent (read-only) cache;
// only for data no thread writes while the kernel runs (weights, scales,
// activations). Natural alignment of the access size.
__device__ __forceinline__ uint32_t ld_nc(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.global.nc.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_nc_v2(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_nc_v4(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// 9.7.9.8 "ld" with .cg (cache in L2, not L1): for data other blocks wrote
// during this kernel (split-K partial sums), which a stale L1 line must not hide.
__device__ __forceinline__ float4 ld_cg_v4(const float4* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p)
               : "memory");
  return v;
}

// 9.7.14.5.15 "ldmatrix": .x4 loads four 8x8 b16 matrices; lane 8m + r gives the
// address of row r of matrix m (16-byte aligned shared memory), register m of
// lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], const void* smem_row) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(s));
}

// 9.7.9.25.3.1 "cp.async": 16-byte global -> shared copy, .cg (L2 only). Only
// src_bytes (0 or 16) are read; the rest of the 16 destination bytes are
// zero-filled, so src_bytes == 0 writes zeros (rows past M). Both addresses
// 16-byte aligned. Lands at the cp_async_wait that retires its group.
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// 9.7.9.25.3.1 "cp.async", all 16 bytes read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

// 9.7.9.25.3.2 "cp.async.commit_group": close this thread's open group.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// 9.7.9.25.3.3 "cp.async.wait_group": wait until at most N of this thread's
// newest groups are pending. Other threads see the data only after a barrier.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 9.7.8.6 "lop3": any 3-input bitwise function; LUT = F(0xF0, 0xCC, 0xAA).
template <uint32_t LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
}

// 9.7.9.7 "prmt" (generic mode): byte i of the result is byte sel[4i+3:4i] of
// the 8-byte value {b, a} (a = bytes 0-3).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// No instruction: makes four registers' values unknown to the compiler, so it
// keeps them in registers instead of rebuilding them from constants.
__device__ __forceinline__ void opaque(uint32_t (&r)[4]) {
  asm volatile("" : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3]));
}

// Not PTX, but the other device facility the emulation replaces: the kernel's
// dynamic shared memory (size given at launch).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char gsq_dynamic_smem[];
  return gsq_dynamic_smem;
}

}  // namespace gsq::ptx

#endif  // GSQ_CUDA_EMU
