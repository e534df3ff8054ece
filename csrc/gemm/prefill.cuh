// Prefill kernel (M > 16): the same weight layout and arithmetic as the
// decode kernel (exact codes in the A operand, fp32 partial sums per group
// times the group scale), with many tokens per weight tile so the tensor
// pipe, not dequant, sets the pace.
//
// A block is one row block (warp w = tile w, 16 rows) x a token block of
// 8 MT tokens x a contiguous range of chunks (split-K over blocks, reduced in
// the kernel by csrc/gemm/reduce.cuh). The token block's activations for a
// chunk are staged in shared memory by cp.async (kStages deep, token rows
// past M zero-filled) and read as B fragments with ldmatrix; each warp
// streams its own tile's codes and scales into registers one chunk ahead.
#pragma once

#include "layout.cuh"
#include "reduce.cuh"

namespace gsq {

constexpr int kPrefillWarps = kTilesPerItem;  // warp w computes tile w of the row block
constexpr int kPrefillThreads = 32 * kPrefillWarps;
constexpr int kPrefillStages = 3;
// register budget (blocks per SM): no spills in any instantiation
template <int MT>
constexpr int prefill_min_blocks() {
  return MT == 8 ? 2 : 3;
}

template <int CK, int MT>
struct PrefillSmem {
  static constexpr int kTokens = 8 * MT;
  static constexpr int kRowHalves = CK + 8;  // +16 bytes: ldmatrix rows of consecutive tokens hit distinct banks
  static constexpr int kStageHalves = kTokens * kRowHalves;
  static constexpr int kBytes = kPrefillStages * kStageHalves * 2;
};

template <typename T, int BITS, int CK, int G, int MT>
__global__ void __launch_bounds__(kPrefillThreads, prefill_min_blocks<MT>())
    gsq_prefill_kernel(const T* __restrict__ A, const uint32_t* __restrict__ B, const T* __restrict__ S,
                       T* __restrict__ C, float* __restrict__ ws, int* __restrict__ counters, int M, int N, int K,
                       int splits) {
  using L = Layout<BITS, CK>;
  using F = Fmt<T>;
  using SM = PrefillSmem<CK, MT>;
  constexpr int kGroups = CK / G, kStepsPerGroup = G / 16;
  T* smem = reinterpret_cast<T*>(ptx::dynamic_smem());

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int rb = blockIdx.x, tb = blockIdx.y, split = blockIdx.z;
  const int chunks = K / CK;
  const int c_begin = (int)((long long)chunks * split / splits);
  const int c_end = (int)((long long)chunks * (split + 1) / splits);
  const int n_chunks = c_end - c_begin;
  const int token0 = tb * SM::kTokens;

  // cp.async of one chunk of the token block's activations (16-byte pieces; rows past M
  // zero-filled): thread `tid` copies pieces tid, tid + 128, ...
  constexpr int kPieces = SM::kTokens * CK / 8;
  static_assert(kPieces % kPrefillThreads == 0, "whole rounds of pieces");
  auto load_stage = [&](int stage, int chunk) {
    T* dst = smem + stage * SM::kStageHalves;
#pragma unroll
    for (int r = 0; r < kPieces / kPrefillThreads; ++r) {
      const int i = r * kPrefillThreads + tid;
      const int row = i / (CK / 8), col = (i % (CK / 8)) * 8;
      const int token = token0 + row;
      const bool valid = token < M;
      const T* src = A + (size_t)(valid ? token : 0) * K + (size_t)chunk * CK + col;
      ptx::cp_async16_zfill(dst + row * SM::kRowHalves + col, src, valid ? 16 : 0);
    }
  };

  // this warp's tile: item (rb, c) tile `warp`; scales (row g, row g + 8) of group j at S[rb][j][g][warp]
  const uint32_t* w_tile = B + (long long)rb * chunks * L::kItemWords + warp * L::kTileWords;
  const T* s_lane = S + (long long)rb * (K / G) * 64 + g * 8 + warp * 2;
  uint32_t w_cur[L::kWords], s_cur[kGroups];
  auto load_weights = [&](uint32_t (&w)[L::kWords], uint32_t (&s)[kGroups], int chunk) {
    load_tile_words<BITS, CK>(w, w_tile + (long long)chunk * L::kItemWords, lane);
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi)
      s[gi] = ptx::ld_nc(reinterpret_cast<const uint32_t*>(s_lane + ((long long)chunk * kGroups + gi) * 64));
  };

#pragma unroll
  for (int st = 0; st < kPrefillStages - 1; ++st) {
    if (st < n_chunks) load_stage(st, c_begin + st);
    ptx::cp_async_commit();
  }
  load_weights(w_cur, s_cur, c_begin);

