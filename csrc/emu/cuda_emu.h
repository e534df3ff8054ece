// CUDA for g++: what a kernel source needs from the CUDA headers, so that
// csrc/*.cu compiles as host C++ and runs on CPU fibers (csrc/emu/runtime.cpp).
//
// Reached through the stand-in headers in csrc/emu/include/ (cuda_runtime.h,
// cuda_fp16.h, cuda_bf16.h), which the emulation build puts first on the
// include path. Everything here follows CUDA's documented behaviour:
//   * qualifiers vanish; static __shared__ is refused (kernels take their
//     shared memory from ptx::dynamic_smem(), which is per block here);
//   * threadIdx / blockIdx / blockDim / gridDim read the running fiber;
//   * __half / __nv_bfloat16 are 16-bit patterns; every intrinsic rounds to
//     nearest-even exactly once (the result is computed exactly or rounded to
//     odd in double first, which makes the final rounding exact);
//   * like torch's build flags (__CUDA_NO_HALF_OPERATORS__ ...), no implicit
//     conversions or operators on the 16-bit types: kernels use intrinsics.
#pragma once

#define GSQ_CUDA_EMU 1

#include <stddef.h>
#include <stdint.h>

#include <source_location>
#include <tuple>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ gsq_emu_static_shared_memory_is_not_emulated_use_ptx_dynamic_smem
#define __constant__ gsq_emu_constant_memory_is_not_emulated

namespace gsq_emu {
// A plain store by kernel code (the operator= of the types below): into a writable device buffer
// it is checked and recorded for the memory-order checks (csrc/emu/runtime.cpp), elsewhere written.
void store(void* p, const void* src, size_t bytes);
}  // namespace gsq_emu
// Gives a type an operator= that stores through gsq_emu::store (still an aggregate). The empty
// asm keeps the call from becoming a tail call, so its return address names the storing line.
#define GSQ_EMU_STORED(T)                                        \
  T& operator=(const T& o) {                                     \
    ::gsq_emu::store(static_cast<void*>(this), &o, sizeof(T));   \
    asm volatile("");                                            \
    return *this;                                                \
  }

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// CUDA vector types the kernels may load and store through (same size and alignment). A store
// of one of them (or of a 16-bit float type) to device memory is what the memory-order checks
// see of a kernel's plain stores; a plain store of a scalar (float, int) to memory the kernel
// writes faults as an access the emulator does not model.
struct alignas(16) uint4 { unsigned int x, y, z, w; GSQ_EMU_STORED(uint4) };
struct alignas(16) int4 { int x, y, z, w; GSQ_EMU_STORED(int4) };
struct alignas(16) float4 { float x, y, z, w; GSQ_EMU_STORED(float4) };
struct alignas(8) uint2 { unsigned int x, y; GSQ_EMU_STORED(uint2) };
struct alignas(8) int2 { int x, y; GSQ_EMU_STORED(int2) };
struct alignas(8) float2 { float x, y; GSQ_EMU_STORED(float2) };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// -------------------------------------------------------------- runtime API

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace gsq_emu {

// Where an emulated instruction was called from (for error reports).
struct Loc {
  const char* file = "?";
  unsigned line = 0;
  static constexpr Loc here(std::source_location s = std::source_location::current()) {
    return Loc{s.file_name(), s.line()};
  }
};

const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads(Loc loc);
// __shfl_sync(mask, value, src_lane): 32-bit value of lane src_lane (PTX ISA 9.7.9.6, .idx, width 32)
uint32_t shfl_idx(unsigned mask, uint32_t value, int src_lane, Loc loc);
void syncwarp(unsigned mask, Loc loc);
// fence.sc.gpu (__threadfence is membar.gl, its synonym)
void threadfence(Loc loc);
// An atomic on p: range-checked and ordered (memory order); returns the address to apply it at.
void* atomic_access(void* p, size_t bytes, Loc loc);
void check_memset(const void* p, size_t bytes, Loc loc);

// Type-erased kernel body: every fiber of the grid calls fn(ctx).
struct KernelBody {
  void (*fn)(void*);
  void* ctx;
};
// `kernel` identifies the __global__ function (for the launch record).
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes, KernelBody body);
int sm_count();
int smem_per_sm();
cudaError_t last_error();
const char* error_string(cudaError_t e);

// The emulated kernel<<<grid, block, smem, stream>>>(args...): parameters are
// converted and copied once, as the launch does; every thread runs the body.
template <typename... KArgs, typename... Args>
inline cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                                 cudaStream_t, Args... args) {
  struct Ctx {
    void (*kernel)(KArgs...);
    std::tuple<KArgs...> params;
  } ctx{kernel, std::tuple<KArgs...>(static_cast<KArgs>(args)...)};
  auto fn = [](void* p) {
    auto* c = static_cast<Ctx*>(p);
    std::apply(c->kernel, c->params);
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, KernelBody{fn, &ctx});
}

// ------------------------------------------------------ 16-bit float formats

// Round x to a format with `mbits` explicit mantissa bits and `ebits` exponent
// bits, nearest-even, with subnormals and overflow to infinity (IEEE-style
// layout: sign, exponent, mantissa). Returns the bit pattern.
uint16_t round_to_bits16(double x, int mbits, int ebits);
double bits16_to_double(uint16_t h, int mbits, int ebits);
// a * b + c computed exactly then rounded to odd in double (53 bits >= 16 + 2,
// so a later nearest-even rounding to a 16-bit format is exact).
double fma_round_odd(double a, double b, double c);

}  // namespace gsq_emu

#define threadIdx (::gsq_emu::thread_idx())
#define blockIdx (::gsq_emu::block_idx())
#define blockDim (::gsq_emu::block_dim())
#define gridDim (::gsq_emu::grid_dim())

