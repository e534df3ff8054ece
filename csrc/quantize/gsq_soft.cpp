// GSQ's soft weight on the CPU, fused (quantize/gsq.py): noise, Gumbel-softmax, expected code
// and scale in one pass forward, and the logits' gradient in one pass backward.
//
// Noise. Element e of a [V, N, K] logits tensor (row-major index e = v*N*K + n*K + k) gets
// Gumbel(0,1) (or Logistic(0,1) for the ternary kind) noise that is a pure function of
// (key, e): two rounds of a 32-bit hash give a uniform, fast logs turn it into noise
// (fast_math.h). Backward regenerates the forward's noise from the key alone; `noise()` returns
// the same values as a tensor, so the torch formulas can be checked against these kernels.
//
// Soft weight, per weight (n, k), z_v = (kappa * logit_v + noise_v) / tau:
//   full (2-bit):  levels qmin + v, v < 4;            c = sum_v softmax(z)_v * level_v
//   shift (3-bit): levels q0 + v - 2, v < 5, levels outside [qmin, qmax] masked out; same c
//   ternary:       c = (2 sigmoid(z_0) - 1) * sigmoid(z_1)   (sign times nonzero)
//   W = scale[n, k / G] * c
// Backward, with dc = dW * scale: dz_v = p_v (level_v - c) dc (softmax kinds), or for ternary
// dz_0 = dc * s1 * 2 s0 (1 - s0), dz_1 = dc * (2 s0 - 1) * s1 (1 - s1); dlogit = dz * kappa / tau.
// It also returns c, from which the caller reduces the scales' gradient sum_k dW * c per group.
//
// Plain float arithmetic, no FMA contraction (-ffp-contract=off in setup.py): the AVX-512, AVX2
// and baseline clones (picked at run time) give bit-identical results on every machine.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "fast_math.h"
#include "ops.h"

