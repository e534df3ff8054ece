// Lion's update (Chen et al. 2023) for GSQ's logits and scales, in one pass over memory.
//
// GSQ takes a Lion step over every logit of a block each step (13M floats at 3 bits for
// SmolLM2's MLP); lion_pytorch's update_fn makes six passes and two temporaries for it. This
// is the same update, element by element, rounded exactly as torch's CPU kernels round it
// (`add(x, alpha=a)` is fma(x, a, self) there; a Python float scalar becomes a float):
//   p   = p * (1 - lr * wd)
//   u   = sign(fma(g, 1 - beta1, m * beta1))
//   p   = fma(u, -lr, p)
//   m   = fma(g, 1 - beta2, m * beta2)
// so a run gives the same bits with either (tests/test_gsq.py compares them).
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"

namespace gsq_q {
namespace {

struct LionScalars {
  float decay, one_minus_b1, b1, neg_lr, one_minus_b2, b2;
};

// "arch=haswell" (AVX2 + FMA), not "avx2": std::fma must be one instruction in every clone but the baseline.
__attribute__((target_clones("avx512f", "arch=haswell", "default")))
void lion_range(float* p, const float* g, float* m, int64_t begin, int64_t end, const LionScalars& s) {
  for (int64_t i = begin; i < end; ++i) {
    const float c = std::fma(g[i], s.one_minus_b1, m[i] * s.b1);
    const float u = static_cast<float>((c > 0.0f) - (c < 0.0f));
    p[i] = std::fma(u, s.neg_lr, p[i] * s.decay);
    m[i] = std::fma(g[i], s.one_minus_b2, m[i] * s.b2);
  }
}

}  // namespace

void lion_update(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, double lr, double weight_decay,
                 double beta1, double beta2) {
  for (const auto* t : {&param, &grad, &exp_avg}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->device().is_cpu(),
                "lion_update: contiguous float32 CPU tensors");
  }
  TORCH_CHECK(grad.numel() == param.numel() && exp_avg.numel() == param.numel(),
              "lion_update: param, grad and exp_avg of one size");
  const LionScalars s{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta1), static_cast<float>(-lr), static_cast<float>(1.0 - beta2),
                      static_cast<float>(beta2)};
  float* p = param.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  at::parallel_for(0, param.numel(), 1 << 15, [&](int64_t b, int64_t e) { lion_range(p, g, m, b, e, s); });
}

}  // namespace gsq_q