inline void __syncthreads(gsq_emu::Loc loc = gsq_emu::Loc::here()) { gsq_emu::syncthreads(loc); }
inline void __syncwarp(unsigned mask = 0xffffffffu, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  gsq_emu::syncwarp(mask, loc);
}
inline void __threadfence(gsq_emu::Loc loc = gsq_emu::Loc::here()) { gsq_emu::threadfence(loc); }

inline int __shfl_sync(unsigned mask, int v, int src, int width = 32, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  (void)width;
  return static_cast<int>(gsq_emu::shfl_idx(mask, static_cast<uint32_t>(v), src, loc));
}
inline unsigned __shfl_sync(unsigned mask, unsigned v, int src, int width = 32,
                            gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  (void)width;
  return gsq_emu::shfl_idx(mask, v, src, loc);
}

inline cudaError_t cudaGetLastError() { return gsq_emu::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return gsq_emu::error_string(e); }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount)
    *value = gsq_emu::sm_count();
  else if (attr == cudaDevAttrMaxSharedMemoryPerMultiprocessor)
    *value = gsq_emu::smem_per_sm();
  else
    return cudaErrorInvalidValue;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr,
                            gsq_emu::Loc loc = gsq_emu::Loc::here());

// Device-side integer helpers CUDA declares globally.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// Atomics (relaxed RMWs at gpu scope): range-checked (shared memory of the block, or a registered
// writable global buffer) and ordered by the runtime, then applied where it says; fibers never
// interleave inside one.
template <typename T>
inline T* gsq_emu_atomic(T* p, gsq_emu::Loc loc) {
  return static_cast<T*>(gsq_emu::atomic_access(p, sizeof(T), loc));
}
inline float atomicAdd(float* p, float v, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  float* q = gsq_emu_atomic(p, loc);
  const float old = *q;
  *q = old + v;
  return old;
}
inline int atomicAdd(int* p, int v, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  int* q = gsq_emu_atomic(p, loc);
  const int old = *q;
  *q = static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(v));
  return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  unsigned* q = gsq_emu_atomic(p, loc);
  const unsigned old = *q;
  *q = old + v;
  return old;
}
inline int atomicExch(int* p, int v, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  int* q = gsq_emu_atomic(p, loc);
  const int old = *q;
  *q = v;
  return old;
}
inline int atomicCAS(int* p, int compare, int v, gsq_emu::Loc loc = gsq_emu::Loc::here()) {
  int* q = gsq_emu_atomic(p, loc);
  const int old = *q;
  if (old == compare) *q = v;
  return old;
}

// __half (IEEE binary16: 10 mantissa bits) and __nv_bfloat16 (7 mantissa bits).
struct __half {
  uint16_t __x;
  GSQ_EMU_STORED(__half)
};
struct __nv_bfloat16 {
  uint16_t __x;
  GSQ_EMU_STORED(__nv_bfloat16)
};
struct alignas(4) __half2 {
  __half x, y;
  GSQ_EMU_STORED(__half2)
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  GSQ_EMU_STORED(__nv_bfloat162)
};

namespace gsq_emu {
template <typename T>
struct Fmt16;
template <>
struct Fmt16<__half> {
  static constexpr int kMant = 10, kExp = 5;
};
template <>
struct Fmt16<__nv_bfloat16> {
  static constexpr int kMant = 7, kExp = 8;
};
template <typename T>
inline double to_double(T v) {
  return bits16_to_double(v.__x, Fmt16<T>::kMant, Fmt16<T>::kExp);
}
template <typename T>
inline T from_double(double v) {
  return T{round_to_bits16(v, Fmt16<T>::kMant, Fmt16<T>::kExp)};
}
// One correctly rounded a * b + c in format T.
template <typename T>
inline T fma16(T a, T b, T c) {
  return from_double<T>(fma_round_odd(to_double(a), to_double(b), to_double(c)));
}
template <typename T>
inline T neg_zero() {
  return T{0x8000};
}
template <typename T>
inline T one() {
  return from_double<T>(1.0);
}
}  // namespace gsq_emu

// binary16 / bfloat16 intrinsics (CUDA Math API, "Half Precision Intrinsics"
// and "Bfloat16 Precision Intrinsics"): round-to-nearest-even versions.
inline __half __float2half_rn(float f) { return gsq_emu::from_double<__half>(f); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return static_cast<float>(gsq_emu::to_double(h)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return gsq_emu::from_double<__nv_bfloat16>(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(gsq_emu::to_double(h)); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

#define GSQ_EMU_HALF_OPS(T, T2)                                                                  \
  inline T __hfma(T a, T b, T c) { return gsq_emu::fma16(a, b, c); }                             \
  inline T __hmul(T a, T b) { return gsq_emu::fma16(a, b, gsq_emu::neg_zero<T>()); }             \
  inline T __hadd(T a, T b) { return gsq_emu::fma16(a, gsq_emu::one<T>(), b); }                  \
  inline T __hsub(T a, T b) { return gsq_emu::fma16(b, gsq_emu::from_double<T>(-1.0), a); }      \
  inline T __hneg(T a) { return T{static_cast<uint16_t>(a.__x ^ 0x8000u)}; }                      \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline T2 __hmul2(T2 a, T2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }                 \
  inline T2 __hadd2(T2 a, T2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }                 \
  inline T2 __hsub2(T2 a, T2 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }                 \
  inline T2 __hneg2(T2 a) { return {__hneg(a.x), __hneg(a.y)}; }
GSQ_EMU_HALF_OPS(__half, __half2)
GSQ_EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162)
#undef GSQ_EMU_HALF_OPS