namespace {

using namespace gsq_q;

enum Kind : int { kFull = 0, kShift = 1, kTernary = 2 };

struct Args {
  const float* logits;
  const float* scales;
  const int8_t* q0;
  int64_t n, k, group;
  int qmin, qmax;
  float kappa, inv_tau;
  uint32_t key_lo, key_hi;
};

inline float noise_at(const Args& a, uint32_t e, bool logistic) {
  const float u = uniform(a.key_lo, a.key_hi, e);
  return logistic ? log_approx(u) - log_approx(1.0f - u) : -log_approx(-log_approx(u));
}

// One group of G weights of row n starting at column k0. `dw` null: forward (writes w and c);
// else backward (writes dlogits and c).
constexpr int kMaxGroup = 256;

// One group of G weights of row `row` starting at column k0, in simple loops over the group
// (one statement each, so each vectorizes). BWD false: writes w and c; true: dlogits and c.
template <int V, int KIND, bool BWD>
__attribute__((always_inline)) inline void group_pass(const Args& a, int64_t row, int64_t k0, float* w,
                                                      float* c_out, const float* dw, float* dlogits) {
  const int64_t nk = a.n * a.k;
  const float s = a.scales[row * (a.k / a.group) + k0 / a.group];
  const int64_t base = row * a.k + k0;
  const int g = static_cast<int>(a.group);
  float z[V][kMaxGroup], level[V][kMaxGroup], c[kMaxGroup], m[kMaxGroup], sum[kMaxGroup];
  // 32-bit lane arithmetic only inside the loops (64-bit indices would halve the vector width).
  for (int v = 0; v < V; ++v) {
    const float* lg = a.logits + v * nk + base;
    const uint32_t first = static_cast<uint32_t>(v * nk + base);
    for (int j = 0; j < g; ++j)
      z[v][j] = (a.kappa * lg[j] + noise_at(a, first + static_cast<uint32_t>(j), KIND == kTernary)) * a.inv_tau;
  }
  if constexpr (KIND == kTernary) {
    // z[0] -> s0 = sigmoid(z0), z[1] -> s1 = sigmoid(z1) in place.
    for (int v = 0; v < 2; ++v)
      for (int j = 0; j < g; ++j) z[v][j] = 1.0f / (1.0f + exp_approx(-z[v][j]));
    for (int j = 0; j < g; ++j) c[j] = (2.0f * z[0][j] - 1.0f) * z[1][j];
  } else {
    const int8_t* q0 = KIND == kShift ? a.q0 + base : nullptr;
    for (int v = 0; v < V; ++v)
      for (int j = 0; j < g; ++j)
        level[v][j] = static_cast<float>(KIND == kShift ? static_cast<int>(q0[j]) + v - 2 : a.qmin + v);
    const float lo = static_cast<float>(a.qmin), hi = static_cast<float>(a.qmax);
    if constexpr (KIND == kShift) {   // levels off the grid: z = -inf-ish, so p = 0
      for (int v = 0; v < V; ++v)
        for (int j = 0; j < g; ++j) z[v][j] = (level[v][j] < lo || level[v][j] > hi) ? -3.0e38f : z[v][j];
    }
    for (int j = 0; j < g; ++j) m[j] = z[0][j];
    for (int v = 1; v < V; ++v)
      for (int j = 0; j < g; ++j) m[j] = z[v][j] > m[j] ? z[v][j] : m[j];
    for (int j = 0; j < g; ++j) sum[j] = 0.0f;
    for (int v = 0; v < V; ++v)
      for (int j = 0; j < g; ++j) {
        z[v][j] = exp_approx(z[v][j] - m[j]);   // z now holds the unnormalized p
        sum[j] += z[v][j];
      }
    for (int j = 0; j < g; ++j) {
      sum[j] = 1.0f / sum[j];
      c[j] = 0.0f;
    }
    for (int v = 0; v < V; ++v)
      for (int j = 0; j < g; ++j) {
        z[v][j] *= sum[j];                      // p
        c[j] += z[v][j] * level[v][j];
      }
  }
  float* cp = c_out + base;
  for (int j = 0; j < g; ++j) cp[j] = c[j];
  if constexpr (!BWD) {
    float* wp = w + base;
    for (int j = 0; j < g; ++j) wp[j] = s * c[j];
  } else {
    const float* dwp = dw + base;
    const float f = s * a.kappa * a.inv_tau;   // dlogit = dz * kappa / tau, dc = dW * s
    if constexpr (KIND == kTernary) {
      float* d0 = dlogits + base;
      float* d1 = dlogits + nk + base;
      for (int j = 0; j < g; ++j) {
        const float dc = dwp[j] * f, s0 = z[0][j], s1 = z[1][j];
        d0[j] = dc * s1 * 2.0f * s0 * (1.0f - s0);
        d1[j] = dc * (2.0f * s0 - 1.0f) * s1 * (1.0f - s1);
      }
    } else {
      for (int v = 0; v < V; ++v) {
        float* dl = dlogits + v * nk + base;
        for (int j = 0; j < g; ++j) dl[j] = z[v][j] * (level[v][j] - c[j]) * (dwp[j] * f);
      }
    }
  }
}

template <int V, int KIND>
__attribute__((always_inline)) inline void rows(const Args& a, int64_t r0, int64_t r1, float* w, float* c,
                                                const float* dw, float* dlogits) {
  for (int64_t row = r0; row < r1; ++row) {
    for (int64_t k0 = 0; k0 < a.k; k0 += a.group) {
      if (dw) {
        group_pass<V, KIND, true>(a, row, k0, w, c, dw, dlogits);
      } else {
        group_pass<V, KIND, false>(a, row, k0, w, c, dw, dlogits);
      }
    }
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void run_rows(int kind, const Args& a, int64_t r0, int64_t r1, float* w, float* c, const float* dw, float* dl) {
  if (kind == kFull) {
    rows<4, kFull>(a, r0, r1, w, c, dw, dl);
  } else if (kind == kShift) {
    rows<5, kShift>(a, r0, r1, w, c, dw, dl);
  } else {
    rows<2, kTernary>(a, r0, r1, w, c, dw, dl);
  }
}

}  // namespace

namespace gsq_q {
namespace {

Args make_args(const torch::Tensor& logits, const torch::Tensor& scales, const torch::Tensor& q0, int64_t kind,
               int64_t qmin, int64_t qmax, double kappa, double tau, int64_t group, int64_t key) {
  TORCH_CHECK(logits.dim() == 3 && logits.scalar_type() == torch::kFloat32 && logits.is_contiguous() &&
                  logits.device().is_cpu(),
              "logits: contiguous float32 [V, N, K] on the CPU");
  const int64_t v = logits.size(0), n = logits.size(1), k = logits.size(2);
  TORCH_CHECK(kind >= 0 && kind <= 2 && v == (kind == kFull ? 4 : kind == kShift ? 5 : 2), "kind and V disagree");
  TORCH_CHECK(group > 0 && group <= kMaxGroup && k % group == 0, "group size must divide K and be <= 256");
  TORCH_CHECK(v * n * k < (int64_t(1) << 32), "logits of 2^32 elements or more: use the torch path");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == k / group,
              "scales: contiguous float32 [N, K / G]");
  if (kind == kShift) {
    TORCH_CHECK(q0.scalar_type() == torch::kInt8 && q0.is_contiguous() && q0.dim() == 2 && q0.size(0) == n &&
                    q0.size(1) == k,
                "q0: contiguous int8 [N, K] for the 3-bit local shift");
  }
  const auto ukey = static_cast<uint64_t>(key);
  return Args{logits.data_ptr<float>(), scales.data_ptr<float>(), kind == kShift ? q0.data_ptr<int8_t>() : nullptr,
              n, k, group, static_cast<int>(qmin), static_cast<int>(qmax), static_cast<float>(kappa),
              static_cast<float>(1.0 / tau), static_cast<uint32_t>(ukey), static_cast<uint32_t>(ukey >> 32)};
}

}  // namespace

// (W [N, K], c [N, K]) float32.
std::vector<torch::Tensor> soft_forward(torch::Tensor logits, torch::Tensor scales, torch::Tensor q0, int64_t kind,
                                        int64_t qmin, int64_t qmax, double kappa, double tau, int64_t group,
                                        int64_t key) {
  const Args a = make_args(logits, scales, q0, kind, qmin, qmax, kappa, tau, group, key);
  auto w = torch::empty({a.n, a.k}, logits.options());
  auto c = torch::empty({a.n, a.k}, logits.options());
  float *wp = w.data_ptr<float>(), *cp = c.data_ptr<float>();
  at::parallel_for(0, a.n, 16, [&](int64_t r0, int64_t r1) { run_rows(kind, a, r0, r1, wp, cp, nullptr, nullptr); });
  return {w, c};
}

// (dlogits [V, N, K], c [N, K]) float32 for the upstream gradient dW [N, K].
std::vector<torch::Tensor> soft_backward(torch::Tensor dw, torch::Tensor logits, torch::Tensor scales,
                                         torch::Tensor q0, int64_t kind, int64_t qmin, int64_t qmax, double kappa,
                                         double tau, int64_t group, int64_t key) {
  const Args a = make_args(logits, scales, q0, kind, qmin, qmax, kappa, tau, group, key);
  TORCH_CHECK(dw.scalar_type() == torch::kFloat32 && dw.is_contiguous() && dw.dim() == 2 && dw.size(0) == a.n &&
                  dw.size(1) == a.k,
              "dW: contiguous float32 [N, K]");
  auto dl = torch::empty_like(logits);
  auto c = torch::empty({a.n, a.k}, logits.options());
  float *dlp = dl.data_ptr<float>(), *cp = c.data_ptr<float>();
  const float* dwp = dw.data_ptr<float>();
  at::parallel_for(0, a.n, 16, [&](int64_t r0, int64_t r1) { run_rows(kind, a, r0, r1, nullptr, cp, dwp, dlp); });
  return {dl, c};
}

namespace {
__attribute__((target_clones("avx512f", "avx2", "default")))
void fill_noise(float* out, int64_t begin, int64_t end, const Args& a, bool logistic) {
  for (int64_t e = begin; e < end; ++e) out[e] = noise_at(a, static_cast<uint32_t>(e), logistic);
}
}  // namespace

// The noise the kernels above draw for `key`, as a float32 tensor of `shape` (< 2^32 elements).
torch::Tensor noise(std::vector<int64_t> shape, int64_t key, bool logistic) {
  auto out = torch::empty(shape, torch::dtype(torch::kFloat32).device(torch::kCPU));
  TORCH_CHECK(out.numel() < (int64_t(1) << 32), "noise of 2^32 elements or more");
  Args a{};
  a.key_lo = static_cast<uint32_t>(static_cast<uint64_t>(key));
  a.key_hi = static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32);
  float* p = out.data_ptr<float>();
  at::parallel_for(0, out.numel(), 1 << 16, [&](int64_t b, int64_t e) { fill_noise(p, b, e, a, logistic); });
  return out;
}

}  // namespace gsq_q
