// Fused dequantize + GEMV/GEMM for GSQ 2/3-bit weights on CPU (decode-sized M).
//
// y[m, n] = sum_g s[n, g] * sum_{k in group g} x[m, k] * (u[n, k] - offset)
//         = sum_g s[n, g] * (sum x*u  -  offset * sum x)
// so the inner loop only converts unsigned codes to float and multiplies;
// per-group sums of x (shared by every row n) are computed once per call.
//
// Layout (see gsq_vllm/cpu_gemm.py): lo uint8 [N, K/G, G/4], byte j of a
// group holds codes j + i*G/4 at bits 2i; hi uint8 [N, K/G, G/8] (3-bit),
// byte j holds bit 2 of codes j + i*G/8 at bit i. x float32 [M, K],
// scales float32 [N, K/G]. Returns float32 [M, N]. Parallel over N.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int kMaxRows = 64;
constexpr int kMaxGroup = 128;

torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& hi,
                   const torch::Tensor& scales, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous float32 [M, K]");
  TORCH_CHECK(lo.dtype() == torch::kUInt8 && lo.is_contiguous() && lo.dim() == 3, "lo: contiguous uint8 [N, K/G, G/4]");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous(), "scales: contiguous float32 [N, K/G]");
  TORCH_CHECK(bits == 2 || bits == 3, "bits must be 2 or 3");
  const int64_t G = group_size;
  TORCH_CHECK(G % 32 == 0 && G <= kMaxGroup, "group size must be 32, 64 or 128");
  const int64_t M = x.size(0), N = lo.size(0), NG = lo.size(1), K = NG * G;
  TORCH_CHECK(M <= kMaxRows, "at most ", kMaxRows, " rows; use the blocked path for more");
  TORCH_CHECK(x.size(1) == K && lo.size(2) == G / 4, "shape mismatch");
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == NG, "scales shape mismatch");
  const bool three = bits == 3;
  if (three) {
    TORCH_CHECK(hi.dtype() == torch::kUInt8 && hi.is_contiguous() && hi.numel() == N * NG * (G / 8), "hi: uint8 [N, K/G, G/8]");
  }
  const float offset = static_cast<float>(1 << (bits - 1));
  const float* xp = x.data_ptr<float>();
  const uint8_t* lop = lo.data_ptr<uint8_t>();
  const uint8_t* hip = three ? hi.data_ptr<uint8_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();

  // offset * sum of x over each group, per row: [M, NG]
  std::vector<float> xsum(M * NG, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < NG; ++g) {
      float acc = 0.f;
      for (int64_t k = 0; k < G; ++k) acc += xp[m * K + g * G + k];
      xsum[m * NG + g] = offset * acc;
    }

  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t Q = G / 4, E = G / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float w[kMaxGroup];
    for (int64_t n = n0; n < n1; ++n) {
      float acc[kMaxRows] = {0.f};
      for (int64_t g = 0; g < NG; ++g) {
        const uint8_t* l = lop + (n * NG + g) * Q;
        // Unpack one group's unsigned codes to float (vectorizable loops).
        for (int i = 0; i < 4; ++i)
          for (int64_t j = 0; j < Q; ++j) w[i * Q + j] = static_cast<float>((l[j] >> (2 * i)) & 3);
        if (three) {
          const uint8_t* h = hip + (n * NG + g) * E;
          for (int i = 0; i < 8; ++i)
            for (int64_t j = 0; j < E; ++j) w[i * E + j] += static_cast<float>(((h[j] >> i) & 1) << 2);
        }
        const float s = sp[n * NG + g];
        for (int64_t m = 0; m < M; ++m) {
          const float* xg = xp + m * K + g * G;
          float dot = 0.f;
          for (int64_t k = 0; k < G; ++k) dot += xg[k] * w[k];
          acc[m] += s * (dot - xsum[m * NG + g]);
        }
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = acc[m];
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "GSQ fused dequant+GEMM for few rows: x f32 [M,K] -> y f32 [M,N]");
}
