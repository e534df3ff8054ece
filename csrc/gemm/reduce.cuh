// Split-K inside the kernel: the partial sums of one output unit (a 64-row
// block at decode, a 16-row tile at prefill) are stored by each contributing
// warp; the last warp to arrive (one int counter per unit) adds them up in
// contributor order -- deterministic whatever the arrival order -- writes C
// and sets the counter back to zero, so the next launch needs no memset.
// Nothing spins: no warp ever waits for another.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../ptx.cuh"

namespace gsq {

// A warp's partial: each lane's kFloats accumulators, stored lane-major
// ([slot][lane][kFloats]) so the reducing lane reads back its own fragment
// positions from every contributor.
template <int kFloats>
__device__ __forceinline__ void store_partial(float* ws, long long slot, const float* v, int lane) {
  static_assert(kFloats % 4 == 0, "float4 stores");
  float4* dst = reinterpret_cast<float4*>(ws + (slot * 32 + lane) * kFloats);
#pragma unroll
  for (int i = 0; i < kFloats / 4; ++i) dst[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
}

template <int kFloats>
__device__ __forceinline__ void add_partial(float* v, const float* ws, long long slot, int lane) {
  const float4* src = reinterpret_cast<const float4*>(ws + (slot * 32 + lane) * kFloats);
#pragma unroll
  for (int i = 0; i < kFloats / 4; ++i) {
    const float4 x = ptx::ld_cg_v4(src + i);
    v[4 * i] += x.x, v[4 * i + 1] += x.y, v[4 * i + 2] += x.z, v[4 * i + 3] += x.w;
  }
}

// Called by all 32 lanes after store_partial. True (in every lane) for the
// last of `contributors` warps to arrive at `counter`; that warp may then
// read every contributor's partial.
__device__ __forceinline__ bool arrive_last(int* counter, int contributors, int lane) {
  __threadfence();  // this lane's partial is visible device-wide before the count moves
  __syncwarp();
  int old = 0;
  if (lane == 0) old = atomicAdd(counter, 1);
  old = __shfl_sync(0xffffffffu, old, 0);
  const bool last = old == contributors - 1;
  if (last) {
    __syncwarp();  // lane 0's atomic (its acquire of the count) ordered before every lane's fence: a shfl orders nothing
    __threadfence();  // the others' partials, after their counts
    if (lane == 0) atomicExch(counter, 0);  // leave it as the next launch expects
  }
  return last;
}

}  // namespace gsq
