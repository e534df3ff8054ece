// Decode kernel (M <= 16): C[M, N] = A[M, K] @ (q * s)^T, weights as the A
// operand of m16n8k16 (256 weights per mma), tokens as its n8 columns.
//
// Work split: the (row block, chunk) items of the layer (csrc/gemm/layout.cuh)
// are cut into `warps_total` contiguous, balanced ranges, one per warp
// (stream-K over warps). The host plan (csrc/gsq_gemm.cu) picks warps_total
// so each warp streams at least kDecodeMinItems items where the layer has
// them. Warps never wait for each other: each has its own ring of
// DecodeSmem::kStages shared-memory stages (as many as kDecodeRingBytes
// holds), and no __syncthreads is used. A warp walks its range one item at a
// time, row block by row block (a *segment*): cp.async brings item
// i + kStages - 1 (codes, scales and the chunk's activations, token rows past
// M zero-filled) into the ring while item i is computed, so kStages - 1 items
// per warp are in flight with no registers held for them; nothing past the
// range's end is fetched.
//
// Per item and group, one correction mma per k step (csrc/gemm/layout.cuh)
// gives the accumulator every tile's fp32 partial sum of q * a starts from;
// the partial sums are added times the group scale. A segment that covers a
// whole row block stores C directly; a partial one goes through
// csrc/gemm/reduce.cuh. The loop body has no runtime division; its one branch
// skips the prefetch past the range's end. Item indices are 32-bit: the plan
// keeps items * (warps_total + 1) below 2^31 (no 64-bit division anywhere).
#pragma once

#include "layout.cuh"
#include "reduce.cuh"

namespace gsq {

constexpr int kDecodeWarps = 4;  // per block at most (the plan launches fewer where shared memory is short)
constexpr int kDecodeThreads = 32 * kDecodeWarps;
// One warp's ring holds as many stages as fit in kDecodeRingBytes (at least 3, at most
// kDecodeMaxStages): four such rings fit an A100's 163 KB a block, two an sm_86/89's 99 KB.
constexpr int kDecodeRingBytes = 40 * 1024;
constexpr int kDecodeMaxStages = 16;
constexpr int kDecodeMinItems = 8;  // items each warp streams at least, where the layer has them

// Blocks per SM the register budget is set for (no spills in any instantiation).
template <int MT>
constexpr int decode_min_blocks() {
  return MT == 1 ? 4 : 2;
}

// One warp's ring stage: an item's codes (as stored), its scales, and the
// chunk's activations for 8 MT tokens (rows padded by 16 bytes so ldmatrix
// rows fall in different banks).
template <int BITS, int CK, int G, int MT>
struct DecodeSmem {
  using L = Layout<BITS, CK>;
  static constexpr int kWeightBytes = L::kItemWords * 4;
  static constexpr int kScaleBytes = (CK / G) * 64 * 2;
  static constexpr int kActRowHalves = CK + 8;
  static constexpr int kActBytes = 8 * MT * kActRowHalves * 2;
  static constexpr int kStageBytes = kWeightBytes + kScaleBytes + kActBytes;
  static constexpr int kStages = kDecodeRingBytes / kStageBytes < 3                  ? 3
                                 : kDecodeRingBytes / kStageBytes > kDecodeMaxStages ? kDecodeMaxStages
                                                                                     : kDecodeRingBytes / kStageBytes;
  static constexpr int kWarpBytes = kStages * kStageBytes;  // a block of w warps takes w kWarpBytes
  static_assert(kWeightBytes % 16 == 0 && kScaleBytes % 16 == 0 && kActBytes % 16 == 0, "16-byte pieces");
  static_assert(kWarpBytes <= kDecodeRingBytes, "a ring within its budget");
};

// Where this lane's cp.async pieces come from and go to, relative to an
// item's codes / scales / activation chunk (fixed for the whole kernel, so
// the loop only adds an item base and immediates):
//   codes: pieces lane, lane + 32, ... (the lane's own 16 bytes of each plane row);
//   scales: piece `lane` for the first kScaleBytes / 16 lanes;
//   activations: token 8r + lane / 4 (round r < MT), its k run of CK / 4
//   elements starting at (lane % 4) CK / 4, as CK / 32 consecutive pieces.
template <typename T, int BITS, int CK, int G, int MT>
struct DecodeCopy {
  using SM = DecodeSmem<BITS, CK, G, MT>;
  static constexpr int kRunHalves = CK / 4;
  const T* act_src[MT];  // + chunk * CK
  bool act_valid[MT];
  int act_dst;           // byte offset in a stage (round r adds 8 r rows)
  __device__ DecodeCopy(const T* A, int M, int K, int lane) {
#pragma unroll
    for (int r = 0; r < MT; ++r) {
      const int token = 8 * r + lane / 4;
      act_valid[r] = token < M;
      act_src[r] = A + (size_t)(act_valid[r] ? token : 0) * K + (lane % 4) * kRunHalves;
    }
    act_dst = SM::kWeightBytes + SM::kScaleBytes + ((lane / 4) * SM::kActRowHalves + (lane % 4) * kRunHalves) * 2;
  }
};

template <typename T, int BITS, int CK, int G, int MT>
__device__ __forceinline__ void issue_item(unsigned char* stage, const uint32_t* w_lane, const T* s_lane,
                                           const DecodeCopy<T, BITS, CK, G, MT>& cp, int chunk, int lane) {
  using L = Layout<BITS, CK>;
  using SM = DecodeSmem<BITS, CK, G, MT>;
#pragma unroll
  for (int i = 0; i < L::kWords; ++i) ptx::cp_async16(stage + lane * 16 + i * 512, w_lane + i * 128);
  if (lane < SM::kScaleBytes / 16) ptx::cp_async16(stage + SM::kWeightBytes + lane * 16, s_lane);
#pragma unroll
  for (int r = 0; r < MT; ++r)
#pragma unroll
    for (int i = 0; i < CK / 32; ++i)
      ptx::cp_async16_zfill(stage + cp.act_dst + (8 * r * SM::kActRowHalves + 8 * i) * 2,
                            cp.act_src[r] + (size_t)chunk * CK + 8 * i, cp.act_valid[r] ? 16 : 0);
}

// This lane's words of one tile, from a stage (the same planes as in memory).
template <int BITS, int CK>
__device__ __forceinline__ void stage_tile_words(uint32_t (&w)[Layout<BITS, CK>::kWords], const uint32_t* tile,
                                                 int lane) {
  using L = Layout<BITS, CK>;
  if constexpr (L::kPlane4) {
    const uint4 v = reinterpret_cast<const uint4*>(tile)[lane];
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  }
  if constexpr (L::kPlane2) {
    const uint2 v = reinterpret_cast<const uint2*>(tile + 32 * L::kPlane4)[lane];
    w[L::kPlane4] = v.x, w[L::kPlane4 + 1] = v.y;
  }
  if constexpr (L::kPlane1) w[L::kPlane4 + L::kPlane2] = tile[32 * (L::kPlane4 + L::kPlane2) + lane];
}

// B fragments of the whole chunk from the stage's activations, by ldmatrix.x4:
// MT = 1: matrices (k 16s, 16s + 8, 16s + 16, 16s + 24) = steps s and s + 1;
// MT = 2: matrices (tokens 0-7, 8-15) x (k 16s, 16s + 8) = step s, both token tiles.
template <typename T, int CK, int MT>
__device__ __forceinline__ void stage_activations(uint32_t (&b)[CK / 16][MT][2], const T* act, int lane) {
  constexpr int kRow = CK + 8;
  if constexpr (MT == 1) {
#pragma unroll
    for (int s = 0; s < CK / 16; s += 2) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, act + (lane % 8) * kRow + 16 * s + 8 * (lane / 8));
      b[s][0][0] = r[0], b[s][0][1] = r[1], b[s + 1][0][0] = r[2], b[s + 1][0][1] = r[3];
    }
  } else {
#pragma unroll
    for (int s = 0; s < CK / 16; ++s) {
      uint32_t r[4];
      ptx::ldmatrix_x4(r, act + (8 * (lane / 16) + lane % 8) * kRow + 16 * s + 8 * ((lane / 8) % 2));
      b[s][0][0] = r[0], b[s][0][1] = r[1], b[s][1][0] = r[2], b[s][1][1] = r[3];
    }
  }
}

