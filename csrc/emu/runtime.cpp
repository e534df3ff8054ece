// The CUDA emulator's runtime: kernel threads as cooperative fibers.
//
// A launch runs its blocks `resident_blocks` at a time; every thread of those
// blocks is a fiber with its own stack (its registers are its locals). A fiber
// runs until it reaches a synchronisation point (__syncthreads, a warp
// collective, a cp.async wait, a fence) and then yields; after every yield the
// scheduler picks the next fiber to run: the lowest-numbered ready thread
// (forward), the highest (reverse) or a seeded-random one. Forward and reverse
// let one thread run as far ahead of the others as CUDA allows, so a missing
// barrier or wait shows up as poisoned data; the only orderings the kernel can
// rely on are the ones CUDA guarantees.
//
// What is checked, and reported with the call site:
//   * __syncthreads: all non-exited threads of the block, at the same call
//     site (a different site is a divergent barrier); a deadlock (no fiber can
//     run) lists where every waiting thread stands;
//   * warp collectives (mma, ldmatrix): all 32 lanes at the same instruction;
//     the result is computed from the PTX ISA fragment layouts;
//   * cp.async: cp-size/src-size, alignment, destination inside the block's
//     shared memory, source inside a registered buffer; the destination is
//     poisoned (all ones: NaN as fp16, bf16 and fp32) at issue and written
//     only when cp_async_wait retires the group, by this thread;
//   * shared memory is poisoned at block start and ends against a guard page;
//     global buffers end against a guard page (a read past the end faults;
//     the fault is reported with the source line of the faulting code);
//   * atomics and memsets must fall inside shared memory or a writable buffer;
//   * memory order: a load of global memory another thread stored during the
//     launch must be ordered after the store by the PTX memory model's
//     causality order (barriers, fence + atomic release, atomic + fence
//     acquire), and two stores to the same bytes must be ordered; plain
//     accesses the checks cannot see fault (see "memory order" below).
// Not modelled: timing, weak ordering of shared memory, nvcc's code
// generation (see docs/EMULATOR.md).

#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cfenv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>

#include "ptx_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace gsq_emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber (reserved, touched lazily)
constexpr unsigned char kPoison = 0xFF;     // NaN in fp16, bf16 and fp32

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::string where(Loc loc) {
  const char* f = loc.file;
  if (const char* slash = std::strrchr(f, '/')) f = slash + 1;
  return std::string(f) + ":" + std::to_string(loc.line);
}

// ------------------------------------------------------------ fiber contexts

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack
// pointer in *save_sp, switches to load_sp and restores the registers saved
// there. A new fiber's stack is prepared by init_context to "return" into its
// entry function.
extern "C" void gsq_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl gsq_emu_switch
  .type gsq_emu_switch, @function
