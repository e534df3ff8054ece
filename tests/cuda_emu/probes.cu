// Probe kernels for the emulator's own tests (tests/test_cuda_emu_runtime.py).
// Emulation-only code: it builds __half from raw bits, which CUDA's __half does not allow.
//
// Built by gsq_vllm.cuda_emu.build_library in place of csrc/gsq_gemm.cu, so
// they run through the same C API: gsq_gemm_launch's `bits` argument selects
// the probe. Some do what a correct kernel does with an instruction (mma and
// ldmatrix from the PTX ISA fragment layouts), the others make one mistake
// the emulator must report.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gsq_gemm.h"
#include "launch.cuh"
#include "ptx.cuh"

namespace probes {

// 1: every thread reads one element past the end of A with a plain load.
__global__ void read_past_end(const __half* a, __half* c, int count) {
  c[threadIdx.x] = a[count + threadIdx.x];
}

// 2: warp 0 waits at one __syncthreads, the other warps at another.
__global__ void divergent_barrier(__half* c) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  c[threadIdx.x] = __float2half_rn(1.0f);
}

// 3: thread t copies row t of A into shared memory with cp.async; thread
// t + 1 reads it after a barrier but nobody waited for the copy.
__global__ void read_before_wait(const __half* a, __half* c, bool wait) {
  __half* sm = reinterpret_cast<__half*>(gsq::ptx::dynamic_smem());
  const int t = threadIdx.x;
  gsq::ptx::cp_async16(sm + 8 * t, a + 8 * t);
  gsq::ptx::cp_async_commit();
  if (wait) gsq::ptx::cp_async_wait<0>();
  __syncthreads();
  const int src = (t + 1) % blockDim.x;
  for (int i = 0; i < 8; ++i) c[8 * t + i] = sm[8 * src + i];
}

// 4: lane 0 of each warp leaves early; the rest of the warp does an mma.
__global__ void mma_with_exited_lane(__half* c) {
  if (threadIdx.x % 32 == 0) return;
  float d[4] = {0, 0, 0, 0};
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  gsq::ptx::mma_m16n8k16_f16(d, a, b);
  c[threadIdx.x] = __float2half_rn(d[0]);
}

// 5: a store into the read-only input A.
__global__ void write_input(const __half* a) { const_cast<__half*>(a)[threadIdx.x] = __float2half_rn(0.f); }

