// The kernel layout of the weights (what gsq_vllm/cuda_gemm.py::repack
// writes; docs/FORMAT.md "Kernel layout") and how a lane turns its words into
// m16n8k16 A-operand registers holding the signed codes q exactly.
//
// Weights are the A operand (16 rows = output features n, 16 k) so that at
// decode one mma consumes 256 weights. A *tile* is 16 rows x CK k (CK = 128
// when K % 128 == 0 and G != 32, else 64); a *row block* is 4 tiles (64 rows); an *item*
// is one row block x one CK chunk: 4 tiles x 32 lanes x kWords words,
// contiguous, items in (row block, chunk) order.
//
// Inside a tile, lane l = 4g + t holds, for k step s (16 k) and fragment
// register r = 0..3, the code *pair* p = 4s + r:
//   r = 0: row g,     k = 16s + 2t + {0, 1}      r = 1: row g + 8, same k
//   r = 2: row g,     k = 16s + 2t + 8 + {0, 1}  r = 3: row g + 8, same k
// (the PTX ISA A fragment: a0a1, a2a3, a4a5, a6a7). The first code of a pair
// sits in the low 16 bits of a word, the second at the same position + 16.
//   2-bit: pair p in word p / 8, field i = p % 8 at bits 2i.
//   3-bit: pairs in runs of 16 (4 k steps) over 3 words w0..w2, five 3-bit
//          fields f at bits 3f of each word plus a spare pair in bit 15 (and
//          31) of w0, w1, w2 (code bits 0, 1, 2). The run's 8 even-r pairs
//          (rows g), in order (k step, r), take w0f0 w0f2 w0f4 w1f0 w1f2 w2f0
//          w2f2 spare; its 8 odd-r pairs (rows g + 8) take w0f1 w0f3 w1f1 w1f3
//          w1f4 w2f1 w2f3 w2f4.
// A lane's kWords words are stored as planes of 4, 2 and 1 words ([lane][4],
// then [lane][2], then [lane][1]) so every load is aligned and coalesced.
//
// Dequant: one shift serves two fields, one lop3 per pair masks the field in
// place and ORs in a magic number whose exponent puts the code at weight 1:
// a code at mantissa bit j (both halves) next to MAGIC_j = 2^(mantissa - j)
// reads as x = MAGIC_j + u. Pairs of rows g land at bit J0, pairs of rows
// g + 8 at J1 = J0 + BITS, chosen so MAGIC is small (16 and 4 at 2 bits, 64
// and 8 at 3 bits, in fp16 and bf16 alike). Then x - c with c = MAGIC + offset
// is the signed code q, and c depends only on the row half:
//   * decode subtracts it inside the tensor core: per k step one extra mma of
//     a constant A' (rows 0-7: -c(J0), rows 8-15: -c(J1)) with the same B gives
//     -c * sum(a), the accumulator every tile's partial sum starts from;
//   * prefill (many tokens per weight) subtracts it with one HSUB2 per pair.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "../ptx.cuh"

