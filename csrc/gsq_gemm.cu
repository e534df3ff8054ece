// GSQ W2A16 / W3A16 GEMM: C[M, N] = A[M, K] @ (q * s)[N, K]^T, fp32 accumulate.
//
// Self-contained: base CUDA only (no torch headers). The kernels are
// composed from csrc/gemm/ (layout + dequant, split-K reduction, the decode
// and prefill kernels) and csrc/ptx.cuh (every PTX instruction, wrapped
// once). This file holds the host side: the launch plan and the dispatch to
// the template instantiations. The torch binding (csrc/gsq_binding.cpp) and
// the CPU emulator (csrc/emu/capi.cpp) both call gsq_gemm_plan and
// gsq_gemm_launch.
//
// Inputs (layouts from gsq_vllm/cuda_gemm.py::repack; docs/FORMAT.md):
//   A  fp16/bf16 [M, K] row-major, 16-byte aligned rows (K % 64 == 0).
//   B  int32 [N/64, K * 2 * BITS] kernel layout (csrc/gemm/layout.cuh).
//   S  fp16/bf16 [N/64, (K/G) * 64] scales in the kernel layout.
//   C  fp16/bf16 [M, N] row-major.
// M <= 16 runs the decode kernel, larger M the prefill kernel. Both split K
// when the layer alone would not fill the GPU and reduce the splits inside
// the kernel: the caller provides the plan's workspace (any contents) and
// counters (zero before the first call; every launch leaves them zero).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "gemm/decode.cuh"
#include "gemm/prefill.cuh"
#include "gsq_gemm.h"
#include "launch.cuh"

