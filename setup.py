"""gsq-vllm: GSQ 2/3-bit quantizer + vLLM plugin with Marlin-style kernels.

The CUDA extension (``gsq_vllm._C``, sources in csrc/) is built only when
torch was built with CUDA and nvcc is found, or when GSQ_BUILD_CUDA=1 forces
it. GSQ_BUILD_CUDA=0 never builds it. A CPU machine installs cleanly without.
Build with ``pip install --no-build-isolation -e .`` so the build sees the
installed torch.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CUDA_ARCHS = ("80", "86", "89", "90")


def _want_cuda() -> bool:
    forced = os.environ.get("GSQ_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))  # csrc/cpu/ not included
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # TORCH_CUDA_ARCH_LIST set (e.g. "9.0": scripts/gpu_check.py builds for the one GPU it runs on):
    # no -gencode here, so torch's BuildExtension takes the arches from it; else all of CUDA_ARCHS.
    gencode = ([] if os.environ.get("TORCH_CUDA_ARCH_LIST")
               else [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS])
    ext = CUDAExtension(
        name="gsq_vllm._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *gencode],
        },
    )
    return [ext], {"build_ext": BuildExtension}


def _cpu_extensions():
    """The fused CPU kernel (gsq_vllm._C_cpu) whenever torch is importable; pure-torch fallback otherwise."""
    if os.environ.get("GSQ_BUILD_CPU") == "0":
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    if not sources:
        return []
    # No -ffast-math: the kernels vectorize with intrinsics or explicit lane accumulators, and the
    # int8 activation rounding must be the IEEE one the tests reproduce. The build is portable:
    # the AVX2 and AVX-512 kernels carry their own target pragmas and are picked at load from
    # cpuid, so a wheel or a build cache moved to another machine still runs.
    # GSQ_CPU_NATIVE=1 adds -march=native (only the generic kernel gains from it).
    # -fopenmp: torch's CPU build runs at::parallel_for through OpenMP, and that function is an
    # inline template whose `#pragma omp parallel` is compiled into *our* library; without the
    # flag the pragma is dropped and every kernel runs on one thread whatever torch's thread
    # count (found 2026-12-04: until then every CPU kernel here was single-threaded;
    # tests/test_cpu_threads.py). At run time the libgomp.so.1 torch has loaded serves both.
    omp = ["-fopenmp"]
    flags = ["-O3", "-std=c++17", *omp]
    if os.environ.get("GSQ_CPU_NATIVE", "0") == "1":
        flags.append("-march=native")
    # The quantizer's own ops (GSQ's soft weight and noise, Lion): no -march=native and no FMA
    # contraction, so every machine computes bit-identical results (their target_clones pick
    # AVX-512/AVX2 at run time). -fno-trapping-math lets GCC turn the selects in exp_approx into
    # vector blends (with trapping math it keeps them as branches and the softmax loop stays
    # scalar, 3x slower); no result changes, as no code here reads the FP exception flags.
    quantizer = CppExtension("quantize._C", [f"csrc/quantize/{f}.cpp" for f in ("binding", "gsq_soft", "lion")],
                             extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", *omp],
                             extra_link_args=omp)
    return [CppExtension("gsq_vllm._C_cpu", sources, extra_compile_args=flags, extra_link_args=omp), quantizer]


ext_modules, cmdclass = _extensions()
_cpu_exts = _cpu_extensions()
if _cpu_exts:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = ext_modules + _cpu_exts
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="gsq-vllm",
    version="0.1.0",
    description="GSQ (Gumbel-Softmax Quantization) 2/3-bit quantizer and vLLM serving plugin",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gsq_format", "gsq_format.*", "gsq_vllm", "gsq_vllm.*", "quantize", "quantize.*"]),
    install_requires=[
        "torch",
        "transformers",
        "safetensors",
        "gguf",
        "accelerate",
        "lion-pytorch",
        "tqdm",
        "compressed-tensors",
    ],
    extras_require={
        # cuobjdump / nvdisasm: benchmarks/kernel_static.py reads the kernels' SASS (no GPU needed)
        # lm-eval[api]: benchmarks/lm_eval_served.py and its test (served vs offline perplexity)
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "pybind11", "ninja",
                "nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm", "openai", "lm-eval[api]==0.4.13"],
    },
    entry_points={
        "console_scripts": [
            "gsq-quantize=quantize.cli:main",
            "gsq-eval=quantize.eval_cli:main",
            "gsq-serve=gsq_vllm.serve:main",
            "gsq-convert=gsq_format.convert:main",
        ],
        "vllm.general_plugins": [
            "gsq=gsq_vllm.plugin:register",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