namespace gsq {

constexpr int kTileRows = 16;
constexpr int kTilesPerItem = 4;
constexpr int kRowBlock = kTileRows * kTilesPerItem;  // 64: N must be a multiple

template <int BITS, int CK>
struct Layout {
  static_assert(BITS == 2 || BITS == 3, "storage bits");
  static_assert(CK == 64 || CK == 128, "chunk of K");
  static constexpr int kSteps = CK / 16;                 // k steps per chunk
  static constexpr int kWords = CK * BITS / 64;          // words per lane per tile and chunk
  static constexpr int kPlane4 = kWords / 4 * 4;         // words in the 4-wide plane (0 or 4)
  static constexpr int kPlane2 = (kWords % 4) / 2 * 2;   // words in the 2-wide plane
  static constexpr int kPlane1 = kWords % 2;             // words in the 1-wide plane
  static constexpr int kTileWords = 32 * kWords;         // one tile, all lanes
  static constexpr int kItemWords = kTilesPerItem * kTileWords;
};

// Load this lane's kWords words of one tile (planes -> w[0..kWords)).
template <int BITS, int CK>
__device__ __forceinline__ void load_tile_words(uint32_t (&w)[Layout<BITS, CK>::kWords], const uint32_t* tile,
                                                int lane) {
  using L = Layout<BITS, CK>;
  if constexpr (L::kPlane4) {
    const uint4 v = ptx::ld_nc_v4(reinterpret_cast<const uint4*>(tile) + lane);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  }
  if constexpr (L::kPlane2) {
    const uint2 v = ptx::ld_nc_v2(reinterpret_cast<const uint2*>(tile + 32 * L::kPlane4) + lane);
    w[L::kPlane4] = v.x, w[L::kPlane4 + 1] = v.y;
  }
  if constexpr (L::kPlane1) w[L::kPlane4 + L::kPlane2] = ptx::ld_nc(tile + 32 * (L::kPlane4 + L::kPlane2) + lane);
}

template <typename T>
struct Fmt;
template <>
struct Fmt<__half> {
  using T2 = __half2;
  static constexpr int kMantissa = 10;
  static constexpr uint32_t magic(int j) { return (uint32_t)(15 + 10 - j) << 10; }  // 2^(10 - j)
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b);
  }
  __device__ static void mma_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16_c0(d, a, b);
  }
  __device__ static void mma_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    ptx::mma_m16n8k16_f16_cd(d, a, b, c);
  }
};
template <>
struct Fmt<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr int kMantissa = 7;
  static constexpr uint32_t magic(int j) { return (uint32_t)(127 + 7 - j) << 7; }  // 2^(7 - j)
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b);
  }
  __device__ static void mma_c0(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16_c0(d, a, b);
  }
  __device__ static void mma_cd(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    ptx::mma_m16n8k16_bf16_cd(d, a, b, c);
  }
};

// Bit positions the code pairs of rows g (J0) and rows g + 8 (J1) are
// masked at; MAGIC_J0 = 16 / 64 and MAGIC_J1 = 4 / 8 (2 / 3 bits).
template <typename T, int BITS>
struct Slots {
  static constexpr int kJ0 = BITS == 2 ? Fmt<T>::kMantissa - 4 : Fmt<T>::kMantissa - 6;
  static constexpr int kJ1 = kJ0 + BITS;
  // c = MAGIC_j + offset as a 16-bit pattern (exact: the offset sits below the magic's bit)
  static constexpr uint32_t c_bits(int j) { return Fmt<T>::magic(j) | ((1u << (BITS - 1)) << j); }
};

// Where pair P of a tile sits (csrc/gemm/layout.cuh, top): word, field start
// bit (-1: the 3-bit spare pair) and the bit J it is masked at.
template <typename T, int BITS, int P>
struct PairSlot {
  static constexpr bool kRowHi = (P % 4) % 2 == 1;  // r odd: rows g + 8
  static constexpr int kJ = kRowHi ? Slots<T, BITS>::kJ1 : Slots<T, BITS>::kJ0;
  static constexpr int kIndex = (P % 16) / 4 * 2 + (P % 4) / 2;  // among the run's pairs of this row half
  // 3-bit slot lists: {word, field}, field 5 = the spare pair
  static constexpr int kLo[8][2] = {{0, 0}, {0, 2}, {0, 4}, {1, 0}, {1, 2}, {2, 0}, {2, 2}, {0, 5}};
  static constexpr int kHi[8][2] = {{0, 1}, {0, 3}, {1, 1}, {1, 3}, {1, 4}, {2, 1}, {2, 3}, {2, 4}};
  static constexpr int kWord = BITS == 2 ? P / 8 : 3 * (P / 16) + (kRowHi ? kHi : kLo)[kIndex][0];
  static constexpr int kField = BITS == 2 ? P % 8 : (kRowHi ? kHi : kLo)[kIndex][1];
  static constexpr bool kSpare = BITS == 3 && kField == 5;
  static constexpr int kPos = BITS * kField;  // field start bit (not used for the spare pair)
};

template <int D>
__device__ __forceinline__ uint32_t shift_by(uint32_t x) {
  if constexpr (D > 0) return x << D;
  else if constexpr (D < 0) return x >> -D;
  else return x;
}

