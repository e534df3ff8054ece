// The quantizer's CPU ops (module quantize._C, bound in binding.cpp).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace gsq_q {

// gsq_soft.cpp: GSQ's fused soft weight, its gradient, and the noise both draw.
std::vector<torch::Tensor> soft_forward(torch::Tensor logits, torch::Tensor scales, torch::Tensor q0, int64_t kind,
                                        int64_t qmin, int64_t qmax, double kappa, double tau, int64_t group,
                                        int64_t key);
std::vector<torch::Tensor> soft_backward(torch::Tensor dw, torch::Tensor logits, torch::Tensor scales,
                                         torch::Tensor q0, int64_t kind, int64_t qmin, int64_t qmax, double kappa,
                                         double tau, int64_t group, int64_t key);
torch::Tensor noise(std::vector<int64_t> shape, int64_t key, bool logistic);

// lion.cpp: one Lion update of a float32 parameter in place, in one pass.
void lion_update(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, double lr, double weight_decay,
                 double beta1, double beta2);

}  // namespace gsq_q