gsq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gsq_emu_switch, .-gsq_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
void init_context(Context& c, unsigned char* stack_lo, size_t bytes, void (*entry)()) {
  auto sp = reinterpret_cast<uintptr_t>(stack_lo + bytes) & ~uintptr_t{15};
  auto push = [&](uintptr_t v) {
    sp -= 8;
    *reinterpret_cast<uintptr_t*>(sp) = v;
  };
  push(0);  // entry's return address slot (it never returns); keeps the ABI alignment
  push(reinterpret_cast<uintptr_t>(entry));
  for (int i = 0; i < 6; ++i) push(0);  // rbp rbx r12 r13 r14 r15
  c.sp = reinterpret_cast<void*>(sp);
}
void switch_context(Context& from, Context& to) { gsq_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void init_context(Context& c, unsigned char* stack_lo, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ state

enum class St { kReady, kBarrier, kCollective, kDone };
enum class Coll { kNone, kMma, kLdmatrix, kSyncwarp, kShfl };

struct CopyOp {
  unsigned char* dst;
  const unsigned char* src;
  int size;
  int src_bytes;
};

struct Block;

// A vector clock over the grid's threads (numbered block * threads per block
// + thread): sorted (thread, epoch) pairs, an absent thread at epoch 0. Sparse,
// because a thread mostly knows its own warp or block.
struct VClock {
  std::vector<std::pair<uint32_t, uint32_t>> e;
  uint32_t get(uint32_t t) const {
    auto it = std::lower_bound(e.begin(), e.end(), std::make_pair(t, 0u));
    return it != e.end() && it->first == t ? it->second : 0;
  }
  void set(uint32_t t, uint32_t v) {
    auto it = std::lower_bound(e.begin(), e.end(), std::make_pair(t, 0u));
    if (it != e.end() && it->first == t)
      it->second = v;
    else
      e.insert(it, {t, v});
  }
  void join(const VClock& o) {
    if (o.e.empty() || &o == this) return;
    if (e.empty()) {
      e = o.e;
      return;
    }
    std::vector<std::pair<uint32_t, uint32_t>> out;
    out.reserve(e.size() + o.e.size());
    auto a = e.cbegin(), b = o.e.cbegin();
    while (a != e.cend() || b != o.e.cend()) {
      if (b == o.e.cend() || (a != e.cend() && a->first < b->first)) {
        out.push_back(*a++);
      } else if (a == e.cend() || b->first < a->first) {
        out.push_back(*b++);
      } else {
        out.emplace_back(a->first, std::max(a->second, b->second));
        ++a, ++b;
      }
    }
    e.swap(out);
  }
  bool covers(uint32_t t, uint32_t epoch) const { return get(t) >= epoch; }
};

struct Fiber {
  Context ctx;
  unsigned char* stack_map = nullptr;  // guard page + stack
  Block* block = nullptr;
  int tid = 0, warp = 0, lane = 0;
  // memory order (see "memory order" below): this thread's number in the grid, its epoch, what
  // it knows (happens-before), what of that a fence.sc has covered, and what its atomics observed
  // that no fence has completed yet
  uint32_t gid = 0, ep = 0;
  VClock hb, fenced, acquired;
  dim3 tidx;
  St st = St::kDone;
  Loc loc;
  // operands of the collective this lane waits at
  Coll coll = Coll::kNone;
  MmaType mma_type = MmaType::kF16;
  const float* mma_c = nullptr;  // null: C = 0
  float* mma_d = nullptr;
  const uint32_t* mma_a = nullptr;
  const uint32_t* mma_b = nullptr;
  int ld_num = 0;
  bool ld_trans = false;
  uint32_t* ld_d = nullptr;
  const unsigned char* ld_addr = nullptr;
  uint32_t shfl_value = 0, shfl_result = 0;
  int shfl_src = 0;
  // cp.async: the open (uncommitted) group and the committed, pending ones
  std::vector<CopyOp> open;
  std::deque<std::vector<CopyOp>> groups;
};

struct Block {
  dim3 idx;
  std::vector<Fiber*> fibers;
  std::unique_ptr<GuardedBuffer> smem;
  int live = 0;        // threads not exited
  int at_barrier = 0;  // threads waiting at __syncthreads
  Loc barrier_loc;
  std::vector<int> warp_arrived;
};

struct Buffer {
  const unsigned char* lo;
  const unsigned char* hi;  // one past the end
  std::string name;
  bool writable;
  const unsigned char* map_lo;  // the whole mapping, guard pages included
  const unsigned char* map_hi;
  // a writable buffer's second mapping of the same pages: the runtime's way in while the kernel's
  // view is inaccessible during a launch (null: none, the kernel's view stays open)
  unsigned char* alias = nullptr;  // the byte that `lo` is in the kernel's view
  unsigned char* body = nullptr;   // the kernel view's pages (between the guard pages)
  size_t body_len = 0;
};

// What the memory-order checks know of one 2-byte granule of a writable buffer during a launch.
struct Shadow {
  uint32_t who = 0;    // the storing thread's number + 1 (0: not stored during this launch)
  uint32_t epoch = 0;  // its epoch at the store
  uintptr_t pc = 0;    // return address into the storing code (for the report)
};

struct Tracked {
  size_t buffer;  // index into State::buffers
  std::vector<Shadow> shadow;
};

struct Grid {
  dim3 grid, block;
  size_t smem_bytes = 0;
  KernelBody body{};
  std::vector<Block*> active;
  std::vector<std::unique_ptr<Fiber>> slots;  // resident_blocks * threads per block
  Context main;
  // memory order: the writable global buffers (closed to plain access during the launch), what
  // every atomic location's strong writes released, and each thread's last fence (for reports)
  std::vector<Tracked> tracked;
  std::map<uintptr_t, VClock> released;
  std::map<uintptr_t, Loc> released_at;
  std::vector<uint32_t> fence_epoch;
  std::vector<Loc> fence_loc;
};

struct State {
  Options opt;
  std::mt19937_64 rng;
  Stats stats;
  std::string error;
  cudaError_t last_error = cudaSuccess;
  std::vector<Buffer> buffers;
  std::vector<LaunchRecord> launches;
  Grid* grid = nullptr;
  // fault handling
  pthread_t thread{};
  sigjmp_buf fault_jmp;
  volatile sig_atomic_t in_grid = 0;
  void* fault_addr = nullptr;
  uintptr_t fault_pc = 0;
  int fault_sig = 0;
  uintptr_t store_pc = 0;  // set while store() copies to an unchecked address: the store's return address
};

State* g_state = nullptr;  // the live Session's state (one at a time)
thread_local Fiber* g_cur = nullptr;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

State& state() {
  if (g_state == nullptr) throw Failure("gsq emulator: no Session is active");
  return *g_state;
}

// Record the first error. On a fiber: abandon it (the scheduler stops the
// launch); on the host: throw to the launch or the C API.
[[noreturn]] void fail(const std::string& msg) {
  State& s = state();
  if (s.error.empty()) s.error = msg;
  if (g_cur != nullptr) {
    Fiber* f = g_cur;
    f->st = St::kDone;
    switch_context(f->ctx, s.grid->main);
    std::abort();  // never resumed
  }
  throw Failure(msg);
}

Fiber* cur(const char* what) {
  if (g_cur == nullptr) fail(std::string(what) + " called outside a kernel thread");
  return g_cur;
}

std::string who(const Fiber* f) {
  std::ostringstream o;
  o << "block (" << f->block->idx.x << "," << f->block->idx.y << "," << f->block->idx.z << ") thread "
    << f->tid << " (warp " << f->warp << " lane " << f->lane << ")";
  return o.str();
}

void yield(Fiber* f) {
  ++state().stats.switches;
  switch_context(f->ctx, state().grid->main);
}

const Buffer* find_buffer(const void* p, size_t bytes) {
  const auto* a = static_cast<const unsigned char*>(p);
  for (const Buffer& b : state().buffers)
    if (a >= b.lo && a + bytes <= b.hi) return &b;
  return nullptr;
}

bool in_smem(const Fiber* f, const void* p, size_t bytes) {
  const auto* a = static_cast<const unsigned char*>(p);
  const GuardedBuffer& sm = *f->block->smem;
  return a >= sm.data() && a + bytes <= sm.data() + sm.size();
}

// What lies at address p: for messages about bad accesses.
std::string describe_address(const void* p) {
  const auto* a = static_cast<const unsigned char*>(p);
  std::ostringstream o;
  for (const Buffer& b : state().buffers) {
    if (a >= b.lo && a < b.hi) {
      o << "byte " << (a - b.lo) << " of buffer " << b.name << " (" << (b.hi - b.lo) << " bytes)";
      return o.str();
    }
    if (a >= b.hi && a < b.map_hi) {
      o << (a - b.hi) << " bytes past the end of buffer " << b.name << " (" << (b.hi - b.lo) << " bytes)";
      return o.str();
    }
    if (a >= b.map_lo && a < b.lo) {
      o << (b.lo - a) << " bytes before the start of buffer " << b.name;
      return o.str();
    }
  }
  if (state().grid != nullptr) {
    for (Block* blk : state().grid->active) {
      const GuardedBuffer& sm = *blk->smem;
      if (a >= sm.data() && a < sm.data() + sm.size()) {
        o << "byte " << (a - sm.data()) << " of shared memory (" << sm.size() << " bytes)";
        return o.str();
      }
      if (a >= sm.data() + sm.size() && a < sm.data() + sm.size() + page_size()) {
        o << (a - sm.data() - sm.size()) << " bytes past the end of shared memory (" << sm.size()
          << " bytes)";
        return o.str();
      }
    }
    for (const auto& slot : state().grid->slots)
      if (a >= slot->stack_map && a < slot->stack_map + page_size()) return "a fiber stack's guard page (stack overflow)";
  }
  o << "address " << p << ", outside every emulated buffer";
  return o.str();
}

// ------------------------------------------------------------ memory order
//
// Global memory that the kernel writes (C, the split-K workspace, the
// counters) is checked against the PTX memory model's causality order (PTX
// ISA 8.x "Memory Consistency Model"): a load of bytes another thread stored
// during the launch must be ordered after that store, or the launch fails as
// a race. Happens-before is tracked with vector clocks; its edges are:
//   * program order;
//   * bar.sync (__syncthreads) among the block's waiting threads, bar.warp.sync
//     (__syncwarp) among the warp's lanes: all-to-all;
//   * shfl.sync: from the source lane to the lane that receives its value (a
//     register dependency; CUDA documents no memory ordering for it, see
//     docs/EMULATOR.md);
//   * release -> acquire through an atomic location x (atomics are relaxed
//     RMWs at gpu scope, fences are fence.sc: __threadfence is membar.gl):
//     a strong write to x releases everything its thread knows that a fence
//     covered -- the thread's own fence, or another thread's fence ordered
//     before the write by a barrier (fence.sc's total order must put that
//     fence before every fence that follows a strong read observing the
//     write, else causality would have a cycle); a strong read of x observes
//     every release on x so far (the RMW chain), and that knowledge becomes
//     the reader's (and reaches whoever it then synchronises with) only at
//     its next fence.
// fence.sc's order is otherwise not used: two fences are never ordered just
// because one ran first in the schedule, so the verdict does not depend on
// the schedule. Every plain access to those buffers during a launch faults:
// their pages are closed and the runtime reaches them through a second
// mapping, so no access escapes the model (stores of the CUDA vector and
// 16-bit types go through store(), ld.global.cg through load(), atomics
// through atomic_access()).

void tick(Fiber* f) { f->hb.set(f->gid, ++f->ep); }

// All of `fs` synchronise with each other (a barrier): each ends up knowing what any of them knew.
void join_all(const std::vector<Fiber*>& fs) {
  if (fs.empty()) return;
  VClock hb, fenced, acquired;
  for (const Fiber* f : fs) {
    hb.join(f->hb);
    fenced.join(f->fenced);
    acquired.join(f->acquired);
  }
  for (Fiber* f : fs) {
    f->hb = hb;
    f->fenced = fenced;
    f->acquired = acquired;
    tick(f);
  }
}

// The threads waiting at the block's barrier pass it.
void release_barrier(Block& b) {
  std::vector<Fiber*> waiting;
  for (Fiber* o : b.fibers)
    if (o->st == St::kBarrier) waiting.push_back(o);
  join_all(waiting);
  for (Fiber* o : waiting) o->st = St::kReady;
  b.at_barrier = 0;
}

std::string who_gid(const Grid& g, uint32_t gid) {
  const unsigned nthreads = g.block.x * g.block.y * g.block.z;
  const unsigned linear = gid / nthreads, tid = gid % nthreads;
  std::ostringstream o;
  o << "block (" << linear % g.grid.x << "," << (linear / g.grid.x) % g.grid.y << ","
    << linear / (g.grid.x * g.grid.y) << ") thread " << tid << " (warp " << tid / 32 << " lane " << tid % 32 << ")";
  return o.str();
}

std::string source_line(uintptr_t pc);

// The tracked buffer holding [p, p + bytes), if any.
Tracked* tracked_at(const void* p, size_t bytes) {
  Grid* g = state().grid;
  if (g == nullptr) return nullptr;
  const auto* a = static_cast<const unsigned char*>(p);
  for (Tracked& t : g->tracked) {
    const Buffer& b = state().buffers[t.buffer];
    if (a >= b.lo && a + bytes <= b.hi) return &t;
  }
  return nullptr;
}

unsigned char* alias_of(const Tracked& t, const void* p) {
  const Buffer& b = state().buffers[t.buffer];
  return b.alias + (static_cast<const unsigned char*>(p) - b.lo);
}

// Why the store (thread u, epoch e) is not ordered before f's load.
std::string missing_order(const Grid& g, const Fiber* f, uint32_t u, uint32_t e) {
  if (f->acquired.covers(u, e))
    return "this thread's atomic observed the writer's release, but it executed no fence (__threadfence) "
           "between that atomic and this load (the acquire pattern is: strong read, then fence)";
  for (const auto& [addr, rel] : g.released)
    if (rel.covers(u, e))
      return "the store was released through the atomic at " + where(g.released_at.at(addr)) + " (" +
             describe_address(reinterpret_cast<const void*>(addr)) +
             "), but this thread did not observe that atomic (an atomic read of it, then a fence) before this load";
  if (g.fence_epoch[u] >= e)
    return "the writer executed a fence after the store (at " + where(g.fence_loc[u]) +
           "), but no atomic released it: a fence is released by a strong write of its own thread, or of a thread "
           "that a barrier (__syncwarp, __syncthreads) orders after the fence";
  return "the writer executed no fence (__threadfence) between the store and an atomic that releases it";
}

// `load`: the loading instruction's name, or null for a store (at return address pc).
void check_ordered(const Fiber* f, const Tracked& t, const void* p, size_t bytes, const char* load, Loc loc,
                   uintptr_t pc) {
  const Grid& g = *state().grid;
  const Buffer& b = state().buffers[t.buffer];
  const size_t off = static_cast<const unsigned char*>(p) - b.lo;
  for (size_t i = off / 2; i < (off + bytes + 1) / 2; ++i) {
    const Shadow& s = t.shadow[i];
    if (s.who == 0 || s.who - 1 == f->gid || f->hb.covers(s.who - 1, s.epoch)) continue;
    const uint32_t u = s.who - 1;
    std::ostringstream o;
    o << "memory-order race on " << describe_address(b.lo + 2 * i) << ": " << who(f);
    if (load == nullptr)
      o << " stores to it at " << source_line(pc - 1);
    else
      o << " loads it (" << load << " at " << where(loc) << ")";
    o << ", and " << who_gid(g, u) << " stored it at " << source_line(s.pc - 1)
      << " with no causality order between the two (PTX memory model): ";
    o << (load == nullptr ? std::string("two stores neither of which is ordered before the other")
                   : missing_order(g, f, u, s.epoch));
    fail(o.str());
  }
}

// ------------------------------------------------------------ the scheduler

void fiber_entry() {
  Fiber* f = g_cur;
  State& s = state();
  s.grid->body.fn(s.grid->body.ctx);
  // thread exit: barriers wait only for non-exited threads (PTX ISA 9.7.13.1)
  Block& b = *f->block;
  f->st = St::kDone;
  --b.live;
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier(b);
  switch_context(f->ctx, s.grid->main);
  std::abort();  // a finished fiber is never resumed
}

template <typename T>
void apply_order(std::vector<T>& v) {
  State& s = state();
  if (s.opt.order == Order::kReverse)
    std::reverse(v.begin(), v.end());
  else if (s.opt.order == Order::kRandom)
    std::shuffle(v.begin(), v.end(), s.rng);
}

// "0-31,33,40-63"
std::string ranges(const std::vector<int>& v) {
  std::ostringstream o;
  for (size_t i = 0; i < v.size();) {
    size_t j = i;
    while (j + 1 < v.size() && v[j + 1] == v[j] + 1) ++j;
    o << (i ? "," : "") << v[i];
    if (j > i) o << "-" << v[j];
    i = j + 1;
  }
  return o.str();
}

std::string deadlock_report(const Grid& g) {
  std::ostringstream o;
  o << "deadlock: no thread can run.";
  for (const Block* b : g.active) {
    std::map<std::string, std::vector<int>> groups;
    for (const Fiber* f : b->fibers) {
      std::string key;
      switch (f->st) {
        case St::kBarrier: key = "at __syncthreads " + where(f->loc); break;
        case St::kCollective:
          key = std::string("at ") +
                (f->coll == Coll::kMma        ? "mma "
                 : f->coll == Coll::kLdmatrix ? "ldmatrix "
                 : f->coll == Coll::kShfl     ? "__shfl_sync "
                                              : "__syncwarp ") +
                where(f->loc);
          break;
        case St::kDone: key = "exited"; break;
        case St::kReady: key = "ready"; break;
      }
      groups[key].push_back(f->tid);
    }
    o << " Block (" << b->idx.x << "," << b->idx.y << "," << b->idx.z << "):";
    for (const auto& [key, tids] : groups)
      o << " " << tids.size() << " thread(s) " << ranges(tids) << " " << key << ";";
  }
  return o.str();
}

Block* start_block(Grid& g, unsigned linear, int slot_base) {
  auto* b = new Block();
  const unsigned gx = g.grid.x, gy = g.grid.y;
  b->idx = dim3(linear % gx, (linear / gx) % gy, linear / (gx * gy));
  const int nthreads = static_cast<int>(g.block.x * g.block.y * g.block.z);
  b->smem = std::make_unique<GuardedBuffer>("shared memory", g.smem_bytes, true, false);
  if (g.smem_bytes) std::memset(b->smem->data(), kPoison, g.smem_bytes);
  b->live = nthreads;
  b->warp_arrived.assign((nthreads + 31) / 32, 0);
  for (int t = 0; t < nthreads; ++t) {
    Fiber* f = g.slots[slot_base + t].get();
    f->block = b;
    f->tid = t;
    f->warp = t / 32;
    f->lane = t % 32;
    f->tidx = dim3(t % g.block.x, (t / g.block.x) % g.block.y, t / (g.block.x * g.block.y));
    f->st = St::kReady;
    f->coll = Coll::kNone;
    f->open.clear();
    f->groups.clear();
    f->gid = linear * static_cast<uint32_t>(nthreads) + static_cast<uint32_t>(t);
    f->ep = 1;
    f->hb.e.assign(1, {f->gid, 1u});
    f->fenced.e.clear();
    f->acquired.e.clear();
    init_context(f->ctx, f->stack_map + page_size(), kStackBytes, fiber_entry);
    b->fibers.push_back(f);
  }
  ++state().stats.blocks;
  state().stats.threads += nthreads;
  return b;
}

// Run every block of g; `resident_blocks` of them interleave at a time.
void run_blocks(Grid& g) {
  State& s = state();
  const unsigned total = g.grid.x * g.grid.y * g.grid.z;
  const int nthreads = static_cast<int>(g.block.x * g.block.y * g.block.z);
  const int resident = std::max(1, s.opt.resident_blocks);
  std::vector<unsigned> order(total);
  for (unsigned i = 0; i < total; ++i) order[i] = i;
  apply_order(order);
  std::vector<int> free_slots;  // slot bases
  for (int r = 0; r < resident; ++r) free_slots.push_back(r * nthreads);
  std::map<Block*, int> slot_of;
  size_t next = 0;
  std::vector<Fiber*> ready;
  for (;;) {
    while (!free_slots.empty() && next < order.size()) {
      const int base = free_slots.back();
      free_slots.pop_back();
      Block* b = start_block(g, order[next++], base);
      slot_of[b] = base;
      g.active.push_back(b);
    }
    if (g.active.empty()) return;
    ready.clear();
    for (Block* b : g.active)
      for (Fiber* f : b->fibers)
        if (f->st == St::kReady) ready.push_back(f);
    if (ready.empty()) fail(deadlock_report(g));
    // One fiber per step, chosen afresh after every yield: forward / reverse
    // run the lowest / highest ready thread as far as it can go (a thread
    // that is not made to wait runs ahead of the others), random picks any.
    Fiber* f = s.opt.order == Order::kForward   ? ready.front()
               : s.opt.order == Order::kReverse ? ready.back()
                                                : ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(s.rng)];
    g_cur = f;
    switch_context(g.main, f->ctx);
    g_cur = nullptr;
    if (!s.error.empty()) throw Failure(s.error);
    for (size_t i = 0; i < g.active.size();) {
      Block* b = g.active[i];
      if (b->live == 0) {
        free_slots.push_back(slot_of[b]);
        slot_of.erase(b);
        delete b;
        g.active.erase(g.active.begin() + static_cast<long>(i));
      } else {
        ++i;
      }
    }
  }
}

// ------------------------------------------------------------ faults

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void* uctx) {
  State* s = g_state;
  if (s != nullptr && s->in_grid && pthread_equal(pthread_self(), s->thread)) {
    s->fault_sig = sig;
    s->fault_addr = info->si_addr;
#if defined(__x86_64__)
    s->fault_pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
    s->fault_pc = static_cast<uintptr_t>(static_cast<ucontext_t*>(uctx)->uc_mcontext.pc);
#endif
    s->in_grid = 0;
    siglongjmp(s->fault_jmp, 1);
  }
  // not ours: hand it to whoever had it before
  struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  sigaction(sig, &old, nullptr);
  raise(sig);
}