namespace gsq {

constexpr int kPrefillBlocksPerSm = 2;  // blocks the prefill split aims at per SM
constexpr int kSmemPerBlockReserved = 1024;  // the system's share of each block's shared memory (sm_80+)

// The shape rules (which N, K, G, bits; the chunk of K) are csrc/gsq_rules.h's; the layout agrees.
using rules::chunk_k;
static_assert(rules::kNMultiple == kRowBlock, "N alignment of the rules and the layout");

// f(CK, G) as compile-time constants for the instantiation a layer runs: the one place that maps
// (K, G) to a kernel, so the plan sizes the same instantiation the launch runs. CK = 64 with
// G = 128 cannot occur (G divides K, so 128 does).
static_assert(sizeof(rules::kGroupSizes) / sizeof(int) == 3 && rules::kGroupSizes[0] == 32 &&
                  rules::kGroupSizes[1] == 64 && rules::kGroupSizes[2] == 128,
              "with_chunk_and_group instantiates each group size of the rules");
template <typename F>
auto with_chunk_and_group(int k, int group_size, F&& f) {
  using std::integral_constant;
  if (chunk_k(k, group_size) == 64)
    return group_size == 32 ? f(integral_constant<int, 64>{}, integral_constant<int, 32>{})
                            : f(integral_constant<int, 64>{}, integral_constant<int, 64>{});
  return group_size == 64 ? f(integral_constant<int, 128>{}, integral_constant<int, 64>{})
                          : f(integral_constant<int, 128>{}, integral_constant<int, 128>{});
}

// The decode launch's shape on a device: warps per block (kDecodeWarps where four rings fit one
// SM's shared memory, else fewer) and blocks per SM (the registers' budget of the launch bounds,
// and the shared memory) of the instantiation the plan will launch.
struct DecodeShape {
  int block_warps, blocks_per_sm;
};

template <int BITS, int CK, int G, int MT>
DecodeShape decode_shape(int smem_per_sm) {
  constexpr int ring = DecodeSmem<BITS, CK, G, MT>::kWarpBytes;
  const int block_warps = std::clamp((smem_per_sm - kSmemPerBlockReserved) / ring, 1, kDecodeWarps);
  return {block_warps, std::max(1, std::min(decode_min_blocks<MT>(),
                                            smem_per_sm / (block_warps * ring + kSmemPerBlockReserved)))};
}

template <int BITS>
DecodeShape decode_shape_of(int k, int group_size, int mt, int smem_per_sm) {
  return with_chunk_and_group(k, group_size, [&](auto ck, auto g) {
    constexpr int CK = decltype(ck)::value, G = decltype(g)::value;
    return mt == 1 ? decode_shape<BITS, CK, G, 1>(smem_per_sm) : decode_shape<BITS, CK, G, 2>(smem_per_sm);
  });
}

template <typename T, int BITS, int CK, int G, int MT>
cudaError_t launch_decode(const GsqGemmPlan& p, const void* a, const void* b, const void* s, void* c, void* ws,
                          int* counters, int m, int n, int k, cudaStream_t stream) {
  return launch_kernel(gsq_decode_kernel<T, BITS, CK, G, MT>, dim3(p.grid_x), dim3(32 * p.block_warps),
                       (size_t)p.block_warps * DecodeSmem<BITS, CK, G, MT>::kWarpBytes, stream,
                       static_cast<const T*>(a), static_cast<const uint32_t*>(b), static_cast<const T*>(s),
                       static_cast<T*>(c), static_cast<float*>(ws), counters, m, n, k, p.warps);
}

template <typename T, int BITS, int CK, int G, int MT>
cudaError_t launch_prefill(const GsqGemmPlan& p, const void* a, const void* b, const void* s, void* c, void* ws,
                           int* counters, int m, int n, int k, cudaStream_t stream) {
  return launch_kernel(gsq_prefill_kernel<T, BITS, CK, G, MT>, dim3(p.grid_x, p.grid_y, p.splits),
                       dim3(kPrefillThreads), PrefillSmem<CK, MT>::kBytes, stream, static_cast<const T*>(a),
                       static_cast<const uint32_t*>(b), static_cast<const T*>(s), static_cast<T*>(c),
                       static_cast<float*>(ws), counters, m, n, k, p.splits);
}

template <typename T, int BITS, int CK, int G>
cudaError_t launch_g(const GsqGemmPlan& p, const void* a, const void* b, const void* s, void* c, void* ws,
                     int* counters, int m, int n, int k, cudaStream_t stream) {
  switch (p.token_tiles) {
    case 1: return launch_decode<T, BITS, CK, G, 1>(p, a, b, s, c, ws, counters, m, n, k, stream);
    case 2: return launch_decode<T, BITS, CK, G, 2>(p, a, b, s, c, ws, counters, m, n, k, stream);
    case 4: return launch_prefill<T, BITS, CK, G, 4>(p, a, b, s, c, ws, counters, m, n, k, stream);
    default: return launch_prefill<T, BITS, CK, G, 8>(p, a, b, s, c, ws, counters, m, n, k, stream);
  }
}

template <typename T, int BITS>
cudaError_t launch_bits(const GsqGemmPlan& p, const void* a, const void* b, const void* s, void* c, void* ws,
                        int* counters, int m, int n, int k, int group_size, cudaStream_t stream) {
  return with_chunk_and_group(k, group_size, [&](auto ck, auto g) {
    return launch_g<T, BITS, decltype(ck)::value, decltype(g)::value>(p, a, b, s, c, ws, counters, m, n, k, stream);
  });
}

}  // namespace gsq

