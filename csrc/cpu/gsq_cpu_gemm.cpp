// Fused dequantize + GEMM for GSQ 2/3-bit weights on CPU, with the SIMD kernel chosen at run time.
//
// y[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * (u[n, k] - offset)
//
// Several kernels compute it, one picked when the library loads (cpuid, and for AMX the
// kernel's permission to use the tiles) so one build runs well on every x86-64 machine;
// GSQ_CPU_ISA=NAME forces one, set_isa() switches (tests and benchmarks compare them on one machine):
//   amx: AMX bf16 tiles (isa_amx.cpp), bf16 activations, from Sapphire Rapids on;
//   avx512bf16: vdpbf16ps dot products (isa_avx512bf16.cpp), bf16 activations;
//   avx512, avx2: gemm_simd.h, compiled twice (isa_avx512.cpp, isa_avx2.cpp);
//   avx512vnni, avx2int8: int8 activations (isa_avx512vnni.cpp, isa_avx2int8.cpp), opt-in only;
//   generic: the portable loop below, compiled for the baseline ISA, kept as their reference.
//
// The generic kernel: per (row n, group g) the group's unsigned codes u are unpacked once into a small float buffer
// as signed values u - offset, then dotted with every activation row m. The dot products go into
// kLanes independent partial sums (fixed-size arrays the compiler maps onto SIMD registers, so
// nothing depends on reassociating a float reduction); each group's partial sums are scaled by
// s[n, g] into the row's lane accumulators, and the lanes are summed once per output element.
// G and the bit width are template parameters so every inner loop has a compile-time trip count.
//
// Layout (see gsq_vllm/cpu_gemm.py): lo uint8 [N, K/G, G/4], byte j of a
// group holds codes j + i*G/4 at bits 2i; hi uint8 [N, K/G, G/8] (3-bit),
// bit 2 of code c at bit c of the group's plane (little-endian 32-bit words). x float32 [M, K],
// scales float32 [N, K/G]. Returns float32 [M, N]. Parallel over N.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../gsq_rules_py.h"
#include "gemm_args.h"
#include "tl_args.h"

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

extern GemmRowsFn gsq_gemm_rows_amx;     // isa_amx.cpp
extern PackXFn gsq_pack_x_amx;
extern GemmRowsFn gsq_gemm_rows_avx2;    // isa_avx2.cpp
extern GemmRowsFn gsq_gemm_rows_avx512;  // isa_avx512.cpp
extern GemmRowsFn gsq_gemm_rows_avx512bf16;  // isa_avx512bf16.cpp
extern GemmRowsFn gsq_gemm_rows_avx512vnni;  // isa_avx512vnni.cpp
extern GemmRowsFn gsq_gemm_rows_avx2int8;    // isa_avx2int8.cpp
extern DequantRowsFn gsq_dequant_rows_avx2;
extern DequantRowsFn gsq_dequant_rows_avx512;
extern DenseRowsFn gsq_dense_rows_avx2;
extern DenseRowsFn gsq_dense_rows_avx512;
extern DenseInt8RowsFn gsq_dense_int8_rows_avx2;  // dense_int8_avx2.cpp
extern DenseInt8RowsFn gsq_dense_int8_rows_avx512vnni;  // dense_int8_avx512vnni.cpp
extern TlKernel gsq_tl_avx2;    // tl_avx2.cpp: table-lookup decode kernels (tl_kernel.h)
extern TlKernel gsq_tl_avx512;  // tl_avx512.cpp
extern TlKernel gsq_tl_avx512vbmi;  // tl_avx512vbmi.cpp

namespace {

#include "kernel_common.h"  // with_layout (its bf16 helpers are for the ISA files)

constexpr int kMaxRows = 64;
constexpr int64_t kAmxMinRows = 3;  // fewer rows of x take the avx512bf16 kernel (see gemm)
constexpr int kLanes = 16;  // one AVX-512 register of float32 (two AVX2 registers)

template <int G, bool Three>
inline void unpack_group(const uint8_t* lo, const uint8_t* hi, float* w) {
  constexpr int Q = G / 4;
  constexpr int offset = Three ? 4 : 2;
  int32_t u[G];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < Q; ++j) u[i * Q + j] = (lo[j] >> (2 * i)) & 3;
  if constexpr (Three) {
    for (int t = 0; t < G / 32; ++t) {
      uint32_t word;
      std::memcpy(&word, hi + 4 * t, 4);  // unaligned-safe load; little-endian like the repack
      for (int b = 0; b < 32; ++b) u[32 * t + b] |= static_cast<int32_t>((word >> b) & 1u) << 2;
    }
  }
  for (int k = 0; k < G; ++k) w[k] = static_cast<float>(u[k] - offset);
}

template <int G, bool Three>
void gemm_rows(const float* x, const uint8_t* lo, const uint8_t* hi, const float* scales, float* y,
               int64_t M, int64_t N, int64_t NG, int64_t n0, int64_t n1) {
  constexpr int Q = G / 4, E = G / 8;
  static_assert(G % kLanes == 0, "group size must be a multiple of kLanes");
  const int64_t K = NG * G;
  alignas(64) float w[G];
  alignas(64) float acc[kMaxRows][kLanes];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < kLanes; ++j) acc[m][j] = 0.f;
    for (int64_t g = 0; g < NG; ++g) {
      unpack_group<G, Three>(lo + (n * NG + g) * Q, Three ? hi + (n * NG + g) * E : nullptr, w);
      const float s = scales[n * NG + g];
      for (int64_t m = 0; m < M; ++m) {
        const float* xg = x + m * K + g * G;
        float part[kLanes] = {0.f};
        for (int k0 = 0; k0 < G; k0 += kLanes)
          for (int j = 0; j < kLanes; ++j) part[j] += xg[k0 + j] * w[k0 + j];
        for (int j = 0; j < kLanes; ++j) acc[m][j] += s * part[j];
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int j = 0; j < kLanes; ++j) sum += acc[m][j];
      y[m * N + n] = sum;
    }
  }
}

// What the CPU kernels take, stated once: the group sizes with_layout instantiates and the storage
// widths of the planes; any N, K a multiple of G. gsq_vllm/cpu_gemm.py reads them through the
// module's shape_rules() / shape_ok().
constexpr int kGroupSizes[] = {32, 64, 128};
constexpr int kStorageBits[] = {2, 3};

template <int L>
bool one_of(const int (&set)[L], int64_t v) {
  return std::find(std::begin(set), std::end(set), v) != std::end(set);
}

template <int L>
std::string list_of(const int (&set)[L]) {
  std::string out;
  for (int v : set) out += (out.empty() ? "" : ", ") + std::to_string(v);
  return out;
}

bool shape_ok(int64_t n, int64_t k, int64_t bits, int64_t group_size) {
  return one_of(kStorageBits, bits) && one_of(kGroupSizes, group_size) && n >= 1 && k >= group_size &&
         k % group_size == 0;
}