// 6: one warp, one m16n8k16: A [16, 16] row-major and B [8, 16] (column n
// of the B operand = row n) in global memory, fragments built by each lane
// from the PTX ISA layout, D [16, 8] written back to C.
__global__ void one_mma(const __half* A, const __half* B, __half* C) {
  const int lane = threadIdx.x, group = lane >> 2, tig = lane % 4;
  auto pack = [](__half lo, __half hi) { return (uint32_t)lo.__x | (uint32_t)hi.__x << 16; };
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {  // a0..a7, two per register
    const int row = group + 8 * (r % 2), col = 2 * tig + 8 * (r / 2);
    a[r] = pack(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * tig + 8 * r;
    b[r] = pack(B[group * 16 + k], B[group * 16 + k + 1]);
  }
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  gsq::ptx::mma_m16n8k16_f16(d, a, b);
  for (int i = 0; i < 4; ++i) C[(group + 8 * (i / 2)) * 8 + 2 * tig + (i % 2)] = __float2half_rn(d[i]);
}

// 7: ldmatrix.x4 of four 8x8 matrices stored row-major in shared memory;
// lane l writes its 4 registers (8 halves) to C[8 l .. 8 l + 7].
__global__ void ldmatrix_x4(const __half* a, __half* c) {
  __half* sm = reinterpret_cast<__half*>(gsq::ptx::dynamic_smem());
  const int lane = threadIdx.x;
  for (int i = 0; i < 8; ++i) sm[8 * lane + i] = a[8 * lane + i];  // 32 rows of 8
  __syncwarp();
  uint32_t d[4];
  gsq::ptx::ldmatrix_x4(d, sm + 8 * lane);  // lane 8m + r: row r of matrix m
  for (int m = 0; m < 4; ++m) {
    c[8 * lane + 2 * m] = __half{(uint16_t)(d[m] & 0xFFFF)};
    c[8 * lane + 2 * m + 1] = __half{(uint16_t)(d[m] >> 16)};
  }
}

// 8: cp.async from a misaligned source.
__global__ void misaligned_copy(const __half* a, __half* c) {
  __half* sm = reinterpret_cast<__half*>(gsq::ptx::dynamic_smem());
  gsq::ptx::cp_async16(sm, a + 1);
  gsq::ptx::cp_async_wait<0>();
  c[threadIdx.x] = sm[0];
}

// 9: split-K's arrival (csrc/gemm/reduce.cuh) in miniature, in C's bytes: two blocks of one warp
// each store a partial (float4 per lane, bytes 0-1023), count themselves in at an int (bytes
// 1024-1027, poisoned to -1, so the last arrival reads 0), and the last adds both partials into
// bytes 1536-2047. `variant` breaks one step of the PTX memory model's sequence (0: none):
// 1 no writer fence, 2 no __syncwarp before lane 0's atomic, 3 no reader fence, 4 block 1 reads
// without counting itself in, 5 a plain float store into C, 6 a plain float load from C,
// 7 both blocks store the same bytes with nothing ordering them. 8 is correct too: the barrier
// first, then only lane 0 fences and counts (the fence is cumulative: it covers the other lanes'
// stores, which the barrier ordered before it). 9 and 10 read the partials with cp.async
// instead of ld.global.cg, 9 without the reader fence. 11 stores past the end of C.
__global__ void message_passing(unsigned char* c, int variant) {
  float4* part = reinterpret_cast<float4*>(c);
  int* counter = reinterpret_cast<int*>(c + 1024);
  float4* out = reinterpret_cast<float4*>(c + 1536);
  const int lane = threadIdx.x, w = blockIdx.x;
  if (variant == 5) reinterpret_cast<float*>(c)[lane] = 1.f;  // plain scalar store
  if (variant == 6) out[lane].x = reinterpret_cast<const float*>(c)[lane];  // plain scalar load
  if (variant == 7) out[lane] = make_float4(w, 0, 0, 0);  // unordered stores
  if (variant == 11) reinterpret_cast<__half*>(c + 2048)[lane] = __float2half_rn(0.f);  // store past the end
  part[32 * w + lane] = make_float4(w + 1, lane, 0, 1);
  int old = 0;
  if (variant == 8) {
    __syncwarp();
    if (lane == 0) {
      __threadfence();
      old = atomicAdd(counter, 1);
    }
  } else {
    if (variant != 1) __threadfence();  // writer: the partial before the count
    if (variant != 2) __syncwarp();  // every lane's fence before lane 0's atomic
    if (lane == 0 && !(variant == 4 && w == 1)) old = atomicAdd(counter, 1);
  }
  old = __shfl_sync(0xffffffffu, old, 0);
  if (old != 0) return;  // not the last
  if (variant != 3 && variant != 9) __threadfence();  // reader: the others' partials after their counts
  float4 sum = make_float4(0, 0, 0, 0);
  for (int i = 0; i < 2; ++i) {
    float4 x;
    if (variant >= 9) {
      float4* sm = reinterpret_cast<float4*>(gsq::ptx::dynamic_smem());
      gsq::ptx::cp_async16(sm + lane, part + 32 * i + lane);  // the reader's copy
      gsq::ptx::cp_async_commit();
      gsq::ptx::cp_async_wait<0>();
      x = sm[lane];
    } else {
      x = gsq::ptx::ld_cg_v4(part + 32 * i + lane);  // the reader's load
    }
    sum.x += x.x, sum.y += x.y, sum.z += x.z, sum.w += x.w;
  }
  out[lane] = sum;
}

}  // namespace probes

GsqGemmPlan gsq_gemm_plan(int, int, int, int, int, GsqDevice) { return GsqGemmPlan{}; }

cudaError_t gsq_gemm_launch(const void* a, const void*, const void*, void* c, void*, size_t, int*, size_t, int m,
                            int n, int k, int probe, int, bool, GsqDevice, cudaStream_t stream) {
  using namespace probes;
  auto A = static_cast<const __half*>(a);
  auto C = static_cast<__half*>(c);
  switch (probe) {
    case 1: return gsq::launch_kernel(read_past_end, dim3(1), dim3(32), 0, stream, A, C, m * k);
    case 2: return gsq::launch_kernel(divergent_barrier, dim3(1), dim3(64), 0, stream, C);
    case 3: return gsq::launch_kernel(read_before_wait, dim3(1), dim3(32), 512, stream, A, C, n == 1);
    case 4: return gsq::launch_kernel(mma_with_exited_lane, dim3(1), dim3(64), 0, stream, C);
    case 5: return gsq::launch_kernel(write_input, dim3(1), dim3(32), 0, stream, A);
    case 6: return gsq::launch_kernel(one_mma, dim3(1), dim3(32), 0, stream, A, A + 256, C);
    case 7: return gsq::launch_kernel(ldmatrix_x4, dim3(1), dim3(32), 512, stream, A, C);
    case 8: return gsq::launch_kernel(misaligned_copy, dim3(1), dim3(32), 64, stream, A, C);
    case 9: return gsq::launch_kernel(message_passing, dim3(2), dim3(32), 512, stream,
                                      static_cast<unsigned char*>(c), k - 1);
  }
  return cudaErrorInvalidValue;
}