  // ldmatrix.x4 row address of this lane: matrix l / 8 = (token tile +0/+1, k half 0/1), row l % 8
  const int ld_token = 8 * ((lane / 8) / 2) + lane % 8;
  const int ld_k = 8 * ((lane / 8) % 2);

  float acc[MT][4] = {};
  for (int it = 0; it < n_chunks; ++it) {
    ptx::cp_async_wait<kPrefillStages - 2>();
    __syncthreads();  // chunk `it` landed for everyone; the stage refilled below is no longer read
    {  // past the last chunk the stage is refilled with it again (never read): no branch
      const int nxt = it + kPrefillStages - 1;
      load_stage(nxt % kPrefillStages, c_begin + min(nxt, n_chunks - 1));
      ptx::cp_async_commit();
    }
    uint32_t w_next[L::kWords], s_next[kGroups];
    load_weights(w_next, s_next, c_begin + min(it + 1, n_chunks - 1));

    const T* stage = smem + (it % kPrefillStages) * SM::kStageHalves;
    static_for<kGroups>([&](auto gi_c) {
      constexpr int gi = decltype(gi_c)::value;
      float p[MT][4];
      static_for<kStepsPerGroup>([&](auto ss_c) {
        constexpr int ss = decltype(ss_c)::value, s = gi * kStepsPerGroup + ss;
        uint32_t a[4];
        a_fragment<T, BITS, s, true>(a, w_cur);
#pragma unroll
        for (int mt = 0; mt < MT; mt += 2) {
          uint32_t bq[4];
          ptx::ldmatrix_x4(bq, stage + (8 * mt + ld_token) * SM::kRowHalves + 16 * s + ld_k);
          const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
          if constexpr (ss == 0) {
            F::mma_c0(p[mt], a, b0);
            F::mma_c0(p[mt + 1], a, b1);
          } else {
            F::mma(p[mt], a, b0);
            F::mma(p[mt + 1], a, b1);
          }
        }
      });
      add_scaled<T, MT>(acc, p, s_cur[gi]);
    });
#pragma unroll
    for (int i = 0; i < L::kWords; ++i) w_cur[i] = w_next[i];
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) s_cur[gi] = s_next[gi];
  }
  ptx::cp_async_wait<0>();

  auto store = [&](const float (&v)[MT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int token = token0 + 8 * mt + 2 * t + (i & 1);
        const int row = rb * kRowBlock + warp * kTileRows + g + 8 * (i >> 1);
        if (token < M) C[(size_t)token * N + row] = F::from_float(v[mt][i]);
      }
  };
  if (splits == 1) {
    store(acc);
    return;
  }
  // output unit: (tile, token block); its splits contribute in split order
  const long long unit = ((long long)rb * kTilesPerItem + warp) * gridDim.y + tb;
  store_partial<MT * 4>(ws, unit * splits + split, &acc[0][0], lane);
  if (!arrive_last(counters + unit, splits, lane)) return;
  float sum[MT][4] = {};
  for (int sp = 0; sp < splits; ++sp) add_partial<MT * 4>(&sum[0][0], ws, unit * splits + sp, lane);
  store(sum);
}

}  // namespace gsq
