// Host side of the CUDA emulator: what the C API (capi.cpp) sets up around a
// kernel launch. Kernel sources never include this file.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "cuda_emu.h"

namespace gsq_emu {

// Order in which ready fibers run between synchronisation points (and in
// which blocks are started): the same kernel must give the same result under
// every order.
enum class Order { kForward = 0, kReverse = 1, kRandom = 2 };

struct Options {
  int sms = 132;              // what cudaDevAttrMultiProcessorCount reports (H100 SXM)
  int smem_per_sm = 228 * 1024;  // cudaDevAttrMaxSharedMemoryPerMultiprocessor (H100)
  Order order = Order::kForward;
  uint64_t seed = 0;          // for Order::kRandom
  int resident_blocks = 1;    // blocks whose fibers interleave (like blocks sharing an SM)
  bool dry_run = false;       // record the launches, run no kernel (for the static cost model)
};

// One kernel launch as the host code made it.
struct LaunchRecord {
  std::string kernel;  // demangled name of the __global__ function
  dim3 grid, block;
  size_t dynamic_smem_bytes;
};

struct Stats {
  long long blocks = 0, threads = 0, switches = 0, mma = 0, ldmatrix = 0, cp_async = 0, barriers = 0;
};

// Memory the kernel may address, mapped so that its last byte sits against an
// inaccessible page (a read past the end faults and is reported) with another
// inaccessible page in front. Registered by name for error messages and for
// the range checks of cp.async, atomics and memset. A writable device buffer
// also gets a second mapping, through which the runtime reaches it while a
// launch keeps the kernel's view closed (the memory-order checks).
class GuardedBuffer {
 public:
  // global: a device buffer the kernel may name (registered); else the
  // caller's own region (shared memory).
  GuardedBuffer(const char* name, size_t bytes, bool writable, bool global = true);
  ~GuardedBuffer();
  GuardedBuffer(const GuardedBuffer&) = delete;
  GuardedBuffer& operator=(const GuardedBuffer&) = delete;
  unsigned char* data() const { return ptr_; }
  size_t size() const { return size_; }
  // After filling an input: make it read-only, so a kernel store into it faults.
  void seal();

 private:
  unsigned char* map_ = nullptr;
  size_t map_len_ = 0;
  unsigned char* ptr_ = nullptr;
  size_t size_ = 0;
  unsigned char* alias_ = nullptr;  // writable device buffers: a second mapping of the same pages
  size_t alias_len_ = 0;
};

// One emulated "device session": the buffers, options and first error of the
// launches made while it is alive. One session at a time per process.
class Session {
 public:
  explicit Session(const Options& opt);
  ~Session();
  const std::string& error() const;
  const Stats& stats() const;
  const std::vector<LaunchRecord>& launches() const;
};

}  // namespace gsq_emu