// "file:line" of a code address, through addr2line on the shared object that
// holds it (run after the fault, outside the signal handler).
std::string source_line(uintptr_t pc) {
  Dl_info info{};
  if (pc == 0 || dladdr(reinterpret_cast<void*>(pc), &info) == 0 || info.dli_fname == nullptr)
    return "an unknown code address";
  const uintptr_t off = pc - reinterpret_cast<uintptr_t>(info.dli_fbase);
  char cmd[4096];
  std::snprintf(cmd, sizeof cmd, "addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(off));
  std::string out;
  if (FILE* p = popen(cmd, "r")) {
    char line[1024];
    std::vector<std::string> lines;
    while (std::fgets(line, sizeof line, p)) lines.emplace_back(line);
    pclose(p);
    // pairs of (function, file:line), innermost first; report the innermost outside the emulator's
    // own sources and the system headers (a store's operator=, an inlined memcpy)
    for (size_t i = 0; i + 1 < lines.size(); i += 2) {
      std::string fn = lines[i], loc = lines[i + 1];
      fn.erase(fn.find_last_not_of("\r\n") + 1);
      loc.erase(loc.find_last_not_of("\r\n") + 1);
      const bool inner = loc.find("/csrc/emu/") != std::string::npos || loc.rfind("/usr/", 0) == 0;
      if (out.empty() || !inner) out = loc + " (in " + fn + ")";
      if (!inner) break;
    }
  }
  if (out.empty() || out[0] == '?') {
    char buf[64];
    std::snprintf(buf, sizeof buf, "+0x%lx", static_cast<unsigned long>(off));
    out = std::string(info.dli_fname) + buf;
  }
  return out;
}

}  // namespace

