// gsq::rules (csrc/gsq_rules.h) as Python functions of an extension module: the CUDA extension
// exports them as shape_rules / shape_ok / chunk_k, the CPU extension as cuda_shape_rules / ... so
// Python reads the CUDA kernel's rules on machines without the CUDA extension. Needs pybind11
// (torch/extension.h) included first.
#pragma once

#include <string>
#include <vector>

#include "gsq_rules.h"

namespace gsq::rules {

inline void add_to_module(pybind11::module_& m, const std::string& prefix) {
  namespace py = pybind11;
  m.def((prefix + "shape_rules").c_str(), [] {
    py::dict d;
    d["group_sizes"] = py::tuple(py::cast(std::vector<int>(std::begin(kGroupSizes), std::end(kGroupSizes))));
    d["storage_bits"] = py::tuple(py::cast(std::vector<int>(std::begin(kStorageBits), std::end(kStorageBits))));
    d["n_multiple"] = kNMultiple;
    d["k_multiple"] = kKMultiple;
    return d;
  }, "the CUDA kernel's shape rules: group sizes, storage bits, and what N and K must be multiples of");
  m.def((prefix + "shape_ok").c_str(), &shape_ok, "whether the CUDA kernel takes an [N, K] weight", py::arg("n"),
        py::arg("k"), py::arg("bits"), py::arg("group_size"));
  m.def((prefix + "chunk_k").c_str(), &chunk_k, "the chunk of K one CUDA kernel item covers (the repack's layout)",
        py::arg("k"), py::arg("group_size"));
}

}  // namespace gsq::rules