GsqGemmPlan gsq_gemm_plan(int m, int n, int k, int bits, int group_size, GsqDevice device) {
  using namespace gsq;
  GsqGemmPlan p{};
  const int sms = std::max(device.sms, 1);
  const int chunks = k / chunk_k(k, group_size);
  const long long row_blocks = n / kRowBlock;
  if (m <= 16) {
    // Decode. The plan's rules, stated once (benchmarks/kernel_static.py re-derives the split from
    // the launched plan, tests/test_kernel_static.py checks it against this code):
    //  * one wave: at most the warps that fit on the device at once (decode_shape);
    //  * each warp streams at least kDecodeMinItems items where the layer has them (fewer, longer
    //    ranges at small layers: the prologue and segment costs amortized, the ring kept busy),
    //    but at least one warp per SM (every SM's share of HBM bandwidth);
    //  * warp w streams items [items w / warps, items (w + 1) / warps), so items * (warps + 1) stays
    //    below 2^31: the kernel's indices and divisions are 32-bit.
    p.token_tiles = m <= 8 ? 1 : 2;
    const long long items = row_blocks * chunks;
    const DecodeShape shape = bits == 2 ? decode_shape_of<2>(k, group_size, p.token_tiles, device.smem_per_sm)
                                        : decode_shape_of<3>(k, group_size, p.token_tiles, device.smem_per_sm);
    const long long resident = (long long)sms * shape.blocks_per_sm * shape.block_warps;
    long long warps = std::min({items, resident, std::max<long long>(sms, items / kDecodeMinItems)});
    warps = std::min(warps, (long long)INT32_MAX / std::max(items, 1LL) - 1);  // items * (warps + 1) < 2^31
    if (warps < 1) return GsqGemmPlan{};  // too many items for 32-bit indices: gsq_gemm_launch refuses it
    p.warps = (int)warps;
    p.block_warps = shape.block_warps;
    p.grid_x = (p.warps + shape.block_warps - 1) / shape.block_warps;
    p.grid_y = 1;
    p.splits = 1;
    // a row block is split between warps unless every warp boundary falls on a row block boundary
    bool split = false;
    for (int w = 1; w < p.warps && !split; ++w) split = (items * w / p.warps) % chunks != 0;
    if (split) {
      p.workspace_bytes = (size_t)p.warps * 2 * 32 * (kTilesPerItem * p.token_tiles * 4) * sizeof(float);
      p.counter_bytes = (size_t)row_blocks * sizeof(int);
    }
    return p;
  }
  p.token_tiles = m <= 32 ? 4 : 8;
  const int token_blocks = (m + 8 * p.token_tiles - 1) / (8 * p.token_tiles);
  const long long blocks = row_blocks * token_blocks;
  p.grid_x = (int)row_blocks;
  p.grid_y = token_blocks;
  p.splits = (int)std::clamp<long long>((kPrefillBlocksPerSm * (long long)sms + blocks - 1) / blocks, 1, chunks);
  p.warps = (int)(blocks * p.splits * kPrefillWarps);
  p.block_warps = kPrefillWarps;
  if (p.splits > 1) {
    const long long units = row_blocks * kTilesPerItem * token_blocks;
    p.workspace_bytes = (size_t)units * p.splits * 32 * (p.token_tiles * 4) * sizeof(float);
    p.counter_bytes = (size_t)units * sizeof(int);
  }
  return p;
}

cudaError_t gsq_gemm_launch(const void* a, const void* b, const void* s, void* c, void* workspace,
                            size_t workspace_bytes, int* counters, size_t counter_bytes, int m, int n, int k,
                            int bits, int group_size, bool bf16, GsqDevice device, cudaStream_t stream) {
  using namespace gsq;
  if (m < 1 || !rules::shape_ok(n, k, bits, group_size)) return cudaErrorInvalidValue;
  const GsqGemmPlan p = gsq_gemm_plan(m, n, k, bits, group_size, device);
  if (p.warps < 1) return cudaErrorInvalidValue;
  if (workspace_bytes < p.workspace_bytes || counter_bytes < p.counter_bytes ||
      (p.workspace_bytes && workspace == nullptr) || (p.counter_bytes && counters == nullptr))
    return cudaErrorInvalidValue;
  if (bits == 2)
    return bf16 ? launch_bits<__nv_bfloat16, 2>(p, a, b, s, c, workspace, counters, m, n, k, group_size, stream)
                : launch_bits<__half, 2>(p, a, b, s, c, workspace, counters, m, n, k, group_size, stream);
  return bf16 ? launch_bits<__nv_bfloat16, 3>(p, a, b, s, c, workspace, counters, m, n, k, group_size, stream)
              : launch_bits<__half, 3>(p, a, b, s, c, workspace, counters, m, n, k, group_size, stream);
}
