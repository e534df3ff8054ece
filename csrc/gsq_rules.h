// The GSQ CUDA GEMM's shape rules, stated once: which weights [N, K] it takes and how it cuts K.
//
// Plain C++ (no CUDA, no torch), so every build that needs them includes this one file:
//   * csrc/gsq_gemm.cu (through gsq_gemm.h): the launch's argument check, and the chunk of K that
//     the plan sizes and the dispatch instantiates;
//   * csrc/gsq_binding.cpp: the op's checks, and gsq_vllm._C's shape_rules() / shape_ok() / chunk_k();
//   * csrc/cpu/gsq_cpu_gemm.cpp: gsq_vllm._C_cpu's cuda_shape_rules() / cuda_shape_ok() / cuda_chunk_k(),
//     so Python reads the same rules on machines without the CUDA extension (the repack into the
//     kernel layout, the emulator, the tests);
//   * the CPU emulator (csrc/emu/, through gsq_gemm.h).
// gsq_vllm/cuda_gemm.py reads them from whichever extension is built and states none itself.
#pragma once

namespace gsq::rules {

inline constexpr int kGroupSizes[] = {32, 64, 128};  // G
inline constexpr int kStorageBits[] = {2, 3};        // bits a code occupies (ternary is stored as 2)
inline constexpr int kNMultiple = 64;                // N: whole row blocks (4 tiles of 16 rows)
inline constexpr int kKMultiple = 64;                // K: whole chunks of the smaller size

template <int L>
constexpr bool one_of(const int (&set)[L], int v) {
  for (int x : set)
    if (x == v) return true;
  return false;
}

constexpr bool group_size_ok(int group_size) { return one_of(kGroupSizes, group_size); }
constexpr bool storage_bits_ok(int bits) { return one_of(kStorageBits, bits); }

// The chunk of K one item covers: 128 when it divides K, else 64. G = 32 always takes 64: at
// CK = 128 its four scale groups per item made ptxas spill the decode kernel's registers (sm_80).
constexpr int chunk_k(int k, int group_size) { return k % 128 == 0 && group_size != 32 ? 128 : 64; }

// Whether the kernel takes an [N, K] weight of `bits`-bit codes (storage width) in groups of
// `group_size`, for any number of rows of A.
constexpr bool shape_ok(int n, int k, int bits, int group_size) {
  return storage_bits_ok(bits) && group_size_ok(group_size) && n >= kNMultiple && n % kNMultiple == 0 &&
         k >= kKMultiple && k % kKMultiple == 0 && k % group_size == 0;
}

}  // namespace gsq::rules
