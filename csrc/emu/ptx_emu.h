// The emulation build's csrc/ptx.cuh: the same gsq::ptx functions, run by the
// fiber runtime (csrc/emu/runtime.cpp). Warp-collective instructions (mma,
// ldmatrix) hand this lane's registers to the runtime, which waits for all
// 32 lanes of the warp and computes the result from the PTX ISA fragment
// layouts. cp.async poisons its destination at issue and lands only at the
// cp_async_wait that retires its group. Each call records its call site.
#pragma once

#include <stdint.h>

namespace gsq_emu {
enum class MmaType { kF16, kBf16 };
// d = a * b + c; c == nullptr: C = 0 (c may be d: accumulate in place)
void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c, Loc loc);
// A global load: checked against the registered buffers (read-only ones for .nc).
void check_global_read(const void* p, size_t bytes, bool nc, Loc loc);
// ld.global: checked, and from memory the kernel writes, checked for memory order (the bytes
// must have been stored before the launch, by this thread, or by a store ordered before it).
void global_load(void* dst, const void* p, size_t bytes, Loc loc);
void ldmatrix(int num, bool trans, uint32_t* d, const void* smem_row, Loc loc);
void cp_async(void* smem, const void* gmem, int cp_size, int src_bytes, Loc loc);
void cp_async_commit(Loc loc);
void cp_async_wait(int pending, Loc loc);
unsigned char* dynamic_smem();
}  // namespace gsq_emu

namespace gsq::ptx {

using gsq_emu::Loc;

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kF16, d, a, b, d, loc);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kBf16, d, a, b, d, loc);
}
inline void mma_m16n8k16_f16_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kF16, d, a, b, nullptr, loc);
}
inline void mma_m16n8k16_bf16_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kBf16, d, a, b, nullptr, loc);
}
inline void mma_m16n8k16_f16_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                                Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kF16, d, a, b, c, loc);
}
inline void mma_m16n8k16_bf16_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                                 Loc loc = Loc::here()) {
  gsq_emu::mma_m16n8k16(gsq_emu::MmaType::kBf16, d, a, b, c, loc);
}
inline uint32_t ld_nc(const uint32_t* p, Loc loc = Loc::here()) {
  gsq_emu::check_global_read(p, 4, true, loc);
  return *p;
}
inline uint2 ld_nc_v2(const uint2* p, Loc loc = Loc::here()) {
  gsq_emu::check_global_read(p, 8, true, loc);
  return *p;
}
inline uint4 ld_nc_v4(const uint4* p, Loc loc = Loc::here()) {
  gsq_emu::check_global_read(p, 16, true, loc);
  return *p;
}
inline float4 ld_cg_v4(const float4* p, Loc loc = Loc::here()) {
  float4 v;
  gsq_emu::global_load(&v, p, 16, loc);
  return v;
}
inline void ldmatrix_x4(uint32_t (&d)[4], const void* smem_row, Loc loc = Loc::here()) {
  gsq_emu::ldmatrix(4, false, d, smem_row, loc);
}
inline void cp_async16_zfill(void* smem, const void* gmem, int src_bytes, Loc loc = Loc::here()) {
  gsq_emu::cp_async(smem, gmem, 16, src_bytes, loc);
}
inline void cp_async16(void* smem, const void* gmem, Loc loc = Loc::here()) {
  gsq_emu::cp_async(smem, gmem, 16, 16, loc);
}
inline void cp_async_commit(Loc loc = Loc::here()) { gsq_emu::cp_async_commit(loc); }
template <int N>
inline void cp_async_wait(Loc loc = Loc::here()) {
  gsq_emu::cp_async_wait(N, loc);
}

// 9.7.8.6 "lop3": bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of LUT.
template <uint32_t LUT>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(LUT <= 0xFF, "lop3 takes an 8-bit truth table");
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const uint32_t idx = ((a >> i) & 1u) << 2 | ((b >> i) & 1u) << 1 | ((c >> i) & 1u);
    d |= ((LUT >> idx) & 1u) << i;
  }
  return d;
}

// 9.7.9.7 "prmt", generic mode: selector nibble i picks byte (nibble & 7) of
// {b, a}; nibble bit 3 replicates that byte's sign bit instead.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (sel >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (nib & 7u))) & 0xFFu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xFFu : 0x00u;
    d |= byte << (8 * i);
  }
  return d;
}

inline void opaque(uint32_t (&)[4]) {}

inline unsigned char* dynamic_smem() { return gsq_emu::dynamic_smem(); }

}  // namespace gsq::ptx