// ================================================================ public API

GuardedBuffer::GuardedBuffer(const char* name, size_t bytes, bool writable, bool global) {
  const size_t pg = page_size();
  const size_t body = round_up(std::max<size_t>(bytes, 1), pg);
  map_len_ = pg + body + pg;
  void* m = mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw Failure(std::string("gsq emulator: cannot map ") + std::to_string(bytes) + " bytes");
  map_ = static_cast<unsigned char*>(m);
  mprotect(map_, pg, PROT_NONE);
  mprotect(map_ + pg + body, pg, PROT_NONE);
  if (writable && global) {
    // A writable device buffer's pages are a memory file mapped twice: during a launch the
    // kernel's view is closed (memory order, above) and the runtime goes through the second.
    const int fd = memfd_create("gsq-emu-buffer", MFD_CLOEXEC);
    void* view = MAP_FAILED;
    void* a = MAP_FAILED;
    if (fd >= 0 && ftruncate(fd, static_cast<off_t>(body)) == 0) {
      view = mmap(map_ + pg, body, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
      a = mmap(nullptr, body, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    }
    if (fd >= 0) close(fd);
    if (view == MAP_FAILED || a == MAP_FAILED) {
      if (a != MAP_FAILED) munmap(a, body);
      munmap(map_, map_len_);
      throw Failure("gsq emulator: cannot map a writable buffer twice (memfd_create)");
    }
    alias_ = static_cast<unsigned char*>(a);
    alias_len_ = body;
  }
  size_ = bytes;
  // The last byte sits against the guard page (16-byte aligned start: every
  // size the kernels use is a multiple of 16; a smaller tail could be read
  // past by up to 15 bytes without a fault).
  ptr_ = map_ + pg + body - round_up(bytes, 16);
  if (global && g_state != nullptr)
    g_state->buffers.push_back(Buffer{ptr_, ptr_ + bytes, name, writable, map_, map_ + map_len_,
                                      alias_ ? alias_ + (ptr_ - (map_ + pg)) : nullptr, map_ + pg, body});
}

GuardedBuffer::~GuardedBuffer() {
  if (g_state != nullptr) {
    auto& v = g_state->buffers;
    v.erase(std::remove_if(v.begin(), v.end(), [&](const Buffer& b) { return b.lo == ptr_; }), v.end());
  }
  if (alias_ != nullptr) munmap(alias_, alias_len_);
  munmap(map_, map_len_);
}

void GuardedBuffer::seal() {
  const size_t pg = page_size();
  mprotect(map_ + pg, map_len_ - 2 * pg, PROT_READ);
  if (g_state != nullptr)
    for (Buffer& b : g_state->buffers)
      if (b.lo == ptr_) b.writable = false;
}

Session::Session(const Options& opt) {
  if (g_state != nullptr) throw Failure("gsq emulator: a Session is already active");
  g_state = new State();
  g_state->opt = opt;
  g_state->rng.seed(opt.seed);
  g_state->thread = pthread_self();
}

Session::~Session() {
  delete g_state;
  g_state = nullptr;
}

const std::string& Session::error() const { return g_state->error; }
const std::vector<LaunchRecord>& Session::launches() const { return g_state->launches; }
const Stats& Session::stats() const { return g_state->stats; }

const dim3& thread_idx() { return cur("threadIdx")->tidx; }
const dim3& block_idx() { return cur("blockIdx")->block->idx; }
const dim3& block_dim() {
  cur("blockDim");
  return state().grid->block;
}
const dim3& grid_dim() {
  cur("gridDim");
  return state().grid->grid;
}
int sm_count() { return state().opt.sms; }
int smem_per_sm() { return state().opt.smem_per_sm; }
cudaError_t last_error() {
  const cudaError_t e = state().last_error;
  state().last_error = cudaSuccess;
  return e;
}
const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (see the emulator's message)";
  }
  return "unknown error";
}

// Demangled name of the function at `fn` (exported symbols of this library).
std::string function_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : info.dli_sname;
  std::free(d);
  return out;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, KernelBody body) {
  State& s = state();
  if (!s.error.empty()) return cudaErrorLaunchFailure;  // an earlier launch failed
  s.launches.push_back(LaunchRecord{function_name(kernel), grid, block, smem_bytes});
  const long nthreads = static_cast<long>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535 || smem_bytes + 1024 > static_cast<size_t>(s.opt.smem_per_sm)) {
    s.last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  if (s.opt.dry_run) return cudaSuccess;
  Grid g;
  g.grid = grid;
  g.block = block;
  g.smem_bytes = smem_bytes;
  g.body = body;
  const int resident = std::max(1, s.opt.resident_blocks);
  const size_t pg = page_size();
  for (long i = 0; i < resident * nthreads; ++i) {
    auto f = std::make_unique<Fiber>();
    void* m = mmap(nullptr, pg + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw Failure("gsq emulator: cannot map fiber stacks");
    f->stack_map = static_cast<unsigned char*>(m);
    mprotect(f->stack_map, pg, PROT_NONE);  // stacks grow down into the guard page
    g.slots.push_back(std::move(f));
  }
  s.grid = &g;
  s.store_pc = 0;
  const size_t grid_threads = static_cast<size_t>(grid.x) * grid.y * grid.z * nthreads;
  g.fence_epoch.assign(grid_threads, 0);
  g.fence_loc.assign(grid_threads, Loc{});

  // Faults on the fibers (guard pages) jump back here, on the host stack.
  stack_t alt{}, old_alt{};
  std::vector<unsigned char> alt_stack(64 * 1024);
  alt.ss_sp = alt_stack.data();
  alt.ss_size = alt_stack.size();
  sigaltstack(&alt, &old_alt);
  struct sigaction sa{};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  auto restore = [&] {
    s.in_grid = 0;
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
    for (Block* b : g.active) delete b;
    g.active.clear();
    for (auto& f : g.slots) munmap(f->stack_map, pg + kStackBytes);
    for (const Tracked& t : g.tracked) {
      const Buffer& b = s.buffers[t.buffer];
      mprotect(b.body, b.body_len, PROT_READ | PROT_WRITE);
    }
    g.tracked.clear();
    s.grid = nullptr;
    g_cur = nullptr;
  };
  // the writable buffers: closed to the kernel's plain accesses, shadowed for the memory-order checks
  for (size_t i = 0; i < s.buffers.size(); ++i) {
    const Buffer& b = s.buffers[i];
    if (b.alias == nullptr) continue;
    g.tracked.push_back(Tracked{i, std::vector<Shadow>((b.hi - b.lo + 1) / 2)});
    mprotect(b.body, b.body_len, PROT_NONE);
  }

  if (sigsetjmp(s.fault_jmp, 1) != 0) {
    std::ostringstream o;
    o << (s.fault_sig == SIGBUS ? "bus error" : "invalid memory access") << " at "
      << source_line(s.store_pc ? s.store_pc - 1 : s.fault_pc) << ": " << describe_address(s.fault_addr);
    if (g_cur != nullptr) o << ", by " << who(g_cur) << " (last emulated call at " << where(g_cur->loc) << ")";
    const auto* fa = static_cast<const unsigned char*>(s.fault_addr);
    for (const Tracked& t : g.tracked) {
      const Buffer& b = s.buffers[t.buffer];
      if (fa >= b.body && fa < b.body + b.body_len)
        o << ". A plain load, or a store of a type the emulator does not intercept, of memory the kernel "
             "writes: the emulator checks its memory order and sees it only through stores of the CUDA vector "
             "and 16-bit types (operator=), ld.global.cg and atomics (docs/EMULATOR.md)";
    }
    if (s.error.empty()) s.error = o.str();
    restore();
    s.last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  s.in_grid = 1;
  try {
    run_blocks(g);
  } catch (const Failure& e) {
    if (s.error.empty()) s.error = e.what();
    restore();
    s.last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  restore();
  return cudaSuccess;
}

// ------------------------------------------------------ barriers and fences

void syncthreads(Loc loc) {
  Fiber* f = cur("__syncthreads");
  Block& b = *f->block;
  ++state().stats.barriers;
  if (b.at_barrier == 0) {
    b.barrier_loc = loc;
  } else if (b.barrier_loc.line != loc.line || std::strcmp(b.barrier_loc.file, loc.file) != 0) {
    fail("divergent __syncthreads: " + who(f) + " is at " + where(loc) + " while other threads wait at " +
         where(b.barrier_loc));
  }
  f->st = St::kBarrier;
  f->loc = loc;
  if (++b.at_barrier == b.live) release_barrier(b);
  yield(f);
}

// fence.sc.gpu (membar.gl): completes the acquire of what this thread's atomics observed, and
// covers everything the thread now knows for its (or a barrier-ordered thread's) next strong write.
void threadfence(Loc loc) {
  Fiber* f = cur("__threadfence");
  f->loc = loc;
  f->hb.join(f->acquired);
  f->acquired.e.clear();
  f->fenced = f->hb;
  Grid& g = *state().grid;
  g.fence_epoch[f->gid] = f->ep;
  g.fence_loc[f->gid] = loc;
  tick(f);
  yield(f);  // a point where other threads (and blocks) may run
}

// ------------------------------------------------------------ collectives

namespace {

// All 32 lanes of f's warp are at a collective: check they agree, compute,
// and make them ready again.
void resolve_warp(Fiber* last);

void arrive(Fiber* f, Coll c, Loc loc) {
  Block& b = *f->block;
  f->st = St::kCollective;
  f->coll = c;
  f->loc = loc;
  const int lanes = std::min(32, static_cast<int>(b.fibers.size()) - 32 * f->warp);
  if (++b.warp_arrived[f->warp] == lanes) resolve_warp(f);
  yield(f);
}

uint16_t half_bits(uint32_t reg, int half) { return static_cast<uint16_t>(reg >> (16 * half)); }

double decode16(uint16_t bits, MmaType t) {
  return t == MmaType::kF16 ? bits16_to_double(bits, 10, 5) : bits16_to_double(bits, 7, 8);
}

// 9.7.14.5.8: the m16n8k16 fragments, groupID = lane >> 2, threadID_in_group = lane % 4.
void do_mma(Fiber* const* lanes) {
  const MmaType type = lanes[0]->mma_type;
  double A[16][16], B[16][8];
  float C[16][8];
  for (int l = 0; l < 32; ++l) {
    const Fiber* f = lanes[l];
    const int group = l >> 2, tig = l % 4;
    for (int i = 0; i < 8; ++i) {  // a0..a7, two per register, low half first
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = decode16(half_bits(f->mma_a[i / 2], i % 2), type);
    }
    for (int i = 0; i < 4; ++i) {  // b0..b3
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][group] = decode16(half_bits(f->mma_b[i / 2], i % 2), type);
    }
    for (int i = 0; i < 4; ++i) {  // c0..c3
      const int row = i < 2 ? group : group + 8;
      C[row][tig * 2 + (i & 1)] = f->mma_c ? f->mma_c[i] : 0.f;
    }
  }
  // Products of 16-bit values are exact in double; the sum is rounded once to
  // fp32 (the hardware's accumulation order and rounding are unspecified).
  float D[16][8];
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      double acc = C[r][c];
      for (int kk = 0; kk < 16; ++kk) acc += A[r][kk] * B[kk][c];
      D[r][c] = static_cast<float>(acc);
    }
  for (int l = 0; l < 32; ++l) {
    const int group = l >> 2, tig = l % 4;
    for (int i = 0; i < 4; ++i) lanes[l]->mma_d[i] = D[i < 2 ? group : group + 8][tig * 2 + (i & 1)];
  }
}

// 9.7.14.5.15: lane 8m + r addresses row r of matrix m; register m of lane l
// gets row l / 4, columns 2 (l % 4), +1 (.trans: the transposed element pair).
void do_ldmatrix(Fiber* const* lanes) {
  const int num = lanes[0]->ld_num;
  const bool trans = lanes[0]->ld_trans;
  uint16_t M[4][8][8];
  for (int m = 0; m < num; ++m)
    for (int r = 0; r < 8; ++r) {
      const Fiber* src = lanes[8 * m + r];
      const unsigned char* p = src->ld_addr;
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        fail("ldmatrix: " + who(src) + " gives a row address not 16-byte aligned, at " + where(src->loc));
      if (!in_smem(src, p, 16))
        fail("ldmatrix: " + who(src) + " gives a row outside shared memory (" + describe_address(p) + "), at " +
             where(src->loc));
      std::memcpy(M[m][r], p, 16);
    }
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < num; ++m) {
      const int a = l >> 2, b = 2 * (l % 4);
      const uint16_t lo = trans ? M[m][b][a] : M[m][a][b];
      const uint16_t hi = trans ? M[m][b + 1][a] : M[m][a][b + 1];
      lanes[l]->ld_d[m] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
    }
}

void resolve_warp(Fiber* last) {
  Block& b = *last->block;
  Fiber* lanes[32] = {};
  const int first = 32 * last->warp;
  const int n = std::min<int>(32, static_cast<int>(b.fibers.size()) - first);
  for (int i = 0; i < n; ++i) lanes[i] = b.fibers[first + i];
  const Fiber* l0 = lanes[0];
  for (int i = 0; i < n; ++i) {
    const Fiber* f = lanes[i];
    if (f->coll != l0->coll || f->loc.line != l0->loc.line || std::strcmp(f->loc.file, l0->loc.file) != 0 ||
        (f->coll == Coll::kMma && (f->mma_type != l0->mma_type || !f->mma_c != !l0->mma_c)) ||
        (f->coll == Coll::kLdmatrix && (f->ld_num != l0->ld_num || f->ld_trans != l0->ld_trans)))
      fail("divergent warp collective: " + who(f) + " is at " + where(f->loc) + " while lane 0 of its warp is at " +
           where(l0->loc));
  }
  if (n != 32)
    fail("warp collective at " + where(l0->loc) + " in a warp of " + std::to_string(n) + " threads (needs 32)");
  if (l0->coll == Coll::kShfl) {
    for (int i = 0; i < n; ++i) lanes[i]->shfl_result = lanes[lanes[i]->shfl_src & 31]->shfl_value;
    // memory order: each lane learns what its source lane knew (clocks as at arrival)
    std::vector<VClock> hb(n), fenced(n), acquired(n);
    for (int i = 0; i < n; ++i) hb[i] = lanes[i]->hb, fenced[i] = lanes[i]->fenced, acquired[i] = lanes[i]->acquired;
    for (int i = 0; i < n; ++i) {
      const int src = lanes[i]->shfl_src & 31;
      lanes[i]->hb.join(hb[src]);
      lanes[i]->fenced.join(fenced[src]);
      lanes[i]->acquired.join(acquired[src]);
      tick(lanes[i]);
    }
  } else if (l0->coll == Coll::kSyncwarp) {
    join_all(std::vector<Fiber*>(lanes, lanes + n));  // bar.warp.sync orders memory among the lanes
  } else if (l0->coll == Coll::kMma) {
    do_mma(lanes);
    ++state().stats.mma;
  } else if (l0->coll == Coll::kLdmatrix) {
    do_ldmatrix(lanes);
    ++state().stats.ldmatrix;
  }
  for (int i = 0; i < n; ++i) {
    lanes[i]->st = St::kReady;
    lanes[i]->coll = Coll::kNone;
  }
  b.warp_arrived[last->warp] = 0;
}

}  // namespace