// Checks shared by both entry points: lo / hi / scales as written by repack_for_cpu.
void check_planes(const torch::Tensor& lo, const torch::Tensor& hi, const torch::Tensor& scales, int64_t bits,
                  int64_t G) {
  TORCH_CHECK(lo.dtype() == torch::kUInt8 && lo.is_contiguous() && lo.dim() == 3, "lo: contiguous uint8 [N, K/G, G/4]");
  TORCH_CHECK((scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16) && scales.is_contiguous(),
              "scales: contiguous float32 or bfloat16 [N, K/G]");
  TORCH_CHECK(one_of(kStorageBits, bits), "bits must be one of ", list_of(kStorageBits));
  TORCH_CHECK(one_of(kGroupSizes, G), "group size must be one of ", list_of(kGroupSizes));
  const int64_t N = lo.size(0), NG = lo.size(1);
  TORCH_CHECK(lo.size(2) == G / 4 && scales.size(0) == N && scales.size(1) == NG, "lo / scales shape mismatch");
  if (bits == 3) {
    TORCH_CHECK(hi.dtype() == torch::kUInt8 && hi.is_contiguous() && hi.numel() == N * NG * (G / 8), "hi: uint8 [N, K/G, G/8]");
  }
}

// ~16 output rows per task: enough work to amortize a task, enough tasks to balance cores.
constexpr int64_t kRowsPerTask = 16;

// The generic kernel on float32 x [M <= kMaxRows, K] and float32 scales.
torch::Tensor gemm_generic(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi,
                           const torch::Tensor& scales, int64_t bits, int64_t group_size) {
  const int64_t M = x.size(0), N = lo.size(0), NG = lo.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* lop = lo.data_ptr<uint8_t>();
  const uint8_t* hip = bits == 3 ? hi.data_ptr<uint8_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_layout(group_size, bits, [&](auto g, auto three) {
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) {
      gemm_rows<decltype(g)::value, decltype(three)::value>(xp, lop, hip, sp, yp, M, N, NG, n0, n1);
    });
  });
  return y;
}

// kAvx512Vnni and kAvx2Int8 (int8 activations) change the numbers, so they are never picked by
// themselves: only GSQ_CPU_ISA or set_isa choose them.
enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Bf16, kAmx, kAvx512Vnni, kAvx2Int8 };
constexpr Isa kAllIsas[] = {Isa::kGeneric, Isa::kAvx2,       Isa::kAvx512,   Isa::kAvx512Bf16,
                            Isa::kAmx,     Isa::kAvx512Vnni, Isa::kAvx2Int8};
constexpr const char* kIsaNames = "generic, avx2, avx512, avx512bf16, amx, avx512vnni or avx2int8";

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx2Int8 ? "avx2int8" : isa == Isa::kAvx512Vnni ? "avx512vnni" : isa == Isa::kAmx ? "amx"
         : isa == Isa::kAvx512Bf16 ? "avx512bf16" : isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}

bool is_int8(Isa isa) { return isa == Isa::kAvx512Vnni || isa == Isa::kAvx2Int8; }

// The kernels that may run on an AVX2-only CPU: their dequantization and dense helpers must be
// the AVX2 ones too (the AVX-512 ones would be illegal instructions there).
bool avx2_only(Isa isa) { return isa == Isa::kAvx2 || isa == Isa::kAvx2Int8; }

// Linux hands a process the AMX tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asked once, for the whole process.
bool amx_permitted() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  if (isa == Isa::kAmx)
    return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && cpu_has(Isa::kAvx512Bf16) &&
           amx_permitted();
  if (isa == Isa::kAvx512Vnni) return __builtin_cpu_supports("avx512vnni") && cpu_has(Isa::kAvx512);
  if (isa == Isa::kAvx2Int8) return cpu_has(Isa::kAvx2);
  if (isa == Isa::kAvx512Bf16) return __builtin_cpu_supports("avx512bf16") && cpu_has(Isa::kAvx512);
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has(Isa::kAvx2);
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return true;
}

Isa parse_isa(const std::string& name) {
  if (name == "amx") return Isa::kAmx;
  if (name == "avx512vnni") return Isa::kAvx512Vnni;
  if (name == "avx2int8") return Isa::kAvx2Int8;
  if (name == "avx512bf16") return Isa::kAvx512Bf16;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "avx2") return Isa::kAvx2;
  TORCH_CHECK(name == "generic", "GSQ CPU kernel ISA must be ", kIsaNames, ", got '", name, "'");
  return Isa::kGeneric;
}

Isa best_isa() {
  if (const char* forced = std::getenv("GSQ_CPU_ISA"); forced && *forced) {
    const std::string name = forced;
    bool known = false;
    for (Isa isa : kAllIsas) known = known || name == isa_name(isa);
    TORCH_CHECK(known, "GSQ_CPU_ISA=", name, ": must be ", kIsaNames);
    const Isa isa = parse_isa(name);
    TORCH_CHECK(cpu_has(isa), "GSQ_CPU_ISA=", forced, " but this CPU does not support it");
    return isa;
  }
  for (Isa isa : {Isa::kAmx, Isa::kAvx512Bf16, Isa::kAvx512, Isa::kAvx2})  // never an int8 kernel by itself
    if (cpu_has(isa)) return isa;
  return Isa::kGeneric;
}

Isa g_isa = Isa::kGeneric;  // set when the module loads (an error there is an ImportError)

std::string get_isa() { return isa_name(g_isa); }

std::string set_isa(const std::string& name) {
  const Isa isa = parse_isa(name);
  TORCH_CHECK(cpu_has(isa), "this CPU does not support the ", name, " kernel");
  const std::string before = isa_name(g_isa);
  g_isa = isa;
  return before;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : kAllIsas)
    if (cpu_has(isa)) out.push_back(isa_name(isa));
  return out;
}

// The int8 activation rounding of both int8 paths (the GEMM's per group, cpu_dense_int8's per
// block of 32): scale a = max|x| / 127, q = round(x * inv) with inv = 127 / max|x| (0 for an
// all-zero block), in IEEE float32 (no -ffast-math: tests reproduce the formula).
struct Int8Scale {
  float a, inv;
};
Int8Scale int8_scale(float amax) { return {amax / 127.f, amax > 0.f ? 127.f / amax : 0.f}; }

