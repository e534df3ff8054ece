// GSQ W2A16 / W3A16 GEMM: C[M, N] = A[M, K] @ dequant(B)[K, N], fp32 accumulate.
//
// Self-contained: base CUDA only (no torch headers). The host entry point
// gsq_gemm_launch() at the bottom is called by csrc/gsq_binding.cpp.
//
// Inputs (layouts written by gsq_vllm/cuda_gemm.py::repack, see docs/FORMAT.md
// "Kernel layout"):
//   A  fp16/bf16 [M, K] row-major, 16-byte aligned, K % 64 == 0.
//   B  int32 [N/64, (K/64) * 4 * 32 * BITS]: per (n tile nb, k tile kb, warp w,
//      lane l) BITS consecutive words: lo_h0, lo_h1 (2-bit plane, 16 codes
//      each) and, for BITS == 3, hi (the third bit of those 32 codes).
//      lo_h word, pair p = 0..7: bits [2p, 2p+2) = code of (k = 16w + 2t + 8r,
//      n = 8j + g), bits [16+2p, 16+2p+2) = code of (k + 1, n), with
//      g = l / 4, t = l % 4, j = 4h + p / 2, r = p % 2: exactly the two values
//      of register r of the m16n8k16 B fragment of n8 tile j.
//      hi word: bit 8h + p / 16 + 8h + p = bit 2 of the code at lo_h bit 2p /
//      16 + 2p.
//   S  fp16/bf16 [K/G, N]; within each 64-column n tile column 8g + j holds
//      the scale of column 8j + g (so lane group g reads its 8 scales as 16 B).
//   C  fp16/bf16 [M, N] row-major (written when splits == 1), or
//   WS fp32 [M, N] zeroed by the host code and atomically accumulated by the
//      splits (splits > 1), then converted into C by a second kernel.
//
// Work split: a block (4 warps, 128 threads) owns one 64-wide n tile, one
// contiguous range of k tiles (split-K over gridDim.y, so small N still fills
// the SMs at M = 1) and 16 * M_TILES rows of M (gridDim.z). Each k tile (64
// rows of K) is one pipeline stage loaded with cp.async (STAGES deep); warp w
// does the m16n8k16 k step 16w..16w+15 of each stage for all 64 columns, so
// the 4 warps split K inside the block and are summed through shared memory
// at the end.
//
// Dequant: (word >> 2p) & 0x00030003 | MAGIC in one lop3 puts MAGIC + u into
// both 16-bit halves (MAGIC = 1024.0 fp16 / 128.0 bf16, whose last mantissa
// bits are zero, so the code lands in the mantissa exactly); subtracting
// MAGIC + offset gives the signed code, times the group scale.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "gsq_gemm.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace gsq {

constexpr int kTileN = 64;
constexpr int kTileK = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 4;
constexpr int kARowPad = kTileK + 8;  // halves per smem A row: 144 B keeps fragment loads conflict-free

template <typename T>
struct DType;

template <>
struct DType<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024.0, 1024.0)
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(c, a, b);
  }
};

template <>
struct DType<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // (128.0, 128.0)
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(c, a, b);
  }
};

template <typename T, int M_TILES, int BITS>
struct SmemLayout {
  static constexpr int kBM = 16 * M_TILES;
  static constexpr int kABytes = kBM * kARowPad * 2;  // per stage
  static constexpr int kBBytes = kWarps * 32 * BITS * 4;
  static constexpr int kSBytes = kTileN * 2;
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes;  // all multiples of 16
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kReduceBytes = kBM * kTileN * 4;
  static constexpr int kBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
};