void mma_m16n8k16(MmaType type, float* d, const uint32_t* a, const uint32_t* b, const float* c, Loc loc) {
  Fiber* f = cur("mma");
  f->mma_type = type;
  f->mma_c = c;
  f->mma_d = d;
  f->mma_a = a;
  f->mma_b = b;
  arrive(f, Coll::kMma, loc);
}

void ldmatrix(int num, bool trans, uint32_t* d, const void* smem_row, Loc loc) {
  Fiber* f = cur("ldmatrix");
  f->ld_num = num;
  f->ld_trans = trans;
  f->ld_d = d;
  f->ld_addr = static_cast<const unsigned char*>(smem_row);
  arrive(f, Coll::kLdmatrix, loc);
}

uint32_t shfl_idx(unsigned mask, uint32_t value, int src_lane, Loc loc) {
  Fiber* f = cur("__shfl_sync");
  if (mask != 0xffffffffu) fail("__shfl_sync with a partial mask is not emulated, at " + where(loc));
  f->shfl_value = value;
  f->shfl_src = src_lane;
  arrive(f, Coll::kShfl, loc);
  return f->shfl_result;
}

void syncwarp(unsigned mask, Loc loc) {
  Fiber* f = cur("__syncwarp");
  if (mask != 0xffffffffu) fail("__syncwarp with a partial mask is not emulated, at " + where(loc));
  arrive(f, Coll::kSyncwarp, loc);
}