float load_as_float(const void* p, bool bf16, int64_t i) {
  if (bf16) return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// The table-lookup (T-MAC-style) decode kernels, tl_kernel.h: for M <= kTlMaxRows rows of x, the
// activations become int8 tables of partial sums per row and group, and the packed code nibbles
// index them (vpshufb), with no dequantization of any weight. They round the activations' partial
// sums (tl_kernel.h states the rounding and its bound), so they are a separate switch from the ISA:
// GSQ_CPU_TL = auto (the default: under an AVX-512 kernel the VBMI+VNNI tables where cpuid has them,
// else the AVX-512 vpshufb ones; AVX2 tables under an AVX2 kernel; none under generic), off / 0 (the
// fused kernels of the ISA alone, x never rounded), avx2, avx512 or avx512vbmi (forced); set_tl()
// switches at run time (tests and benchmarks compare both in one process).
// Faster (docs/results/cpu-decode-tl.md; 2-core AVX-512 EPYC, shared, 1 thread, weights read from
// memory, 2026-12-06): on SmolLM2-135M, Llama-8B and -70B linears the avx512vbmi tables took
// 1/1.16-1/2.0 of the avx512bf16 kernel's time at M = 1 (one contended row 0.87x, 1.64x rerun) and
// 1/1.04-1/2.76 at M = 4; the AVX2 tables 1/1.04-1/4.0 of the AVX2 kernel's. The default since their
// tables were fitted to each plane's entries (2026-12-07): on the main job's checkpoint their
// next-token distributions are 0.0018 nats a token (KL) from the fused kernels' (the opt-in int8-x
// kernels: 0.0015; 0.013 with the first tables), and the chat probe got 44 of 80 with them, 43 with
// the fused kernels (benchmarks/results/tl_quality_avx512_epyc_main_ckpt.json, chat_probe_tables_centred.json).
// A kernel call takes up to kTlPassRows rows of x (its register tile); up to kTlMaxRows rows run as
// passes of kTlPassRows over the weight, each pass re-reading it: even so, on the 2-core AVX-512
// EPYC (2 threads, weights read from memory, 2026-12-07) the passes beat the fused kernel the op
// runs there at M = 8, 12 and 16 on every layer tried (Llama-1B 16384 x 2048, 2048 x 8192, 8B
// 4096 x 4096; 2 and 3 bits): avx512vbmi tables 1/1.04-1/2.6 of the avx512bf16 kernel's time, avx2
// tables 1/1.8-1/3.4 of the avx2 kernel's. Above 16 rows the op's own choice (fused or blocked) runs.
enum class TlMode { kOff, kAuto, kAvx2, kAvx512, kAvx512Vbmi };
constexpr int64_t kTlPassRows = 4;
constexpr int64_t kTlMaxRows = 16;
TlMode g_tl = TlMode::kAuto;  // set from GSQ_CPU_TL when the module loads

const char* tl_name(TlMode t) {
  return t == TlMode::kOff ? "off" : t == TlMode::kAuto ? "auto" : t == TlMode::kAvx2 ? "avx2"
         : t == TlMode::kAvx512 ? "avx512" : "avx512vbmi";
}

TlMode parse_tl(const std::string& name) {
  if (name == "off" || name == "0" || name.empty()) return TlMode::kOff;
  if (name == "auto" || name == "1") return TlMode::kAuto;
  if (name == "avx2") return TlMode::kAvx2;
  if (name == "avx512vbmi") return TlMode::kAvx512Vbmi;
  TORCH_CHECK(name == "avx512", "GSQ CPU table-lookup kernel must be auto, off, avx2, avx512 or avx512vbmi, got '", name, "'");
  return TlMode::kAvx512;
}

bool tl_supported(TlMode t) {
  if (t == TlMode::kAvx2) return cpu_has(Isa::kAvx2);
  if (t == TlMode::kAvx512) return cpu_has(Isa::kAvx512);
  if (t == TlMode::kAvx512Vbmi)
    return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
  return true;
}

TlMode tl_from_env() {
  const char* v = std::getenv("GSQ_CPU_TL");
  const std::string name = v == nullptr || *v == '\0' ? "auto" : v;  // unset or empty: the default
  for (const char* ok : {"auto", "1", "off", "0", "avx2", "avx512", "avx512vbmi"})
    if (name == ok) goto known;
  TORCH_CHECK(false, "GSQ_CPU_TL=", name, ": must be auto, off, avx2, avx512 or avx512vbmi");
known:
  const TlMode t = parse_tl(name);
  TORCH_CHECK(tl_supported(t), "GSQ_CPU_TL=", name, " but this CPU does not support it");
  return t;
}

// The table-lookup kernel a call with few rows runs under kernel `isa`, or nullptr.
const TlKernel* tl_kernel_for(Isa isa) {
  if (g_tl == TlMode::kOff || isa == Isa::kGeneric) return nullptr;
  if (g_tl == TlMode::kAvx2) return &gsq_tl_avx2;
  if (g_tl == TlMode::kAvx512) return &gsq_tl_avx512;
  if (g_tl == TlMode::kAvx512Vbmi) return &gsq_tl_avx512vbmi;
  if (avx2_only(isa)) return &gsq_tl_avx2;
  return tl_supported(TlMode::kAvx512Vbmi) ? &gsq_tl_avx512vbmi : &gsq_tl_avx512;  // other ISAs imply AVX-512 BW
}

std::string get_tl() { return tl_name(g_tl); }

std::string set_tl(const std::string& name) {
  const TlMode t = parse_tl(name);
  TORCH_CHECK(tl_supported(t), "this CPU does not support the ", name, " table-lookup kernel");
  const std::string before = tl_name(g_tl);
  g_tl = t;
  return before;
}

// What gemm() runs for an M-row x under the current ISA: the table-lookup kernel's name, or "".
std::string tl_in_use(int64_t M) {
  const TlKernel* tk = M >= 1 && M <= kTlMaxRows ? tl_kernel_for(g_isa) : nullptr;
  return tk == &gsq_tl_avx512vbmi ? "avx512vbmi" : tk == &gsq_tl_avx512 ? "avx512" : tk == &gsq_tl_avx2 ? "avx2" : "";
}

std::vector<std::string> supported_tl() {
  std::vector<std::string> out;
  for (TlMode t : {TlMode::kAvx2, TlMode::kAvx512, TlMode::kAvx512Vbmi})
    if (tl_supported(t)) out.push_back(tl_name(t));
  return out;
}

// x [M <= kTlMaxRows, K] (float32 or bf16, contiguous), planes checked by the caller; y in x's dtype.
torch::Tensor gemm_tl(const TlKernel& tk, const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi,
                      const torch::Tensor& scales, int64_t bits, int64_t G) {
  const int64_t M = x.size(0), N = lo.size(0), NG = lo.size(1), K = NG * G;
  const torch::Tensor xf = x.scalar_type() == torch::kFloat32 ? x : x.to(torch::kFloat32);
  const int64_t rtb = tl_row_table_bytes(K, static_cast<int>(bits), tk.width);
  static thread_local std::vector<int8_t> tables;  // reused across calls: no allocation per call
  static thread_local std::vector<float> ta, tc;
  if (static_cast<int64_t>(tables.size()) < M * rtb) tables.resize(M * rtb);
  if (static_cast<int64_t>(ta.size()) < 2 * M * NG) ta.resize(2 * M * NG);
  if (static_cast<int64_t>(tc.size()) < M * NG) tc.resize(M * NG);
  // The tables of each row of x are independent: built in parallel from two rows (at 8-16 rows the
  // build is ~10 % of the call on one thread). The buffers by pointer, here and below: inside a
  // worker, `tables` would name that thread's own thread_local.
  const float* xp = xf.data_ptr<float>();
  int8_t* tables_p = tables.data();
  float *ta_p = ta.data(), *tc_p = tc.data();
  auto build = [&](int64_t m0, int64_t m1) {
    tk.build(xp + m0 * K, m1 - m0, NG, static_cast<int>(G), static_cast<int>(bits), tables_p + m0 * rtb,
             ta_p + 2 * m0 * NG, tc_p + m0 * NG, rtb);
  };
  if (M == 1)
    build(0, 1);
  else
    at::parallel_for(0, M, 1, build);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  // One pass per kTlPassRows rows of x, each with its rows' tables and outputs; a thread runs every
  // pass over its own output rows (one fork and join for all of them). On the stack: no allocation.
  const int64_t npasses = (M + kTlPassRows - 1) / kTlPassRows;
  std::array<TlArgs, kTlMaxRows / kTlPassRows> passes;
  for (int64_t p = 0; p < npasses; ++p) {
    const int64_t m0 = p * kTlPassRows;
    passes[p] = TlArgs{tables_p + m0 * rtb, ta_p + 2 * m0 * NG, tc_p + m0 * NG, lo.data_ptr<uint8_t>(),
                       bits == 3 ? hi.data_ptr<uint8_t>() : nullptr, scales.data_ptr(),
                       y.data_ptr<float>() + m0 * N, std::min(kTlPassRows, M - m0), N, NG, rtb,
                       static_cast<int>(G), static_cast<int>(bits), scales.dtype() == torch::kBFloat16};
  }
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t p = 0; p < npasses; ++p) tk.rows(passes[p], t0 * 16, std::min(N, t1 * 16));
  });
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