// Per group: corr = A' x B (the magic + offset of every code, times the
// activations, for all 16 rows at once), then each tile's partial sum starts
// from corr and adds x * B: exactly q * a, in fp32. Then acc += scale * sum.
template <typename T, int BITS, int CK, int G, int MT>
__device__ __forceinline__ void compute_item(float (&acc)[kTilesPerItem][MT][4], const unsigned char* stage,
                                             const uint32_t (&a_corr)[4], int lane) {
  using F = Fmt<T>;
  using L = Layout<BITS, CK>;
  using SM = DecodeSmem<BITS, CK, G, MT>;
  constexpr int kStepsPerGroup = G / 16;
  uint32_t b[CK / 16][MT][2];
  stage_activations<T, CK, MT>(b, reinterpret_cast<const T*>(stage + SM::kWeightBytes + SM::kScaleBytes), lane);
  const uint32_t* scales = reinterpret_cast<const uint32_t*>(stage + SM::kWeightBytes) + (lane / 4) * 4;
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
      uint32_t w[L::kWords];
      stage_tile_words<BITS, CK>(w, reinterpret_cast<const uint32_t*>(stage) + tile * L::kTileWords, lane);
      float p[MT][4];
      static_for<kStepsPerGroup>([&](auto ss_c) {
        constexpr int ss = decltype(ss_c)::value, s = gi * kStepsPerGroup + ss;
        uint32_t a[4];
        a_fragment<T, BITS, s, false>(a, w);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (ss == 0)
            F::mma_cd(p[mt], a, b[s][mt], corr[mt]);
          else
            F::mma(p[mt], a, b[s][mt]);
        }
      });
      // (scale of row g, scale of row g + 8) of this tile: scales [group][g][tile][2]
      add_scaled<T, MT>(acc[tile], p, scales[gi * 32 + tile]);
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

