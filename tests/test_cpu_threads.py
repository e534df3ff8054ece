"""The C++ libraries run their kernels on torch's threads.

torch's CPU build implements at::parallel_for with OpenMP, inline in the calling library, so a
library compiled without -fopenmp runs it on one thread whatever torch.set_num_threads says
(every CPU kernel here did, until 2026-12-04). Each library reports how many distinct threads its
own parallel_for used; it must be torch's count."""

import pytest
import torch

from gsq_vllm import cpu_gemm as C


def _libraries():
    libs = []
    if C.cpp_kernel_available():
        libs.append(("gsq_vllm._C_cpu", C._cpp))
    try:
        import quantize._C as q
        libs.append(("quantize._C", q))
    except ImportError:
        pass
    return libs


@pytest.mark.parametrize("name,lib", _libraries(), ids=lambda v: v if isinstance(v, str) else "")
def test_parallel_for_uses_torchs_threads(name, lib):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lib.parallel_threads() == 1
        torch.set_num_threads(2)  # OpenMP gives a region 2 threads even on a 1-core machine
        assert lib.parallel_threads() == 2, f"{name}: at::parallel_for ran on one thread (built without -fopenmp?)"
    finally:
        torch.set_num_threads(before)