// x = MAGIC_J + u in both halves of a register (pair P of a lane's tile words).
template <typename T, int BITS, int P, int NW>
__device__ __forceinline__ uint32_t magic_pair(const uint32_t (&w)[NW]) {
  using PS = PairSlot<T, BITS, P>;
  constexpr uint32_t kMagic = Fmt<T>::magic(PS::kJ) | Fmt<T>::magic(PS::kJ) << 16;
  if constexpr (PS::kSpare) {  // bit 15 / 31 of the run's words w0, w1, w2 -> code bits 0, 1, 2 at J
    constexpr int j = PS::kJ, w0 = 3 * (P / 16);
    constexpr uint32_t m = 0x00010001u << j;
    uint32_t x = ptx::lop3<0xEA>(shift_by<j - 15>(w[w0]), m, kMagic);  // (a & b) | c
    x = ptx::lop3<0xEA>(shift_by<j + 1 - 15>(w[w0 + 1]), m << 1, x);
    return ptx::lop3<0xEA>(shift_by<j + 2 - 15>(w[w0 + 2]), m << 2, x);
  } else {
    constexpr uint32_t kMask = (((1u << BITS) - 1) << PS::kJ) * 0x00010001u;
    return ptx::lop3<0xEA>(shift_by<PS::kJ - PS::kPos>(w[PS::kWord]), kMask, kMagic);
  }
}

// The signed codes q of pair P: x - c with one HSUB2 (prefill).
template <typename T, int BITS, int P, int NW>
__device__ __forceinline__ uint32_t code_pair(const uint32_t (&w)[NW]) {
  using T2 = typename Fmt<T>::T2;
  const uint32_t x = magic_pair<T, BITS, P>(w);
  constexpr uint32_t kC = Slots<T, BITS>::c_bits(PairSlot<T, BITS, P>::kJ);
  uint32_t c = kC | kC << 16;
  T2 q = __hsub2(*reinterpret_cast<const T2*>(&x), *reinterpret_cast<const T2*>(&c));
  return *reinterpret_cast<uint32_t*>(&q);
}

// The constant A' of the decode correction mma: -c(J0) in rows 0-7 (registers
// 0, 2), -c(J1) in rows 8-15 (registers 1, 3).
// (Built once per kernel and kept in one register quad: the empty asm hides
// the values from the compiler, which would otherwise rebuild the quad from
// immediates before every correction mma.)
template <typename T, int BITS>
__device__ __forceinline__ void correction_fragment(uint32_t (&a)[4]) {
  constexpr uint32_t lo = 0x8000u | Slots<T, BITS>::c_bits(Slots<T, BITS>::kJ0);
  constexpr uint32_t hi = 0x8000u | Slots<T, BITS>::c_bits(Slots<T, BITS>::kJ1);
  a[0] = a[2] = lo | lo << 16;
  a[1] = a[3] = hi | hi << 16;
  ptx::opaque(a);
}

// acc += scale * p for the C fragments of MT token tiles: c0, c1 are row g
// (scale = low half of `scale_pair`), c2, c3 row g + 8 (high half).
template <typename T, int MT>
__device__ __forceinline__ void add_scaled(float (&acc)[MT][4], const float (&p)[MT][4], uint32_t scale_pair) {
  using F = Fmt<T>;
  const typename F::T2 s2 = *reinterpret_cast<const typename F::T2*>(&scale_pair);
  const float s_lo = F::to_float(s2.x), s_hi = F::to_float(s2.y);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    acc[mt][0] += s_lo * p[mt][0];
    acc[mt][1] += s_lo * p[mt][1];
    acc[mt][2] += s_hi * p[mt][2];
    acc[mt][3] += s_hi * p[mt][3];
  }
}

// f(std::integral_constant<int, 0>{}) ... f(std::integral_constant<int, N - 1>{}):
// a loop whose index is a constant expression in the body.
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// The four A registers of k step S: pairs 4S .. 4S + 3, as x (MAGIC + u,
// decode) or as the signed codes (prefill).
template <typename T, int BITS, int S, bool SIGNED, int NW>
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const uint32_t (&w)[NW]) {
  if constexpr (SIGNED) {
    a[0] = code_pair<T, BITS, 4 * S>(w), a[1] = code_pair<T, BITS, 4 * S + 1>(w);
    a[2] = code_pair<T, BITS, 4 * S + 2>(w), a[3] = code_pair<T, BITS, 4 * S + 3>(w);
  } else {
    a[0] = magic_pair<T, BITS, 4 * S>(w), a[1] = magic_pair<T, BITS, 4 * S + 1>(w);
    a[2] = magic_pair<T, BITS, 4 * S + 2>(w), a[3] = magic_pair<T, BITS, 4 * S + 3>(w);
  }
}

}  // namespace gsq