// y = x @ W.T for x [M, K] float32 or bfloat16 (y in x's dtype), scales float32 or bfloat16.
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi,
                   const torch::Tensor& scales, int64_t bits, int64_t group_size) {
  TORCH_CHECK((x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16) && x.is_contiguous() && x.dim() == 2,
              "x: contiguous float32 or bfloat16 [M, K]");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16,
              "scales: float32 or bfloat16");
  check_planes(lo, hi, scales, bits, group_size);
  const int64_t M = x.size(0), N = lo.size(0), NG = lo.size(1), G = group_size, K = NG * G;
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
  if (M == 0) return torch::empty({0, N}, x.options());
  const bool xbf = x.dtype() == torch::kBFloat16;
  // The bf16-dot and AMX kernels take bf16 activations only (float32 ones would be rounded):
  // float32 x goes to the fp32 AVX-512 kernel. Group size 32 is half an AVX-512 vector per quarter: AVX2.
  Isa isa = (g_isa == Isa::kAvx512Bf16 || g_isa == Isa::kAmx) && !xbf ? Isa::kAvx512 : g_isa;
  // One or two rows of x: filling A tiles costs more than the bf16-dot kernel's whole product
  // (SmolLM2's gate_up at M = 1: 112 vs 90 us; at M = 4 AMX leads, 117 vs 213).
  if (isa == Isa::kAmx && M < kAmxMinRows) isa = Isa::kAvx512Bf16;
  GemmRowsFn rows = isa == Isa::kAvx512Vnni ? gsq_gemm_rows_avx512vnni
                    : isa == Isa::kAvx2Int8  ? gsq_gemm_rows_avx2int8
                    : isa == Isa::kAmx ? gsq_gemm_rows_amx
                    : isa == Isa::kAvx512Bf16 ? gsq_gemm_rows_avx512bf16
                    : isa == Isa::kAvx512   ? (G == 32 ? gsq_gemm_rows_avx2 : gsq_gemm_rows_avx512)
                    : isa == Isa::kAvx2     ? gsq_gemm_rows_avx2
                                            : nullptr;
  // Decode sizes: the table-lookup kernel (scale indices are int32: N * K/G below 2^31).
  if (M <= kTlMaxRows && N * NG <= std::numeric_limits<int32_t>::max())
    if (const TlKernel* tk = tl_kernel_for(isa)) return gemm_tl(*tk, x, lo, hi, scales, bits, G);
  if (rows == nullptr) {  // generic: float32 in, kMaxRows rows at a time
    auto xf = x.to(torch::kFloat32), sf = scales.to(torch::kFloat32).contiguous();
    std::vector<torch::Tensor> parts;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
      parts.push_back(gemm_generic(xf.narrow(0, m0, std::min<int64_t>(kMaxRows, M - m0)).contiguous(), lo, hi, sf, bits, G));
    return (parts.size() == 1 ? parts[0] : torch::cat(parts)).to(x.scalar_type());
  }
  // Activation buffers, reused across calls (one set per calling thread): no allocation per call.
  static thread_local std::vector<float> xs_buf, xsum_buf;
  static thread_local std::vector<uint16_t> xp_buf;
  static thread_local std::vector<uint32_t> xt_buf;
  static thread_local std::vector<int8_t> xq_buf;
  static thread_local std::vector<float> xa_buf;
  static thread_local std::vector<int32_t> xc_buf;
  const void* xraw = x.data_ptr();
  const int64_t Q = G / 4;
  if (is_int8(isa)) {
    // int8 per (row, group): a = max|x| / 127, q = round(x * 127 / max|x|); packed as
    // xq[m][block b][quarter i][h * Q + j] = q[m, (b * V + h) * G + i * Q + j], V = W / Q groups
    // of W bytes per quarter (W = 64 for avx512vnni's 512-bit vectors, 32 for avx2int8's); xa and
    // xc have one int32 / float32 lane per 4 bytes of a quarter, W / 4 per block.
    const int64_t W = isa == Isa::kAvx512Vnni ? 64 : 32, L = W / 4;
    const int64_t V = W / Q, NB = (NG + V - 1) / V;
    const int32_t offset = bits == 3 ? 4 : 2;
    xq_buf.assign(M * NB * 4 * W, 0);
    xa_buf.assign(M * NB * L, 0.f);
    xc_buf.assign(M * NB * L, 0);
    std::vector<float> xg(G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < NG; ++g) {
        float amax = 0.f;
        for (int64_t k = 0; k < G; ++k) {
          xg[k] = load_as_float(xraw, xbf, m * K + g * G + k);
          amax = std::max(amax, std::fabs(xg[k]));
        }
        const auto [a, inv] = int8_scale(amax);
        const int64_t b = g / V, h = g % V;
        int32_t qsum = 0;
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t j = 0; j < Q; ++j) {
            const int32_t q = static_cast<int32_t>(std::nearbyint(xg[i * Q + j] * inv));
            qsum += q;
            xq_buf[((m * NB + b) * 4 + i) * W + h * Q + j] = static_cast<int8_t>(q);
          }
        for (int64_t l = h * Q / 4; l < (h + 1) * Q / 4; ++l) xa_buf[(m * NB + b) * L + l] = a;
        xc_buf[(m * NB + b) * L + h * Q / 4] = offset * qsum;
      }
  } else if (isa == Isa::kAmx) {
    // xt[((mt * NB + b) * 4 + i) * 256 + p * 16 + c] = the bf16 pair (words 2p, 2p + 1 of the
    // avx512bf16 order below) of x row 16 mt + c: B tiles, written whole by the AMX file's packer.
    const int64_t V = 32 / Q, NB = (NG + V - 1) / V, MT = (M + 15) / 16;
    xt_buf.resize(MT * NB * 4 * 256);
    gsq_pack_x_amx(static_cast<const uint16_t*>(xraw), M, K, NG, static_cast<int>(G), xt_buf.data());
  } else if (isa == Isa::kAvx512Bf16) {
    // xp[m][block b][quarter i][h * Q + j] = x[m, (b * V + h) * G + i * Q + j], 0 past the last group.
    const int64_t V = 32 / Q, NB = (NG + V - 1) / V;
    xp_buf.resize(M * NB * 128);
    const uint16_t* xb = static_cast<const uint16_t*>(xraw);
    uint16_t* xp = xp_buf.data();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < NB; ++b)
        for (int64_t i = 0; i < 4; ++i)
          for (int64_t h = 0; h < V; ++h) {
            uint16_t* dst = xp + ((m * NB + b) * 4 + i) * 32 + h * Q;
            const int64_t g = b * V + h;
            if (g < NG)
              std::memcpy(dst, xb + m * K + g * G + i * Q, Q * sizeof(uint16_t));
            else
              std::memset(dst, 0, Q * sizeof(uint16_t));
          }
  } else {
    // xs: quarter i of every group times 4^-i (exact: a power of two); xsum: offset times each
    // group's sum, in the first of 16 lanes (the kernels subtract it as one vector).
    const float offset = bits == 3 ? 4.f : 2.f;
    xs_buf.resize(M * K);
    xsum_buf.assign(M * NG * 16, 0.f);
    float* xsp = xs_buf.data();
    float* xsump = xsum_buf.data();
    for (int64_t mg = 0; mg < M * NG; ++mg) {
      float sum = 0.f;
      for (int i = 0; i < 4; ++i) {
        const float f = 1.f / static_cast<float>(1 << (2 * i));
        for (int64_t j = 0; j < Q; ++j) {
          const float v = load_as_float(xraw, xbf, mg * G + i * Q + j);
          sum += v;
          xsp[mg * G + i * Q + j] = v * f;
        }
      }
      xsump[mg * 16] = offset * sum;
    }
  }
  auto y = torch::empty({M, N}, x.options());
  GemmArgs a{xs_buf.data(), xsum_buf.data(), xp_buf.data(), xt_buf.data(), xq_buf.data(), xa_buf.data(), xc_buf.data(), lo.data_ptr<uint8_t>(),
             bits == 3 ? hi.data_ptr<uint8_t>() : nullptr, scales.data_ptr(), y.data_ptr(), M, N, NG,
             static_cast<int>(G), static_cast<int>(bits), scales.dtype() == torch::kBFloat16, xbf};
  if (isa == Isa::kAmx)  // whole tiles of 16 output rows per task
    at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t t0, int64_t t1) { rows(a, t0 * 16, std::min(N, t1 * 16)); });
  else
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) { rows(a, n0, n1); });
  return y;
}