// The first item of warp w's range under the balanced split of `items` over `warps` ranges
// (32-bit: the plan keeps items * (warps + 1) below 2^31).
__device__ __forceinline__ int range_begin(int w, int items, int warps) {
  return (int)((unsigned)items * (unsigned)w / (unsigned)warps);
}

// The warp that owns item i under the same split.
__device__ __forceinline__ int owner_of(int i, int items, int warps) {
  return (int)(((unsigned)i * (unsigned)warps + (unsigned)warps - 1u) / (unsigned)items);
}

template <typename T, int BITS, int CK, int G, int MT>
__global__ void __launch_bounds__(kDecodeThreads, decode_min_blocks<MT>())
    gsq_decode_kernel(const T* __restrict__ A, const uint32_t* __restrict__ B, const T* __restrict__ S,
                      T* __restrict__ C, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int K,
                      int warps_total) {
  using SM = DecodeSmem<BITS, CK, G, MT>;
  constexpr int kStages = SM::kStages;
  constexpr int kFloats = kTilesPerItem * MT * 4;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gw = blockIdx.x * (blockDim.x / 32) + warp;
  if (gw >= warps_total) return;
  unsigned char* ring = ptx::dynamic_smem() + warp * SM::kWarpBytes;
  const int chunks = K / CK;
  const int items = (N / kRowBlock) * chunks;
  const int begin = range_begin(gw, items, warps_total), end = range_begin(gw + 1, items, warps_total);

  // prologue: the first kStages - 1 items of the range in flight (those it has)
  using L = Layout<BITS, CK>;
  const DecodeCopy<T, BITS, CK, G, MT> cp(A, M, K, lane);
  const uint32_t* w_lane = B + (size_t)begin * L::kItemWords + lane * 4;     // + kItemWords per item
  const T* s_lane = S + (size_t)begin * (CK / G) * 64 + lane * 8;            // + (CK / G) 64 per item
  int c_issue = (int)((unsigned)begin % (unsigned)chunks);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (begin + st < end)  // nothing past the range's end
      issue_item<T, BITS, CK, G, MT>(ring + st * SM::kStageBytes, w_lane, s_lane, cp, c_issue, lane);
    ptx::cp_async_commit();  // (an empty group past the end keeps the wait counts uniform)
    w_lane += L::kItemWords;
    s_lane += (CK / G) * 64;
    c_issue = c_issue + 1 == chunks ? 0 : c_issue + 1;
  }
  uint32_t a_corr[4];  // the correction mma's constant A operand
  correction_fragment<T, BITS>(a_corr);
  int stage = 0;  // ring stage of `item`; item + kStages - 1 goes into the one before it
  int item = begin;
  while (item < end) {
    const int rb = (int)((unsigned)item / (unsigned)chunks);  // once per segment
    const int seg_begin = item;
    const int seg_end = min(end, (rb + 1) * chunks);
    float acc[kTilesPerItem][MT][4] = {};
    for (; item < seg_end; ++item) {
      ptx::cp_async_wait<kStages - 2>();
      __syncwarp();  // item's pieces (copied by all lanes) visible to all; the stage refilled below is free
      // refill the stage freed last time with item + kStages - 1, if the range has it
      const int refill = stage == 0 ? kStages - 1 : stage - 1;
      if (item + kStages - 1 < end)  // no prefetch past the range's end
        issue_item<T, BITS, CK, G, MT>(ring + refill * SM::kStageBytes, w_lane, s_lane, cp, c_issue, lane);
      ptx::cp_async_commit();
      w_lane += L::kItemWords;
      s_lane += (CK / G) * 64;
      c_issue = c_issue + 1 == chunks ? 0 : c_issue + 1;
      compute_item<T, BITS, CK, G, MT>(acc, ring + stage * SM::kStageBytes, a_corr, lane);
      stage = stage + 1 == kStages ? 0 : stage + 1;
    }
    if (seg_begin == rb * chunks && seg_end == (rb + 1) * chunks) {
      store_row_block<T, MT>(C, acc, rb, M, N, lane);
      continue;
    }
    // a partial row block: slot 0 for the warp's first segment, 1 for its last
    const int slot = 2 * gw + (seg_begin == begin ? 0 : 1);
    store_partial<kFloats>(ws, slot, &acc[0][0][0], lane);
    const int first = owner_of(rb * chunks, items, warps_total);
    const int last = owner_of((rb + 1) * chunks - 1, items, warps_total);
    if (!arrive_last(counters + rb, last - first + 1, lane)) continue;
    // every contributor after the first begins its range inside the row block (its slot 0); the first
    // used slot 1 if its range began before the row block
    const int first_slot = 2 * first + (range_begin(first, items, warps_total) < rb * chunks ? 1 : 0);
    float sum[kTilesPerItem][MT][4] = {};
    for (int w = first; w <= last; ++w)
      add_partial<kFloats>(&sum[0][0][0], ws, w == first ? first_slot : 2 * w, lane);
    store_row_block<T, MT>(C, sum, rb, M, N, lane);
  }
  ptx::cp_async_wait<0>();
}

}  // namespace gsq