template <typename T, int M_TILES, int BITS>
__global__ void __launch_bounds__(kThreads) gsq_gemm_kernel(
    const T* __restrict__ A, const int32_t* __restrict__ B, const T* __restrict__ S,
    T* __restrict__ C, float* __restrict__ WS, int M, int N, int K, int group_size,
    int k_tiles_per_split) {
  using D = DType<T>;
  using T2 = typename D::T2;
  using L = SmemLayout<T, M_TILES, BITS>;
  constexpr int kBM = L::kBM;
  unsigned char* smem = ptx::dynamic_smem();  // L::kBytes

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int t = lane % 4;

  const int nb = blockIdx.x;
  const int k_tiles = K / kTileK;
  const int kt_begin = blockIdx.y * k_tiles_per_split;
  const int kt_end = min(kt_begin + k_tiles_per_split, k_tiles);
  const int n_iters = kt_end - kt_begin;
  const int m0 = blockIdx.z * kBM;
  if (n_iters <= 0) return;

  const int32_t* b_tile = B + (size_t)nb * k_tiles * (kWarps * 32 * BITS);

  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * L::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * L::kStageBytes + L::kABytes); };
  auto stage_s = [&](int s) {
    return reinterpret_cast<T*>(smem + s * L::kStageBytes + L::kABytes + L::kBBytes);
  };

  // Issue the cp.async copies of k tile kt into stage buffer s.
  auto load_stage = [&](int s, int kt) {
    // A: kBM rows x 64 halves = 8 chunks of 16 B per row.
    T* sa = stage_a(s);
    for (int c = tid; c < kBM * 8; c += kThreads) {
      const int row = c / 8, col = (c % 8) * 8;
      const int grow = m0 + row;
      const bool valid = grow < M;
      const T* src = A + (size_t)(valid ? grow : 0) * K + kt * kTileK + col;
      ptx::cp_async16_zfill(sa + row * kARowPad + col, src, valid ? 16 : 0);
    }
    // B: one contiguous run of kBBytes.
    constexpr int kBChunks = L::kBBytes / 16;
    const int32_t* bsrc = b_tile + (size_t)kt * (kWarps * 32 * BITS);
    uint32_t* sb = stage_b(s);
    for (int c = tid; c < kBChunks; c += kThreads) ptx::cp_async16(sb + c * 4, bsrc + c * 4);
    // Scales: 64 values of group (kt * 64) / G, 8 chunks.
    if (tid < 8) {
      const int grp = kt * kTileK / group_size;
      ptx::cp_async16(stage_s(s) + tid * 8, S + (size_t)grp * N + nb * kTileN + tid * 8);
    }
  };

  float acc[M_TILES][8][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iters) load_stage(s, kt_begin + s);
    ptx::cp_async_commit();
  }

  constexpr uint32_t kOffset = BITS == 3 ? 4u : 2u;
  const uint32_t bias_bits = D::kMagic | (kOffset << 16) | kOffset;

  for (int it = 0; it < n_iters; ++it) {
    ptx::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` visible to all; stage it-1 fully consumed
    {
      const int nxt = it + kStages - 1;
      if (nxt < n_iters) load_stage(nxt % kStages, kt_begin + nxt);
      ptx::cp_async_commit();
    }
    const int s = it % kStages;
    const T* sa = stage_a(s);
    const uint32_t* sb = stage_b(s);

    // This warp's B words and the 8 scales of columns 8j + g.
    uint32_t w[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = sb[(warp * 32 + lane) * BITS + i];
    const uint4 s_raw = *reinterpret_cast<const uint4*>(stage_s(s) + g * 8);
    const T* sv = reinterpret_cast<const T*>(&s_raw);

    // Dequantise the 8 B fragments (n8 tiles j = 0..7) of this k step.
    uint32_t bfrag[8][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int p = 0; p < 8; ++p) {
        // (a & b) | c: the codes of one fragment register OR-ed into the magic constant
        uint32_t pair = ptx::lop3<0xEA>(w[h] >> (2 * p), 0x00030003u, D::kMagic);
        if constexpr (BITS == 3) pair |= ((w[2] >> (8 * h + p)) & 0x00010001u) << 2;
        const int j = 4 * h + p / 2;
        T2 q = __hsub2(*reinterpret_cast<const T2*>(&pair), *reinterpret_cast<const T2*>(&bias_bits));
        T2 sc;
        sc.x = sv[j];
        sc.y = sv[j];
        T2 v = __hmul2(q, sc);
        bfrag[j][p % 2] = *reinterpret_cast<uint32_t*>(&v);
      }
    }

    // A fragments of k step `warp` and the mma's.
    const int kc = warp * 16 + 2 * t;
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      const T* r0 = sa + (mt * 16 + g) * kARowPad + kc;
      const T* r1 = r0 + 8 * kARowPad;
      uint32_t afrag[4];
      afrag[0] = *reinterpret_cast<const uint32_t*>(r0);
      afrag[1] = *reinterpret_cast<const uint32_t*>(r1);
      afrag[2] = *reinterpret_cast<const uint32_t*>(r0 + 8);
      afrag[3] = *reinterpret_cast<const uint32_t*>(r1 + 8);
#pragma unroll
      for (int j = 0; j < 8; ++j) D::mma(acc[mt][j], afrag, bfrag[j]);
    }
  }

  // Sum the 4 warps' partial products in shared memory (reusing the pipeline).
  ptx::cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);  // [kBM][64]
  for (int i = tid; i < kBM * kTileN; i += kThreads) red[i] = 0.f;
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // C fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g + 8.
      const int row = mt * 16 + g, col = j * 8 + 2 * t;
      atomicAdd(&red[row * kTileN + col], acc[mt][j][0]);
      atomicAdd(&red[row * kTileN + col + 1], acc[mt][j][1]);
      atomicAdd(&red[(row + 8) * kTileN + col], acc[mt][j][2]);
      atomicAdd(&red[(row + 8) * kTileN + col + 1], acc[mt][j][3]);
    }
  __syncthreads();
  for (int i = tid; i < kBM * kTileN; i += kThreads) {
    const int row = i / kTileN, col = i % kTileN;
    const int grow = m0 + row;
    if (grow >= M) continue;
    const size_t off = (size_t)grow * N + nb * kTileN + col;
    if (WS != nullptr)
      atomicAdd(&WS[off], red[i]);
    else
      C[off] = D::from_float(red[i]);
  }
}

// Split-K partial sums (fp32 workspace) -> C in the activation dtype.
template <typename T>
__global__ void __launch_bounds__(256) workspace_to_c_kernel(const float* __restrict__ ws, T* __restrict__ c,
                                                           int count) {
  const int i = blockIdx.x * 256 + threadIdx.x;
  if (i < count) c[i] = DType<T>::from_float(ws[i]);
}

template <typename T, int BITS>
static cudaError_t launch_m(const void* a, const void* b, const void* s, void* c, float* ws, int m,
                            int n, int k, int group_size, const GsqGemmPlan& plan, cudaStream_t stream) {
  const int k_tiles = k / kTileK;
  const dim3 block(kThreads);
  auto go = [&](auto kernel, auto layout) {
    using L = decltype(layout);
    const dim3 grid(n / kTileN, (k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split,
                    (m + L::kBM - 1) / L::kBM);
    return launch_kernel(kernel, grid, block, L::kBytes, stream, static_cast<const T*>(a),
                         static_cast<const int32_t*>(b), static_cast<const T*>(s), static_cast<T*>(c), ws, m,
                         n, k, group_size, plan.k_tiles_per_split);
  };
  if (plan.block_m == 16) return go(gsq_gemm_kernel<T, 1, BITS>, SmemLayout<T, 1, BITS>{});
  if (plan.block_m == 32) return go(gsq_gemm_kernel<T, 2, BITS>, SmemLayout<T, 2, BITS>{});
  return go(gsq_gemm_kernel<T, 4, BITS>, SmemLayout<T, 4, BITS>{});
}

template <typename T>
static cudaError_t launch_t(const void* a, const void* b, const void* s, void* c, void* workspace, int m,
                            int n, int k, int bits, int group_size, const GsqGemmPlan& plan,
                            cudaStream_t stream) {
  float* ws = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  if (ws != nullptr) {
    const cudaError_t e = cudaMemsetAsync(ws, 0, plan.workspace_bytes, stream);
    if (e != cudaSuccess) return e;
  }
  const cudaError_t e = bits == 2 ? launch_m<T, 2>(a, b, s, c, ws, m, n, k, group_size, plan, stream)
                                  : launch_m<T, 3>(a, b, s, c, ws, m, n, k, group_size, plan, stream);
  if (e != cudaSuccess || ws == nullptr) return e;
  const int count = m * n;
  return launch_kernel(workspace_to_c_kernel<T>, dim3((count + 255) / 256), dim3(256), 0, stream,
                       static_cast<const float*>(ws), static_cast<T*>(c), count);
}

}  // namespace gsq

// Split K so that (n tiles x splits x m blocks) covers the SMs about twice;
// no split is empty.
GsqGemmPlan gsq_gemm_plan(int m, int n, int k, int sms) {
  using namespace gsq;
  GsqGemmPlan p{};
  p.block_m = m <= 16 ? 16 : (m <= 32 ? 32 : 64);
  const long blocks = (long)(n / kTileN) * ((m + p.block_m - 1) / p.block_m);
  const int k_tiles = k / kTileK;
  const long want = (2L * std::max(sms, 1) + blocks - 1) / std::max(blocks, 1L);
  const int splits = (int)std::clamp<long>(want, 1, std::max(k_tiles, 1));
  p.k_tiles_per_split = (k_tiles + splits - 1) / splits;
  p.splits = (k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split;
  p.workspace_bytes = p.splits > 1 ? (size_t)m * n * sizeof(float) : 0;
  return p;
}

cudaError_t gsq_gemm_launch(const void* a, const void* b, const void* s, void* c, void* workspace,
                            size_t workspace_bytes, int m, int n, int k, int bits, int group_size,
                            bool bf16, int sms, cudaStream_t stream) {
  using namespace gsq;
  if (m < 1 || n < kTileN || k < kTileK || n % kTileN || k % kTileK || k % group_size ||
      (group_size != 64 && group_size != 128) || (bits != 2 && bits != 3))
    return cudaErrorInvalidValue;
  const GsqGemmPlan plan = gsq_gemm_plan(m, n, k, sms);
  if (workspace_bytes < plan.workspace_bytes || (plan.workspace_bytes && workspace == nullptr))
    return cudaErrorInvalidValue;
  return bf16 ? launch_t<__nv_bfloat16>(a, b, s, c, workspace, m, n, k, bits, group_size, plan, stream)
              : launch_t<__half>(a, b, s, c, workspace, m, n, k, bits, group_size, plan, stream);
}