// ------------------------------------------------------------ cp.async

void cp_async(void* smem, const void* gmem, int cp_size, int src_bytes, Loc loc) {
  Fiber* f = cur("cp.async");
  f->loc = loc;
  ++state().stats.cp_async;
  auto bad = [&](const std::string& what) { fail("cp.async at " + where(loc) + " by " + who(f) + ": " + what); };
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) bad("cp-size must be 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > cp_size) bad("src-size " + std::to_string(src_bytes) + " > cp-size");
  if (reinterpret_cast<uintptr_t>(smem) % cp_size) bad("destination not aligned to its cp-size");
  if (reinterpret_cast<uintptr_t>(gmem) % cp_size) bad("source not aligned to its cp-size");
  if (!in_smem(f, smem, cp_size)) bad("destination outside shared memory (" + describe_address(smem) + ")");
  if (src_bytes > 0 && find_buffer(gmem, src_bytes) == nullptr)
    bad("source " + std::to_string(src_bytes) + " bytes at " + describe_address(gmem));
  auto* dst = static_cast<unsigned char*>(smem);
  std::memset(dst, kPoison, cp_size);  // reading it before the wait sees NaN
  auto* src = static_cast<const unsigned char*>(gmem);
  if (Tracked* t = src_bytes > 0 ? tracked_at(gmem, src_bytes) : nullptr) {
    // memory the kernel writes: the read must be ordered after its stores when it is issued (and
    // the copy reads through the runtime's mapping)
    check_ordered(f, *t, gmem, src_bytes, "cp.async", loc, 0);
    src = alias_of(*t, gmem);
  }
  f->open.push_back(CopyOp{dst, src, cp_size, src_bytes});
}