// w[n, (g - g0) * G + k] = s[n, g] * (u - offset) for groups g0 <= g < g1: the K-block of the
// weight that the many-rows path hands to the BLAS GEMM (oneDNN in bf16 is far faster than a
// hand-written loop once M is large enough to amortize one dequantization).
template <int G, bool Three, typename T>
void dequant_rows(const uint8_t* lo, const uint8_t* hi, const float* scales, T* out, int64_t NG,
                  int64_t g0, int64_t g1, int64_t n0, int64_t n1) {
  constexpr int Q = G / 4, E = G / 8;
  alignas(64) float w[G];
  const int64_t width = (g1 - g0) * G;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = g0; g < g1; ++g) {
      unpack_group<G, Three>(lo + (n * NG + g) * Q, Three ? hi + (n * NG + g) * E : nullptr, w);
      const float s = scales[n * NG + g];
      T* o = out + n * width + (g - g0) * G;
      for (int k = 0; k < G; ++k) o[k] = static_cast<T>(s * w[k]);
    }
}

torch::Tensor dequant(const torch::Tensor& lo, const torch::Tensor& hi, const torch::Tensor& scales,
                      int64_t bits, int64_t group_size, int64_t g0, int64_t g1, torch::ScalarType dtype) {
  check_planes(lo, hi, scales, bits, group_size);
  const int64_t N = lo.size(0), NG = lo.size(1);
  TORCH_CHECK(0 <= g0 && g0 < g1 && g1 <= NG, "group range [g0, g1) out of bounds");
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "dtype must be float32 or bfloat16");
  TORCH_CHECK(scales.dtype() == torch::kFloat32, "dequant: scales must be float32");
  auto out = torch::empty({N, (g1 - g0) * group_size}, lo.options().dtype(dtype));
  const uint8_t* lop = lo.data_ptr<uint8_t>();
  const uint8_t* hip = bits == 3 ? hi.data_ptr<uint8_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  DequantRowsFn simd = g_isa == Isa::kGeneric ? nullptr
                       : (avx2_only(g_isa) || group_size == 32) ? gsq_dequant_rows_avx2 : gsq_dequant_rows_avx512;
  if (simd != nullptr) {
    DequantArgs d{lop, hip, sp, out.data_ptr(), NG, g0, g1, static_cast<int>(group_size), static_cast<int>(bits),
                  dtype == torch::kBFloat16};
    at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) { simd(d, n0, n1); });
    return out;
  }
  auto run = [&](auto* op) {
    using T = std::remove_pointer_t<decltype(op)>;
    with_layout(group_size, bits, [&](auto g, auto three) {
      at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) {
        dequant_rows<decltype(g)::value, decltype(three)::value, T>(lop, hip, sp, op, NG, g0, g1, n0, n1);
      });
    });
  };
  if (dtype == torch::kFloat32)
    run(out.data_ptr<float>());
  else
    run(out.data_ptr<at::BFloat16>());
  return out;
}

