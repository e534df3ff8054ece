// Host interface of the GSQ CUDA GEMM (csrc/gsq_gemm.cu), shared by the torch
// binding (csrc/gsq_binding.cpp) and the CPU emulator's C API (csrc/emu/).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

#include "gsq_rules.h"  // which shapes the kernel takes (gsq::rules), shared with the CPU extension

// What the plan needs to know of the device.
struct GsqDevice {
  int sms;          // cudaDevAttrMultiProcessorCount
  int smem_per_sm;  // cudaDevAttrMaxSharedMemoryPerMultiprocessor, bytes
};

// How gsq_gemm_launch runs an [M, K] x [K, N] problem on a device. M <= 16:
// the decode kernel, `warps` independent warps in grid_x blocks, at most as
// many as fit on the device at once (one wave), each streaming at least 8
// items where the layer has them (csrc/gsq_gemm.cu), token_tiles = 1 or 2 (8 tokens
// each), block_warps warps a block (fewer than 4 where shared memory is
// short). Larger M: the prefill kernel, grid (row blocks, token blocks,
// splits), token_tiles = 4 or 8. workspace_bytes: scratch for split-K partial
// sums (any contents); counter_bytes: ints that must be zero before the first
// launch (each launch leaves them zero). Both 0 when nothing is split.
struct GsqGemmPlan {
  int token_tiles;
  int grid_x, grid_y, splits;
  int warps;
  size_t workspace_bytes;
  size_t counter_bytes;
  int block_warps;  // warps a block (blockDim.x / 32)
};

GsqGemmPlan gsq_gemm_plan(int m, int n, int k, int bits, int group_size, GsqDevice device);

// C[M, N] = A[M, K] @ dequant(B, S)^T on `stream`. a, s, c: fp16 (bf16 when
// `bf16`); b: int32 in the kernel layout (gsq_vllm/cuda_gemm.py::repack);
// bits is the storage width (2 or 3). Returns cudaErrorInvalidValue for
// arguments the kernels cannot take or a workspace / counters smaller than
// gsq_gemm_plan asks for.
cudaError_t gsq_gemm_launch(const void* a, const void* b, const void* s, void* c, void* workspace,
                            size_t workspace_bytes, int* counters, size_t counter_bytes, int m, int n, int k,
                            int bits, int group_size, bool bf16, GsqDevice device, cudaStream_t stream);