void cp_async_commit(Loc loc) {
  Fiber* f = cur("cp.async.commit_group");
  f->loc = loc;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}

void cp_async_wait(int pending, Loc loc) {
  Fiber* f = cur("cp.async.wait_group");
  f->loc = loc;
  while (static_cast<int>(f->groups.size()) > pending) {
    for (const CopyOp& op : f->groups.front()) {
      std::memcpy(op.dst, op.src, op.src_bytes);
      std::memset(op.dst + op.src_bytes, 0, op.size - op.src_bytes);
    }
    f->groups.pop_front();
  }
  yield(f);
}

unsigned char* dynamic_smem() { return cur("dynamic shared memory")->block->smem->data(); }

// ------------------------------------------------------------ checked memory ops

void check_global_read(const void* p, size_t bytes, bool nc, Loc loc) {
  Fiber* f = cur("global load");
  f->loc = loc;
  if (reinterpret_cast<uintptr_t>(p) % bytes)
    fail("misaligned " + std::to_string(bytes) + "-byte global load at " + where(loc) + " by " + who(f));
  const Buffer* b = find_buffer(p, bytes);
  if (b == nullptr)
    fail("global load of " + std::to_string(bytes) + " bytes at " + where(loc) + " by " + who(f) + ": " +
         describe_address(p));
  if (nc && b->writable)
    fail("ld.global.nc at " + where(loc) + " by " + who(f) + " reads buffer " + b->name +
         ", which the kernel may write (the non-coherent path is for read-only data)");
}

