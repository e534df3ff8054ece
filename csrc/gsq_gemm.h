// Host interface of the GSQ CUDA GEMM (csrc/gsq_gemm.cu), shared by the torch
// binding (csrc/gsq_binding.cpp) and the CPU emulator's C API (csrc/emu/).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

// How gsq_gemm_launch splits the work for an [M, K] x [K, N] problem on a
// device with `sms` SMs: rows per block, K split across `splits` blocks of
// `k_tiles_per_split` 64-row k tiles (the last one may be shorter), and the
// workspace bytes the caller must provide (0 when splits == 1).
struct GsqGemmPlan {
  int block_m;
  int splits;
  int k_tiles_per_split;
  size_t workspace_bytes;
};

GsqGemmPlan gsq_gemm_plan(int m, int n, int k, int sms);

// C[M, N] = A[M, K] @ dequant(B, S), on `stream`. a, s, c: fp16 (bf16 when
// `bf16`), b: int32 in the kernel layout (gsq_vllm/cuda_gemm.py::repack);
// bits is the storage width (2 or 3). `workspace` holds at least
// gsq_gemm_plan(m, n, k, sms).workspace_bytes bytes (may be null when that
// is 0). Returns cudaErrorInvalidValue for arguments the kernel cannot take.
cudaError_t gsq_gemm_launch(const void* a, const void* b, const void* s, void* c, void* workspace,
                            size_t workspace_bytes, int m, int n, int k, int bits, int group_size,
                            bool bf16, int sms, cudaStream_t stream);
