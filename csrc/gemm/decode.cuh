// Decode kernel (M <= 16): C[M, N] = A[M, K] @ (q * s)^T, weights as the A
// operand of m16n8k16 (256 weights per mma), tokens as its n8 columns.
//
// Work split: the (row block, chunk) items of the layer (csrc/gemm/layout.cuh)
// are cut into `warps_total` contiguous, balanced ranges, one per warp
// (stream-K over warps: every warp streams its own weights; there is no
// shared memory and no __syncthreads). A warp walks its range one item at a
// time, row block by row block (a *segment*), loading the next item's
// weights and scales (the HBM stream) into registers while it computes the
// current one; the current item's activations (a few hundred bytes, L2
// hits) are loaded at its start. Per group, one correction mma per k step
// (csrc/gemm/layout.cuh) gives the accumulator every tile's fp32 partial sum
// of q * a starts from; the partial sums are added times the group scale. A segment that covers a whole row block stores C directly;
// a partial one goes through csrc/gemm/reduce.cuh.
//
// Lanes whose token (g, or 8 + g) is >= M read token M - 1 instead: their
// columns of the result are never stored, so the hot loop has no bounds
// logic. The loop body has no runtime division and no branch but its own.
#pragma once

#include "layout.cuh"
#include "reduce.cuh"

namespace gsq {

constexpr int kDecodeWarps = 4;  // per block; warps are independent
constexpr int kDecodeThreads = 32 * kDecodeWarps;

// Blocks per SM the register budget is set for: 4 (16 warps, 128 registers)
// where the item fits, fewer where two token tiles or two scale groups per
// chunk need more registers than that (no spills anywhere).
template <int CK, int G, int MT>
constexpr int decode_min_blocks() {
  return MT == 2 ? 2 : (CK / G == 2 ? 3 : 4);
}

template <typename T, int BITS, int CK, int G, int MT>
struct DecodeItem {
  using L = Layout<BITS, CK>;
  uint32_t w[kTilesPerItem][L::kWords];  // this lane's codes of the 4 tiles
  uint4 s[CK / G];                       // scales: (row g, row g + 8) of the 4 tiles, per group
};

template <typename T, int BITS, int CK, int G, int MT>
__device__ __forceinline__ void load_item(DecodeItem<T, BITS, CK, G, MT>& it, const uint32_t* w_item,
                                          const T* s_item, int lane) {
  using L = Layout<BITS, CK>;
#pragma unroll
  for (int tile = 0; tile < kTilesPerItem; ++tile) load_tile_words<BITS, CK>(it.w[tile], w_item + tile * L::kTileWords, lane);
#pragma unroll
  for (int gi = 0; gi < CK / G; ++gi) it.s[gi] = ptx::ld_nc_v4(reinterpret_cast<const uint4*>(s_item + 64 * gi));
}

// B fragments of a chunk: token g (+8 mt), k = 16 s + 2t + {0, 1} and the same + 8.
template <typename T, int CK, int MT>
__device__ __forceinline__ void load_activations(uint32_t (&b)[CK / 16][MT][2], const T* const (&a_rows)[MT], int k0) {
#pragma unroll
  for (int s = 0; s < CK / 16; ++s)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t* row = reinterpret_cast<const uint32_t*>(a_rows[mt] + k0 + 16 * s);
      b[s][mt][0] = ptx::ld_nc(row);
      b[s][mt][1] = ptx::ld_nc(row + 4);  // k + 8
    }
}

// Per group: corr = A' x B (the magic + offset of every code, times the
// activations, for all 16 rows at once), then each tile's partial sum starts
// from corr and adds x * B: exactly q * a, in fp32. Then acc += scale * sum.
template <typename T, int BITS, int CK, int G, int MT>
__device__ __forceinline__ void compute_item(float (&acc)[kTilesPerItem][MT][4], const DecodeItem<T, BITS, CK, G, MT>& it,
                                             const uint32_t (&b)[CK / 16][MT][2]) {
  using F = Fmt<T>;
  using T2 = typename F::T2;
  constexpr int kStepsPerGroup = G / 16;
  uint32_t a_corr[4];
  correction_fragment<T, BITS>(a_corr);
  static_for<CK / G>([&](auto gi_c) {
    constexpr int gi = decltype(gi_c)::value;
    float corr[MT][4];
    static_for<kStepsPerGroup>([&](auto ss_c) {
      constexpr int ss = decltype(ss_c)::value, s = gi * kStepsPerGroup + ss;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (ss == 0)
          F::mma_c0(corr[mt], a_corr, b[s][mt]);
        else
          F::mma(corr[mt], a_corr, b[s][mt]);
      }
    });
#pragma unroll
    for (int tile = 0; tile < kTilesPerItem; ++tile) {
      float p[MT][4];
      static_for<kStepsPerGroup>([&](auto ss_c) {
        constexpr int ss = decltype(ss_c)::value, s = gi * kStepsPerGroup + ss;
        uint32_t a[4];
        a_fragment<T, BITS, s, false>(a, it.w[tile]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (ss == 0)
            F::mma_cd(p[mt], a, b[s][mt], corr[mt]);
          else
            F::mma(p[mt], a, b[s][mt]);
        }
      });
      // (scale of row g, scale of row g + 8) of this tile: word `tile` of the 16-byte load
      const uint32_t sw = tile == 0 ? it.s[gi].x : tile == 1 ? it.s[gi].y : tile == 2 ? it.s[gi].z : it.s[gi].w;
      const T2 s2 = *reinterpret_cast<const T2*>(&sw);
      const float s_lo = F::to_float(s2.x), s_hi = F::to_float(s2.y);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[tile][mt][0] += s_lo * p[mt][0];  // c0, c1: row g
        acc[tile][mt][1] += s_lo * p[mt][1];
        acc[tile][mt][2] += s_hi * p[mt][2];  // c2, c3: row g + 8
        acc[tile][mt][3] += s_hi * p[mt][3];
      }
    }
  });
}

