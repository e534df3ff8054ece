// torch binding of the GSQ CUDA GEMM (csrc/gsq_gemm.cu).
//
// Registers the op `gsq::gemm` with torch.library (schema + CUDA impl), so it
// is traceable by torch.compile (the fake/meta impl is registered in Python,
// gsq_vllm/cuda_gemm.py) and capturable in CUDA graphs: it launches on the
// current stream and allocates only through the caching allocator.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "gsq_gemm.h"
#include "gsq_rules_py.h"

namespace {

namespace rules = gsq::rules;  // csrc/gsq_rules.h: the shapes the kernel takes, stated once

// The split-K counters of a device: zero when allocated, and every launch
// leaves them zero, so they are allocated (and zeroed) only when a larger
// layer needs more. One stream at a time: vLLM's model runs on one.
int* split_counters(const at::Device& device, size_t bytes) {
  static std::mutex mu;
  static std::unordered_map<int, at::Tensor> counters;
  const std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = counters[device.index()];
  if (!t.defined() || static_cast<size_t>(t.numel()) * sizeof(int) < bytes)
    t = at::zeros({static_cast<int64_t>((bytes + sizeof(int) - 1) / sizeof(int))},
                  at::TensorOptions().device(device).dtype(at::kInt));
  return t.data_ptr<int>();
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// a [M, K] fp16/bf16 row-major; b int32 [N/64, K*2*bits]; s [N/64, (K/G)*64] (dtype of a).
// Returns c [M, N] (dtype of a).
at::Tensor gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& s, int64_t bits,
                     int64_t group_size, int64_t n, int64_t k) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && s.is_cuda(), "gsq::gemm: all tensors must be on CUDA");
  TORCH_CHECK(a.device() == b.device() && a.device() == s.device(), "gsq::gemm: tensors on different devices");
  TORCH_CHECK(a.dim() == 2 && a.size(1) == k, "gsq::gemm: a must be [M, K=", k, "]");
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16, "gsq::gemm: a must be fp16 or bf16");
  TORCH_CHECK(s.scalar_type() == a.scalar_type(), "gsq::gemm: scales dtype must match a");
  TORCH_CHECK(b.scalar_type() == at::kInt, "gsq::gemm: b must be int32");
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX && rules::shape_ok(static_cast<int>(n), static_cast<int>(k),
                                                                  static_cast<int>(bits), static_cast<int>(group_size)),
              "gsq::gemm: the kernel does not take N=", n, " K=", k, " bits=", bits, " G=", group_size,
              " (gsq_vllm._C.shape_rules())");
  TORCH_CHECK(b.dim() == 2 && b.size(0) == n / rules::kNMultiple && b.size(1) == k * 2 * bits,
              "gsq::gemm: b has the wrong shape for N, K, bits");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == n / rules::kNMultiple && s.size(1) == k / group_size * 64,
              "gsq::gemm: s must be [N/64, K/G*64]");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && s.is_contiguous(), "gsq::gemm: inputs must be contiguous");
  TORCH_CHECK(aligned16(a) && aligned16(b) && aligned16(s), "gsq::gemm: inputs must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0);
  at::Tensor c = at::empty({m, n}, a.options());
  if (m == 0) return c;

  // The launch plan (kernel, split-K, workspace) is the kernel's host code's (gsq_gemm.cu).
  GsqDevice dev{};
  TORCH_CHECK(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, a.get_device()) == cudaSuccess &&
                  cudaDeviceGetAttribute(&dev.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                         a.get_device()) == cudaSuccess,
              "gsq::gemm: cannot query the device's SMs");
  const GsqGemmPlan plan = gsq_gemm_plan(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
                                         static_cast<int>(bits), static_cast<int>(group_size), dev);
  at::Tensor ws;
  if (plan.workspace_bytes) ws = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, a.options().dtype(at::kByte));
  int* counters = plan.counter_bytes ? split_counters(a.device(), plan.counter_bytes) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  const cudaError_t err = gsq_gemm_launch(
      a.data_ptr(), b.data_ptr(), s.data_ptr(), c.data_ptr(), plan.workspace_bytes ? ws.data_ptr() : nullptr,
      plan.workspace_bytes, counters, plan.counter_bytes, static_cast<int>(m), static_cast<int>(n),
      static_cast<int>(k), static_cast<int>(bits), static_cast<int>(group_size), a.scalar_type() == at::kBFloat16,
      dev, stream);
  TORCH_CHECK(err == cudaSuccess, "gsq::gemm: kernel launch failed: ", cudaGetErrorString(err));
  return c;
}

}  // namespace

// FRAGMENT: other extensions (e.g. a CPU kernel) may add ops to the gsq namespace too.
TORCH_LIBRARY_FRAGMENT(gsq, m) {
  m.def("gemm(Tensor a, Tensor b, Tensor s, int bits, int group_size, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(gsq, CUDA, m) { m.impl("gemm", &gemm_cuda); }

// Importing gsq_vllm._C runs the registrations above. Its Python functions are the kernel's shape
// rules (csrc/gsq_rules.h), which gsq_vllm/cuda_gemm.py reads instead of stating them again.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { gsq::rules::add_to_module(m, ""); }