// Whether this CPU multiplies bf16 natively (AVX-512-BF16 dot products or AMX tiles), so that
// oneDNN's bf16 GEMM is fast; elsewhere a bf16 GEMM is far slower than a float32 one.
bool bf16_gemm_is_native() { return cpu_has(Isa::kAvx512Bf16) || cpu_has(Isa::kAmx); }

// Up to this many rows of x the fused kernel runs; above, the blocked path (dequantize a K-block
// once, then oneDNN's GEMM) amortizes better. Crossovers from benchmarks/bench_cpu_gemm.py
// (2-core AMD EPYC, 2026-11-25; the generic kernel's 8 from an earlier machine):
// * SmolLM2-sized layers (<= 3072 x 1536): the fp32 SIMD kernels tie the blocked path near M = 8;
// * the bf16-dot kernels (avx512bf16, avx512vnni) with bf16 x, re-measured on 2 threads after the
//   fused kernels got their OpenMP threads (benchmarks/fused_crossover.py, 2-core AVX-512 EPYC,
//   2026-12-05; until then the fused kernel ran on one thread against oneDNN's two, and the
//   crossovers were 12 and 32). Fused / blocked time, two runs: SmolLM2's layers at M = 16
//   0.49-0.92 (2- and 3-bit), at 24 0.57-1.19, so 16; a 28672 x 8192 layer 0.36-0.40 at M = 32,
//   0.49-0.53 at 48, 0.59-0.68 at 64, 0.79-0.87 at 96, so 96 for 8M+ weights, whose dequantized
//   block no longer stays in cache.
// GSQ_CPU_FUSED_MAX_ROWS overrides it for every shape (e.g. to send a whole prefill through the
// int8 kernel when measuring its perplexity); -1 = unset.
int64_t g_fused_rows_override = -1;

// The AMX kernel dequantizes each tile of 16 output rows once for all rows of x, so it stays
// fused at every M: on SmolLM2's layers (1 thread, 2026-12-03) it beats the blocked path at
// every M up to 256 (at 256: 268 vs 422 us on qkv, 384 vs 763 on down) and dense bf16 up to 64
// rows (at 256: 0.9-1.1x). float32 x runs the avx512 kernel and its crossover.
constexpr int64_t kAmxMaxFusedRows = std::numeric_limits<int64_t>::max();

int64_t max_fused_rows(int64_t N, int64_t K, bool bf16_x) {
  if (g_fused_rows_override >= 0) return g_fused_rows_override;
  if (g_isa == Isa::kAmx && bf16_x) return kAmxMaxFusedRows;
  if (g_isa == Isa::kGeneric) return 8;
  const bool large = N * K >= (int64_t{8} << 20);
  if (g_isa == Isa::kAvx512Bf16 || g_isa == Isa::kAvx512Vnni || g_isa == Isa::kAmx) {
    if (bf16_x) return large ? 96 : 16;  // (AMX with bf16 x returned above)
    return large ? 32 : 12;  // float32 x: the one-thread crossovers of 2026-11-25, not re-measured
  }
  // AVX2 (2-core AVX2-only EPYC, 1 thread, 2026-12-03; its blocked path is float32): at M = 16 the
  // fused kernel beat it on gate_up (3.0 vs 4.4 ms) and tied on qkv / down; at 32 the blocked
  // path won on qkv and down (1.6 vs 1.9, 2.4 vs 3.8 ms). Large layers: 32, as for the bf16-dot
  // kernel (not measured on AVX2; a float32 block is twice a bf16 one, so no more cache-friendly).
  if (g_isa == Isa::kAvx2) return large ? 32 : 16;
  // avx2int8 (same machine, 1 thread, 2026-12-04), fused vs the op's blocked path: SmolLM2's
  // layers tie near M = 48-64 (qkv 2-bit at 48: 1.76 vs 1.96 ms; 3-bit at 64: 2.95 vs 2.49 ms);
  // an 8192 x 8192 2-bit layer: fused still wins at 96 rows (298 vs 461 ms), the most measured.
  if (g_isa == Isa::kAvx2Int8) return large ? 96 : 48;
  return large ? 16 : 8;
}

int64_t fused_rows_from_env() {
  const char* v = std::getenv("GSQ_CPU_FUSED_MAX_ROWS");
  if (v == nullptr || *v == 0) return -1;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != nullptr && *end == 0 && n >= 0, "GSQ_CPU_FUSED_MAX_ROWS=", v, ": must be a whole number >= 0");
  return n;
}

// Largest multiple of G dividing K, at most 1024 (>= G): one transient [N, block] weight per call.
int64_t choose_block_k(int64_t K, int64_t G) {
  int64_t best = G;
  for (int64_t bk = G; bk <= std::min<int64_t>(K, 1024); bk += G)
    if (K % bk == 0) best = bk;
  return best;
}

// torch.ops.gsq.cpu_gemm: the op vLLM calls (registered here so a call costs no Python).
torch::Tensor cpu_gemm_op(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi,
                          const torch::Tensor& scales, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x: CPU [M, K]");
  const bool native = x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16;
  const torch::Tensor xc = (native ? x : x.to(torch::kFloat32)).contiguous();
  const torch::Tensor sc = (scales.dtype() == torch::kFloat32 || scales.dtype() == torch::kBFloat16
                                ? scales : scales.to(torch::kFloat32)).contiguous();
  if (x.size(0) <= max_fused_rows(lo.size(0), lo.size(1) * group_size, xc.dtype() == torch::kBFloat16))
    return gemm(xc, lo, hi, sc, bits, group_size).to(x.scalar_type());
  check_planes(lo, hi, sc, bits, group_size);
  const int64_t NG = lo.size(1), K = NG * group_size, bk = choose_block_k(K, group_size), gpb = bk / group_size;
  TORCH_CHECK(xc.size(1) == K, "x has ", xc.size(1), " columns, the weight ", K);
  // Products of small integer codes and scales are exact in float32, so the dequantized block in
  // x's dtype is the weight rounded once, as a dense layer in that dtype would hold it.
  // A CPU without a bf16 dot product (AVX2, AVX-512 before BF16) has no fast bf16 GEMM: oneDNN
  // refuses the primitive and torch runs a loop whose time grows with every row of x (on a 2-core
  // AVX2 EPYC, qkv at M = 256: 55 ms in bf16 against 9 ms in float32). There the block stays
  // float32 (the exact weight) and so does x; y is rounded to bf16 once at the end.
  const bool bf16_gemm = bf16_gemm_is_native();
  const torch::Tensor xg = xc.scalar_type() == torch::kBFloat16 && !bf16_gemm ? xc.to(torch::kFloat32) : xc;
  const auto wdtype = xg.scalar_type();
  const torch::Tensor sf = sc.to(torch::kFloat32).contiguous();
  // Output rows in chunks whose dequantized block stays near 8 MiB (one L3-sized slice): a
  // [28672, 1024] bf16 block of a 70B MLP would be 56 MiB and run ~5x slower than the same
  // work in 4096-row slices. SmolLM2-sized layers are one chunk.
  const int64_t N = lo.size(0);
  const int64_t rows = std::max<int64_t>(64, (int64_t{8} << 20) / (bk * static_cast<int64_t>(xg.element_size())));
  const bool hi_used = bits == 3;
  torch::Tensor y = torch::empty({xg.size(0), N}, xg.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nn = std::min(rows, N - n0);
    const torch::Tensor lo_n = lo.narrow(0, n0, nn), sf_n = sf.narrow(0, n0, nn);
    const torch::Tensor hi_n = hi_used ? hi.narrow(0, n0, nn) : hi;
    torch::Tensor y_n = y.narrow(1, n0, nn);
    for (int64_t b = 0; b < K / bk; ++b) {
      const torch::Tensor w = dequant(lo_n, hi_n, sf_n, bits, group_size, b * gpb, (b + 1) * gpb, wdtype);
      const torch::Tensor xb = xg.narrow(1, b * bk, bk);
      if (b == 0)
        y_n.copy_(at::matmul(xb, w.t()));
      else
        y_n.add_(at::matmul(xb, w.t()));
    }
  }
  return y.to(x.scalar_type());
}

