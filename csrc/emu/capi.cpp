// C entry points of the emulator library (loaded with ctypes by
// gsq_vllm/cuda_emu.py): run the real GSQ GEMM host code and kernels
// (csrc/gsq_gemm.cu, compiled as C++) on CPU fibers.
//
// gsq_emu_gemm does what the torch binding does on a GPU -- the launch plan
// and split-K workspace come from the same host code (gsq_gemm_plan,
// gsq_gemm_launch) -- but every buffer is a fresh guarded mapping: inputs are
// copied in and made read-only, the output and workspace start poisoned
// (all ones: NaN), so an element the kernel fails to write stays NaN.

#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>

#include "../gsq_gemm.h"
#include "runtime.h"

extern "C" {

struct GsqEmuOptions {
  int sms;
  int smem_per_sm;
  int order;  // 0 forward, 1 reverse, 2 seeded random
  unsigned long long seed;
  int resident_blocks;
  int dry_run;  // record the launches only
};

struct GsqEmuStats {
  long long blocks, threads, switches, mma, ldmatrix, cp_async, barriers;
};

// Returns 0 on success; otherwise writes a message to err (err_len bytes). `launches` (may be
// null) receives one line per kernel launch: "name|gx,gy,gz|bx,by,bz|dynamic smem bytes".
int gsq_emu_gemm(const void* a, size_t a_bytes, const void* b, size_t b_bytes, const void* s, size_t s_bytes,
                 void* c, size_t c_bytes, int m, int n, int k, int bits, int group_size, int bf16,
                 const GsqEmuOptions* opt, GsqEmuStats* stats, char* launches, size_t launches_len, char* err,
                 size_t err_len) {
  using namespace gsq_emu;
  auto report = [&](const std::string& msg) {
    if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", msg.c_str());
    return 1;
  };
  try {
    Options o;
    o.sms = opt->sms;
    o.smem_per_sm = opt->smem_per_sm;
    o.order = static_cast<Order>(opt->order);
    o.seed = opt->seed;
    o.resident_blocks = opt->resident_blocks;
    o.dry_run = opt->dry_run != 0;
    Session session(o);
    GuardedBuffer ga("A", a_bytes, false), gb("B", b_bytes, false), gs("S", s_bytes, false);
    std::memcpy(ga.data(), a, a_bytes);
    std::memcpy(gb.data(), b, b_bytes);
    std::memcpy(gs.data(), s, s_bytes);
    ga.seal();
    gb.seal();
    gs.seal();
    GuardedBuffer gc("C", c_bytes, true);
    std::memset(gc.data(), 0xFF, c_bytes);
    const GsqDevice dev{o.sms, o.smem_per_sm};
    const GsqGemmPlan plan = gsq_gemm_plan(m, n, k, bits, group_size, dev);
    std::unique_ptr<GuardedBuffer> ws, counters;
    if (plan.workspace_bytes) {  // scratch: any contents, so poisoned
      ws = std::make_unique<GuardedBuffer>("workspace", plan.workspace_bytes, true);
      std::memset(ws->data(), 0xFF, plan.workspace_bytes);
    }
    if (plan.counter_bytes) {  // zero before the first launch, as the binding keeps them
      counters = std::make_unique<GuardedBuffer>("counters", plan.counter_bytes, true);
      std::memset(counters->data(), 0, plan.counter_bytes);
    }
    const cudaError_t e = gsq_gemm_launch(
        ga.data(), gb.data(), gs.data(), gc.data(), ws ? ws->data() : nullptr, plan.workspace_bytes,
        counters ? reinterpret_cast<int*>(counters->data()) : nullptr, plan.counter_bytes, m, n, k, bits,
        group_size, bf16 != 0, dev, nullptr);
    if (stats != nullptr) {
      const Stats& st = session.stats();
      *stats = GsqEmuStats{st.blocks, st.threads, st.switches, st.mma, st.ldmatrix, st.cp_async, st.barriers};
    }
    if (launches != nullptr && launches_len > 0) {
      std::string text;
      for (const LaunchRecord& r : session.launches())
        text += r.kernel + "|" + std::to_string(r.grid.x) + "," + std::to_string(r.grid.y) + "," +
                std::to_string(r.grid.z) + "|" + std::to_string(r.block.x) + "," + std::to_string(r.block.y) +
                "," + std::to_string(r.block.z) + "|" + std::to_string(r.dynamic_smem_bytes) + "\n";
      std::snprintf(launches, launches_len, "%s", text.c_str());
    }
    if (e != cudaSuccess)
      return report(session.error().empty() ? std::string("gsq_gemm_launch: ") + cudaGetErrorString(e)
                                            : session.error());
    if (counters && !o.dry_run)
      for (size_t i = 0; i < plan.counter_bytes / sizeof(int); ++i)
        if (reinterpret_cast<const int*>(counters->data())[i] != 0)
          return report("split-K counter " + std::to_string(i) + " is " +
                        std::to_string(reinterpret_cast<const int*>(counters->data())[i]) +
                        " after the launch (every launch must leave the counters at zero)");
    std::memcpy(c, gc.data(), c_bytes);
    return 0;
  } catch (const std::exception& ex) {
    return report(ex.what());
  }
}

// The launch plan gsq_gemm_launch uses for this problem on a device of `sms` SMs with
// `smem_per_sm` bytes of shared memory each: out = {token_tiles, grid_x, grid_y, splits, warps},
// bytes = {workspace, counters}.
void gsq_emu_plan(int m, int n, int k, int bits, int group_size, int sms, int smem_per_sm, int* out, size_t* bytes) {
  const GsqGemmPlan p = gsq_gemm_plan(m, n, k, bits, group_size, GsqDevice{sms, smem_per_sm});
  out[0] = p.token_tiles, out[1] = p.grid_x, out[2] = p.grid_y, out[3] = p.splits, out[4] = p.warps;
  bytes[0] = p.workspace_bytes, bytes[1] = p.counter_bytes;
}

// The emulator's 16-bit arithmetic, exposed for its own tests:
// op 0: round(x) (a double given as bits of a, b, c unused), 1: a * b,
// 2: a + b, 3: a - b, 4: fma(a, b, c); bf16 selects bfloat16 over binary16.
unsigned gsq_emu_half_op(int op, unsigned a, unsigned b, unsigned c, double x, int bf16) {
  if (bf16) {
    const __nv_bfloat16 ha{static_cast<uint16_t>(a)}, hb{static_cast<uint16_t>(b)}, hc{static_cast<uint16_t>(c)};
    switch (op) {
      case 0: return __float2bfloat16_rn(static_cast<float>(x)).__x;
      case 1: return __hmul(ha, hb).__x;
      case 2: return __hadd(ha, hb).__x;
      case 3: return __hsub(ha, hb).__x;
      case 4: return __hfma(ha, hb, hc).__x;
      case 5: return gsq_emu::from_double<__nv_bfloat16>(x).__x;
    }
  } else {
    const __half ha{static_cast<uint16_t>(a)}, hb{static_cast<uint16_t>(b)}, hc{static_cast<uint16_t>(c)};
    switch (op) {
      case 0: return __float2half_rn(static_cast<float>(x)).__x;
      case 1: return __hmul(ha, hb).__x;
      case 2: return __hadd(ha, hb).__x;
      case 3: return __hsub(ha, hb).__x;
      case 4: return __hfma(ha, hb, hc).__x;
      case 5: return gsq_emu::from_double<__half>(x).__x;
    }
  }
  return 0xFFFFFFFFu;
}

}  // extern "C"