// Store a row block's result: lane (g, t) holds rows 16 tile + g (+8), tokens 8 mt + 2t (+1).
template <typename T, int MT>
__device__ __forceinline__ void store_row_block(T* C, const float (&acc)[kTilesPerItem][MT][4], int rb, int M, int N,
                                                int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int tile = 0; tile < kTilesPerItem; ++tile)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = 8 * mt + 2 * t + (i & 1);
        const int row = rb * kRowBlock + tile * kTileRows + g + 8 * (i >> 1);
        if (token < M) C[(size_t)token * N + row] = Fmt<T>::from_float(acc[tile][mt][i]);
      }
}

// The warp that owns item i under the balanced split of `items` over `warps` ranges.
__device__ __forceinline__ int owner_of(long long i, long long items, int warps) {
  return (int)(((i + 1) * warps - 1) / items);
}

template <typename T, int BITS, int CK, int G, int MT>
__global__ void __launch_bounds__(kDecodeThreads, decode_min_blocks<CK, G, MT>())
    gsq_decode_kernel(const T* __restrict__ A, const uint32_t* __restrict__ B, const T* __restrict__ S,
                      T* __restrict__ C, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int K,
                      int warps_total) {
  using L = Layout<BITS, CK>;
  constexpr int kFloats = kTilesPerItem * MT * 4;
  const int lane = threadIdx.x % 32;
  const int gw = blockIdx.x * kDecodeWarps + threadIdx.x / 32;
  if (gw >= warps_total) return;
  const int g = lane / 4, t = lane % 4;
  const int chunks = K / CK;
  const long long items = (long long)(N / kRowBlock) * chunks;
  const long long begin = items * gw / warps_total, end = items * (gw + 1) / warps_total;
  const T* a_rows[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) a_rows[mt] = A + (size_t)min(8 * mt + g, M - 1) * K + 2 * t;
  const T* s_lane = S + g * 8;  // item i's scales start at 64 (CK / G) i

  long long item = begin;
  int c = (int)(begin % chunks);
  DecodeItem<T, BITS, CK, G, MT> cur;
  load_item<T, BITS, CK, G, MT>(cur, B + item * L::kItemWords, s_lane + item * (CK / G) * 64, lane);
  while (item < end) {
    const int rb = (int)(item / chunks);  // once per segment
    const long long seg_begin = item;
    const long long seg_end = min(end, (long long)(rb + 1) * chunks);
    float acc[kTilesPerItem][MT][4] = {};
    for (; item < seg_end; ++item) {
      uint32_t b[L::kSteps][MT][2];
      load_activations<T, CK, MT>(b, a_rows, c * CK);
      // the next item's weights and scales (the last item re-reads itself)
      const long long nxt = min(item + 1, items - 1);
      DecodeItem<T, BITS, CK, G, MT> next;
      load_item<T, BITS, CK, G, MT>(next, B + nxt * L::kItemWords, s_lane + nxt * (CK / G) * 64, lane);
      compute_item<T, BITS, CK, G, MT>(acc, cur, b);
      cur = next;
      c = c + 1 == chunks ? 0 : c + 1;  // the chunk wraps to 0 at a new row block
    }
    if (seg_begin == (long long)rb * chunks && seg_end == (long long)(rb + 1) * chunks) {
      store_row_block<T, MT>(C, acc, rb, M, N, lane);
      continue;
    }
    // a partial row block: slot 0 for the warp's first segment, 1 for its last
    const long long slot = 2LL * gw + (seg_begin == begin ? 0 : 1);
    store_partial<kFloats>(ws, slot, &acc[0][0][0], lane);
    const int first = owner_of((long long)rb * chunks, items, warps_total);
    const int last = owner_of((long long)(rb + 1) * chunks - 1, items, warps_total);
    if (!arrive_last(counters + rb, last - first + 1, lane)) continue;
    float sum[kTilesPerItem][MT][4] = {};
    for (int w = first; w <= last; ++w) {
      const long long w_begin = items * w / warps_total;
      add_partial<kFloats>(&sum[0][0][0], ws, 2LL * w + (w_begin >= (long long)rb * chunks ? 0 : 1), lane);
    }
    store_row_block<T, MT>(C, sum, rb, M, N, lane);
  }
}

}  // namespace gsq