// gsq::cpu_dense: a bf16 layer the checkpoint keeps unquantized (lm_head, skipped attention),
// for CPUs without a bf16 dot product, where vLLM's oneDNN handle cannot be made and torch's bf16
// linear is a loop whose time grows with every row of x (2-core AVX2 EPYC, lm_head 49152 x 576:
// 11.8 ms at M = 1, 88.6 ms at M = 8). Up to kDenseFusedRows rows the SIMD kernel widens each
// bf16 weight in registers (weights read once per tile of rows, at bf16's 2 bytes); above, slices
// of ~8 MiB of the weight go to float32 and oneDNN's float32 GEMM. Sums in float32, y rounded once.
constexpr int64_t kDenseFusedRows = 16;

torch::Tensor cpu_dense_op(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "gsq::cpu_dense: CPU tensors only");
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.dim() == 2, "gsq::cpu_dense: w must be bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "gsq::cpu_dense: x has ", x.size(-1), " columns, the weight ", K);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const torch::Tensor xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const torch::Tensor wc = w.contiguous();
  const int64_t M = xf.size(0);
  DenseRowsFn rows = g_isa == Isa::kGeneric ? nullptr : avx2_only(g_isa) ? gsq_dense_rows_avx2 : gsq_dense_rows_avx512;
  torch::Tensor y = torch::empty({M, N}, xf.options());
  if (rows != nullptr && M <= kDenseFusedRows) {
    DenseArgs a{xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>()), y.data_ptr(), M, N, K, false};
    if (M > 0) at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) { rows(a, n0, n1); });
  } else {
    const int64_t slice = std::max<int64_t>(64, (int64_t{8} << 20) / (4 * std::max<int64_t>(K, 1)));
    for (int64_t n0 = 0; n0 < N; n0 += slice) {
      const int64_t nn = std::min(slice, N - n0);
      y.narrow(1, n0, nn).copy_(at::matmul(xf, wc.narrow(0, n0, nn).to(torch::kFloat32).t()));
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y.to(x.scalar_type()).reshape(out_shape);
}

// gsq::cpu_dense_int8 (GSQ_CPU_DENSE=int8, opt-in): a dense layer whose weight was rounded to
// int8 per output row when the model loaded (gsq_vllm/cpu_gemm.py quantize_dense_int8), times x
// rounded to int8 per block of 32 here: y[m, n] = ws[n] * sum_b xa[m, b] * sum_k xq[m, k] wq[n, k].
// Above kDenseInt8MaxRows rows of x, when the bf16 weight is passed too, that weight serves the
// call instead (gsq::cpu_dense, or torch's linear where the CPU has a bf16 dot product): the int8
// kernel's 5 instructions per 32 products and row of x (sign, vpmaddubsw, vpmaddwd, convert, FMA)
// cost more than the bf16 kernel's 4 FMAs once the weight's bytes are shared by several rows.
// lm_head 49152 x 576 on a 2-core AVX2 EPYC, 1 thread, 2026-12-04, int8 vs bf16 ms: M = 1: 3.5 vs 6.7; 2: 5.8 vs 7.8; 4: 11.7 vs 9.6; 8: 22.3 vs 19.3.
constexpr int64_t kInt8Block = 32;
constexpr int64_t kDenseInt8MaxRows = 2;

// The portable loop for CPUs without AVX2 (and GSQ_CPU_ISA=generic): the AVX2 kernel's sums.
void dense_int8_rows_generic(const DenseInt8Args& a, int64_t n0, int64_t n1) {
  const int64_t NB = a.Kp / kInt8Block;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < NB; ++b) {
        int32_t sum = 0;
        for (int64_t k = b * kInt8Block; k < (b + 1) * kInt8Block; ++k)
          sum += static_cast<int32_t>(a.xq[m * a.Kp + k]) * static_cast<int32_t>(a.wq[n * a.Kp + k]);
        acc += static_cast<float>(sum) * a.xa[m * NB + b];
      }
      static_cast<float*>(a.y)[m * a.N + n] = acc * a.ws[n];  // the dispatcher's y is float32
    }
}

// The int8 dense kernel under the GEMM kernel in use, and its name: the AVX-512 VNNI one under the
// kernels of a CPU that has VNNI (avx512vnni, avx512bf16, amx), the AVX2 one under the other SIMD
// kernels, the portable loop under generic.
struct DenseInt8Kernel {
  const char* name;
  DenseInt8RowsFn rows;
};

DenseInt8Kernel dense_int8_kernel() {
  if (g_isa == Isa::kGeneric) return {"generic", &dense_int8_rows_generic};
  const bool vnni_kernel = g_isa == Isa::kAvx512Vnni || g_isa == Isa::kAvx512Bf16 || g_isa == Isa::kAmx;
  if (vnni_kernel && cpu_has(Isa::kAvx512Vnni)) return {"avx512vnni", gsq_dense_int8_rows_avx512vnni};
  return {"avx2", gsq_dense_int8_rows_avx2};
}

