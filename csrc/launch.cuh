// Host-side kernel launch, the one place that uses the <<<>>> syntax.
//
// The emulation build (GSQ_CUDA_EMU) has no <<<>>>: csrc/emu/cuda_emu.h
// provides a launch_kernel with the same signature that runs the grid on
// CPU fibers.
#pragma once

#ifdef GSQ_CUDA_EMU
namespace gsq {
using gsq_emu::launch_kernel;
}
#else
#include <cuda_runtime.h>

namespace gsq {

// kernel<<<grid, block, smem_bytes, stream>>>(args...), raising the dynamic
// shared memory limit first when the kernel needs more than the default 48 KiB.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                                 cudaStream_t stream, Args... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem_bytes));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KArgs>(args)...);
  return cudaGetLastError();
}

}  // namespace gsq
#endif
