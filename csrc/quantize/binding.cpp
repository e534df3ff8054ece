// quantize._C: the quantizer's CPU ops (ops.h).
#include <ATen/Parallel.h>

#include <atomic>

#include "ops.h"

// How many distinct threads at::parallel_for hands work to in this library. torch's CPU build
// runs parallel_for through OpenMP inline in the caller's code, so a library built without
// -fopenmp silently runs it on one thread (setup.py); tests check this against torch's count.
int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << (at::get_thread_num() % 64)); });
  return __builtin_popcountll(seen.load());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gsq_q;
  m.def("parallel_threads", &parallel_threads, "distinct threads at::parallel_for uses in this library (OpenMP build check)");
  m.def("noise", &noise, "float32 Gumbel(0,1) or (logistic) Logistic(0,1) noise of `shape` for `key`",
        py::arg("shape"), py::arg("key"), py::arg("logistic"));
  m.def("soft_forward", &soft_forward, "GSQ soft weight: (W [N,K], c [N,K]) from logits [V,N,K]");
  m.def("soft_backward", &soft_backward, "GSQ soft weight backward: (dlogits [V,N,K], c [N,K]) from dW [N,K]");
  m.def("lion_update", &lion_update, "one Lion update of float32 param and exp_avg in place, as lion_pytorch's",
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("lr"), py::arg("weight_decay"),
        py::arg("beta1"), py::arg("beta2"));
}