torch::Tensor cpu_dense_int8_op(const torch::Tensor& x, const torch::Tensor& wq, const torch::Tensor& ws,
                                const std::optional<torch::Tensor>& w, const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && ws.device().is_cpu(), "gsq::cpu_dense_int8: CPU tensors only");
  TORCH_CHECK(wq.dtype() == torch::kInt8 && wq.dim() == 2 && wq.is_contiguous() && wq.size(1) % kInt8Block == 0,
              "gsq::cpu_dense_int8: wq must be contiguous int8 [N, Kp], Kp a multiple of 32");
  const int64_t N = wq.size(0), Kp = wq.size(1);
  TORCH_CHECK(ws.dtype() == torch::kFloat32 && ws.dim() == 1 && ws.size(0) == N && ws.is_contiguous(),
              "gsq::cpu_dense_int8: ws must be contiguous float32 [N]");
  TORCH_CHECK(x.dim() >= 1, "gsq::cpu_dense_int8: x must have a last dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K <= Kp && K > Kp - kInt8Block, "gsq::cpu_dense_int8: x has ", K, " columns, the weight ", Kp,
              " (its K rounded up to 32)");
  if (w.has_value() && w->defined()) {
    TORCH_CHECK(w->dim() == 2 && w->size(0) == N && w->size(1) == K, "gsq::cpu_dense_int8: w must be the [N, K] weight wq was made from");
    // A bf16 weight on a CPU without a bf16 dot product goes to gsq::cpu_dense; a float32 one, or a
    // bf16 one where the CPU has the dot product, to torch's linear (oneDNN): on a 2-core AVX-512-BF16
    // EPYC (2026-12-06, lm_head 49152 x 2048, one thread, shared) at M = 8 it took 25 ms, cpu_dense
    // 55, the int8 kernel 43; served at concurrency 8 cpu_dense had cost a quarter of the throughput.
    if (x.numel() / K > kDenseInt8MaxRows)
      return w->scalar_type() == torch::kBFloat16 && !bf16_gemm_is_native()
                 ? cpu_dense_op(x, *w, bias)
                 : at::linear(x.to(w->scalar_type()), *w, bias).to(x.scalar_type());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const torch::Tensor xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0), NB = Kp / kInt8Block;
  // x per (row, block of 32): a = max|x| / 127, q = round(x * 127 / max|x|), zeros past K.
  std::vector<int8_t> xq(M * Kp, 0);
  std::vector<float> xa(M * NB, 0.f);
  const float* xp = xf.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t k0 = b * kInt8Block, k1 = std::min(K, k0 + kInt8Block);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xp[m * K + k]));
      const auto [a, inv] = int8_scale(amax);
      xa[m * NB + b] = a;
      for (int64_t k = k0; k < k1; ++k) xq[m * Kp + k] = static_cast<int8_t>(std::nearbyint(xp[m * K + k] * inv));
    }
  torch::Tensor y = torch::empty({M, N}, xf.options());  // float32: the bias is added before the one rounding
  DenseInt8Args a{xq.data(), xa.data(), wq.data_ptr<int8_t>(), ws.data_ptr<float>(), y.data_ptr(), M, N, Kp, false};
  const DenseInt8RowsFn rows = dense_int8_kernel().rows;
  if (M > 0) at::parallel_for(0, N, kRowsPerTask, [&](int64_t n0, int64_t n1) { rows(a, n0, n1); });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y.to(x.scalar_type()).reshape(out_shape);
}

// How many distinct threads at::parallel_for hands work to in this library. torch's CPU build
// runs parallel_for through OpenMP inline in the caller's code, so a library built without
// -fopenmp silently runs it on one thread (setup.py); tests check this against torch's count.
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64)); });
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gsq, m) {
  m.def("cpu_gemm(Tensor x, Tensor lo, Tensor hi, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("cpu_dense(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("cpu_dense_int8(Tensor x, Tensor wq, Tensor ws, Tensor? w, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(gsq, CPU, m) {
  m.impl("cpu_gemm", &cpu_gemm_op);
  m.impl("cpu_dense", &cpu_dense_op);
  m.impl("cpu_dense_int8", &cpu_dense_int8_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Bumped whenever the plane layout changes; gsq_vllm/cpu_gemm.py refuses a stale build.
  m.attr("LAYOUT_VERSION") = 2;
  g_isa = best_isa();
  g_fused_rows_override = fused_rows_from_env();
  g_tl = tl_from_env();
  m.def("gemm", &gemm, "GSQ fused dequant+GEMM: x f32/bf16 [M,K], scales f32/bf16 [N,K/G] -> y [M,N] in x's dtype");
  m.def("max_fused_rows", &max_fused_rows, "rows of x up to which gsq::cpu_gemm runs the fused kernel for an N x K weight",
        py::arg("n") = 0, py::arg("k") = 0, py::arg("bf16_x") = true);
  m.def("isa", &get_isa, "the kernel in use (see supported_isas)");
  m.def("set_isa", &set_isa, "use this kernel from now on (must be supported here); returns the previous one");
  m.def("supported_isas", &supported_isas, "the kernels this CPU can run");
  m.def("tl", &get_tl, "the table-lookup decode kernels' setting: auto, off, avx2, avx512 or avx512vbmi (GSQ_CPU_TL)");
  m.def("set_tl", &set_tl, "use this table-lookup setting from now on; returns the previous one");
  m.def("supported_tl", &supported_tl, "the table-lookup kernels this CPU can run");
  m.def("tl_in_use", &tl_in_use, "the table-lookup kernel gemm() runs for M rows of x now ('' for none)", py::arg("m") = 1);
  m.attr("TL_MAX_ROWS") = kTlMaxRows;
  m.def("bf16_gemm_is_native", &bf16_gemm_is_native,
        "whether this CPU multiplies bf16 natively (AVX-512-BF16 or AMX); elsewhere gsq::cpu_dense serves bf16 layers");
  m.attr("DENSE_INT8_MAX_ROWS") = kDenseInt8MaxRows;  // rows of x up to which cpu_dense_int8 runs its int8 kernel
  m.def("dense_int8_kernel", [] { return std::string(dense_int8_kernel().name); },
        "the kernel gsq::cpu_dense_int8 runs under the GEMM kernel in use: avx512vnni, avx2 or generic");
  m.def("parallel_threads", &parallel_threads, "distinct threads at::parallel_for uses in this library (OpenMP build check)");
  m.def("dequant", &dequant, "GSQ planes of groups [g0, g1) -> dense weight [N, (g1-g0)*G] (float32 or bfloat16)");
  m.def("shape_rules", [] {
    py::dict d;
    d["group_sizes"] = py::tuple(py::cast(std::vector<int>(std::begin(kGroupSizes), std::end(kGroupSizes))));
    d["storage_bits"] = py::tuple(py::cast(std::vector<int>(std::begin(kStorageBits), std::end(kStorageBits))));
    return d;
  }, "the CPU kernels' shape rules: group sizes and storage bits (any N; K a multiple of G)");
  m.def("shape_ok", &shape_ok, "whether the CPU kernels take an [N, K] weight", py::arg("n"), py::arg("k"),
        py::arg("bits"), py::arg("group_size"));
  // The CUDA kernel's rules (csrc/gsq_rules.h) too, as cuda_shape_rules / cuda_shape_ok / cuda_chunk_k:
  // the repack into its layout and the emulator run on machines without the CUDA extension.
  gsq::rules::add_to_module(m, "cuda_");
}