// An atomic RMW (relaxed, gpu scope): range-checked, then its strong read observes every release
// on the location and its strong write releases what this thread's fences covered (memory order,
// above). Returns where to apply it (the runtime's mapping of a closed buffer). Shared-memory
// atomics are range-checked only (the kernels use none; no memory-order tracking there).
void* atomic_access(void* p, size_t bytes, Loc loc) {
  Fiber* f = cur("atomic");
  f->loc = loc;
  if (reinterpret_cast<uintptr_t>(p) % bytes) fail("misaligned atomic at " + where(loc) + " by " + who(f));
  if (in_smem(f, p, bytes)) return p;
  const Buffer* b = find_buffer(p, bytes);
  if (b == nullptr || !b->writable)
    fail("atomic at " + where(loc) + " by " + who(f) + " outside shared memory and every writable buffer: " +
         describe_address(p));
  Grid& g = *state().grid;
  const auto key = reinterpret_cast<uintptr_t>(p);
  VClock& rel = g.released[key];
  f->acquired.join(rel);
  rel.join(f->fenced);
  g.released_at[key] = loc;
  tick(f);
  Tracked* t = tracked_at(p, bytes);
  return t != nullptr ? alias_of(*t, p) : p;
}

// A plain store of a CUDA vector or 16-bit type (their operator=). Into a writable global buffer:
// checked against the earlier stores there (two unordered stores race), recorded, and written
// through the runtime's mapping. Anywhere else (registers, shared memory, host code): written.
void store(void* p, const void* src, size_t bytes) {
  const auto pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  State* s = g_state;
  Fiber* f = g_cur;
  Tracked* t = f != nullptr && s != nullptr ? tracked_at(p, bytes) : nullptr;
  if (s != nullptr) s->store_pc = pc;  // a fault in the copy (either side) is reported at the store's line
  if (t == nullptr && f != nullptr && s != nullptr && s->grid != nullptr) {
    const auto* a = static_cast<const unsigned char*>(p);
    for (const Tracked& other : s->grid->tracked) {  // partly in, or past the end of, a closed buffer
      const Buffer& b = s->buffers[other.buffer];
      if (a < b.map_hi && a + bytes > b.map_lo)
        fail("invalid memory access at " + source_line(pc - 1) + ": a " + std::to_string(bytes) + "-byte store at " +
             describe_address(p) + ", by " + who(f));
    }
  }
  if (t == nullptr) {
    std::memcpy(p, src, bytes);
  } else {
    check_ordered(f, *t, p, bytes, nullptr, f->loc, pc);
    const size_t off = static_cast<const unsigned char*>(p) - s->buffers[t->buffer].lo;
    for (size_t i = off / 2; i < (off + bytes + 1) / 2; ++i) t->shadow[i] = Shadow{f->gid + 1, f->ep, pc};
    std::memcpy(alias_of(*t, p), src, bytes);
  }
  if (s != nullptr) s->store_pc = 0;
}

// ld.global (not .nc) of `bytes` at p into dst: range-checked; from a writable buffer, the bytes
// must have been stored by this thread, before the launch, or by a store ordered before this load.
void global_load(void* dst, const void* p, size_t bytes, Loc loc) {
  check_global_read(p, bytes, false, loc);
  if (Tracked* t = tracked_at(p, bytes)) {
    check_ordered(g_cur, *t, p, bytes, "ld.global.cg", loc, 0);
    std::memcpy(dst, alias_of(*t, p), bytes);
  } else {
    std::memcpy(dst, p, bytes);
  }
}

void check_memset(const void* p, size_t bytes, Loc loc) {
  const Buffer* b = find_buffer(p, bytes);
  if (b == nullptr || !b->writable)
    fail("cudaMemsetAsync of " + std::to_string(bytes) + " bytes at " + where(loc) + " outside every writable buffer: " +
         describe_address(p));
}

// ------------------------------------------------------------ 16-bit formats

double bits16_to_double(uint16_t h, int mbits, int ebits) {
  const int sign = h >> 15;
  const int e = (h >> mbits) & ((1 << ebits) - 1);
  const int m = h & ((1 << mbits) - 1);
  const int bias = (1 << (ebits - 1)) - 1;
  double v;
  if (e == (1 << ebits) - 1)
    v = m ? std::nan("") : INFINITY;
  else if (e == 0)
    v = std::ldexp(static_cast<double>(m), 1 - bias - mbits);
  else
    v = std::ldexp(static_cast<double>(m | (1 << mbits)), e - bias - mbits);
  return sign ? -v : v;
}

uint16_t round_to_bits16(double x, int mbits, int ebits) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const int emax = (1 << ebits) - 1, bias = (1 << (ebits - 1)) - 1;
  if (std::isnan(x)) return static_cast<uint16_t>((emax << mbits) | (1 << (mbits - 1)));  // canonical quiet NaN
  const double a = std::fabs(x);
  if (std::isinf(a)) return sign | static_cast<uint16_t>(emax << mbits);
  if (a == 0) return sign;
  int e2;
  std::frexp(a, &e2);  // a = f * 2^e2, f in [0.5, 1): unbiased exponent e2 - 1
  int exp_unb = e2 - 1;
  if (exp_unb < 1 - bias) exp_unb = 1 - bias;  // subnormal range: fixed quantum
  const double quantum = std::ldexp(1.0, exp_unb - mbits);
  // a / quantum is exact (power-of-two scaling); nearest-even to an integer
  const double q = std::nearbyint(a / quantum);  // default rounding mode: to nearest, ties to even
  // q in [0, 2^(mbits+1)]; the encoding is continuous across the subnormal
  // boundary and the mantissa carry, so bits = (exponent field << mbits) + fraction.
  const uint64_t qi = static_cast<uint64_t>(q);
  uint64_t bits;
  if (exp_unb == 1 - bias && qi < (1ull << mbits))
    bits = qi;  // subnormal
  else
    bits = (static_cast<uint64_t>(exp_unb + bias) << mbits) + (qi - (1ull << mbits));
  if (bits >= static_cast<uint64_t>(emax) << mbits) return sign | static_cast<uint16_t>(emax << mbits);  // overflow
  return sign | static_cast<uint16_t>(bits);
}

double fma_round_odd(double a, double b, double c) {
  const int old = std::fegetround();
  std::fesetround(FE_TOWARDZERO);
  std::feclearexcept(FE_INEXACT);
  volatile double r = std::fma(a, b, c);
  const bool inexact = std::fetestexcept(FE_INEXACT) != 0;
  std::fesetround(old);
  double out = r;
  if (inexact && std::isfinite(out)) {
    uint64_t u;
    std::memcpy(&u, &out, 8);
    u |= 1;  // round to odd: the sticky bit marks "strictly between"
    std::memcpy(&out, &u, 8);
  }
  return out;
}

}  // namespace gsq_emu

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t, gsq_emu::Loc loc) {
  try {
    // a device operation of its own: recorded like a launch
    gsq_emu::state().launches.push_back(gsq_emu::LaunchRecord{"cudaMemsetAsync", dim3(), dim3(), bytes});
    gsq_emu::check_memset(p, bytes, loc);
  } catch (const std::exception&) {
    return cudaErrorInvalidValue;
  }
  std::memset(p, value, bytes);
  return cudaSuccess;
}
