"""``GSQLinearMethod``: how a vLLM linear layer holds and applies GSQ weights.

Parameters (per tensor-parallel rank, ``N = sum(output_partition_sizes)``,
``K = input_size_per_partition``, ``b`` = storage bits, ``G`` = group size):

* ``qweight`` int32 ``[N, K*b/32]``: the checkpoint's packed codes, packed
  along the *input* dim, so fused QKV / gate-up loading (which slices the
  output dim) and row-parallel sharding (which slices whole words of the
  input dim) need no special cases.
* ``scales`` ``[N, K/G]`` in the checkpoint's scale dtype.

After loading, :meth:`process_weights_after_loading` repacks once for the
kernel that ``apply`` will use, chosen by ``GSQ_KERNEL``:

* ``auto`` (default): the CUDA kernel (``gsq_vllm.cuda_gemm``) when the
  extension is built, a CUDA device holds the layer and it supports the
  shape; otherwise the CPU bit-plane layout of ``gsq_vllm.cpu_gemm``;
* ``cuda``: as auto, but a missing extension or device is an error;
* ``cuda-emu``: the CUDA kernel's layout and real source, run on the CPU by
  the emulator (``torch.ops.gsq.gemm_emulated``; slow, for tests);
* ``cpu``: always the CPU layout.

Before a layer takes the CUDA kernel (real or emulated), the kernel is run
once per distinct (kernel, N, K, bits, G, dtype) on random activations with
that layer's weights and compared with dequantize + matmul in fp32; a
mismatch stops loading with an error naming the layer.
``GSQ_KERNEL_SELFCHECK=fallback`` serves such layers on the dequant path
instead (with a warning); ``off`` skips the check. Shapes the kernel cannot
take always use the CPU layout. The original ``qweight`` is dropped so only
one packed copy stays in memory.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from gsq_vllm import cpu_gemm
from gsq_format.format import FormatError, check_group_size, dequantize_packed, storage_bits

logger = logging.getLogger(__name__)
_cpu_kernel_logged = False


def _log_cpu_kernel_once() -> None:
    """Say once per process which CPU kernel serves (cpuid's choice or GSQ_CPU_ISA)."""
    global _cpu_kernel_logged
    if not _cpu_kernel_logged:
        _cpu_kernel_logged = True
        isa = cpu_gemm.cpu_isa() or "torch (C++ extension not built)"
        # under vLLM's logger, so the line shows where vLLM's own INFO lines do
        logging.getLogger("vllm.gsq").info(
            "gsq: CPU GEMM kernel %s (fused up to %d rows; GSQ_CPU_ISA forces one)", isa, cpu_gemm.cpp_max_rows())


KERNEL_CHOICES = ("auto", "cuda", "cuda-emu", "cpu")
SELFCHECK_CHOICES = ("on", "fallback", "off")
SELFCHECK_MS = (1, 33)  # one partial 16-row block, one partial 64-row block
SELFCHECK_MAX_REL_ERR = 1e-2
# (kernel, N, K, bits, G, dtype) -> passed: each distinct problem is checked once per process
_selfcheck_results: dict[tuple, bool] = {}


def _env_choice(var: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(var, default)
    if value not in choices:
        raise ValueError(f"{var}={value!r}: choose one of {', '.join(choices)}")
    return value


def _cuda_gemm_module():
    """``gsq_vllm.cuda_gemm`` if importable and usable, else None (CPU machines)."""
    try:
        from gsq_vllm import cuda_gemm
    except ImportError:
        return None
    try:
        return cuda_gemm if cuda_gemm.cuda_kernel_available() else None
    except Exception:
        return None


# The v2 loader is what lets vLLM's parameter classes place fused shards.
@register_weight_loader_v2_supported_method
class GSQLinearMethod(LinearMethodBase):
    """Weight-only GSQ linear: ``y = x @ (s * q).T + bias``."""

    def __init__(self, quant_config, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.fmt = quant_config.fmt
        self.prefix = prefix  # the layer's name in the model, for errors

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        g = self.fmt.group_size
        sb = self.fmt.storage_bits
        k = input_size_per_partition
        name = self.prefix or type(layer).__name__
        # Row-parallel layers hold K / tp_size input features per rank; groups must not straddle ranks.
        per_rank = f"{k} input features per rank of {input_size}" if k != input_size else f"{k} input features"
        try:
            check_group_size(k, g, f"gsq layer {name} ({per_rank})")
        except FormatError as e:
            hint = "; or use a smaller tensor-parallel size" if k != input_size else ""
            raise ValueError(f"{e}{hint}") from None
        if k % 32:
            raise ValueError(f"gsq layer {name}: {per_rank}; must be a multiple of 32 (whole packed words)")
        n = sum(output_partition_sizes)
        weight_loader = extra_weight_attrs["weight_loader"]
        qweight = PackedvLLMParameter(
            data=torch.empty(n, k * sb // 32, dtype=torch.int32),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=Fraction(32, sb) if 32 % sb else 32 // sb,
            weight_loader=weight_loader,
        )
        scales = GroupQuantScaleParameter(
            data=torch.empty(n, k // g, dtype=self.fmt.torch_scale_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.gsq_n = n
        layer.gsq_k = k
        layer.gsq_act_dtype = params_dtype

    def _choose_kernel(self, layer: torch.nn.Module, qweight: torch.Tensor) -> str:
        """"cuda", "cuda-emu" or "cpu" for this layer (GSQ_KERNEL, the device, the shape)."""
        from gsq_vllm import cuda_gemm

        choice = _env_choice("GSQ_KERNEL", KERNEL_CHOICES, "auto")
        supported = cuda_gemm.cuda_supports(layer.gsq_n, layer.gsq_k, self.fmt.bits, self.fmt.group_size)
        if choice == "cpu":
            return "cpu"
        if choice == "cuda-emu":
            return "cuda-emu" if supported and layer.gsq_act_dtype in cuda_gemm.MAGIC else "cpu"
        usable = qweight.is_cuda and _cuda_gemm_module() is not None
        if choice == "cuda" and not usable:
            raise ValueError("GSQ_KERNEL=cuda, but the gsq CUDA kernel is not usable here "
                             f"(layer on {qweight.device}, extension built: {_cuda_gemm_module() is not None})")
        return "cuda" if usable and supported else "cpu"

    def _kernel_passes_selfcheck(self, layer, kernel, qweight, scales, b, s) -> bool:
        """Run the kernel on random activations against dequantize + matmul (fp32), once per
        distinct problem. False only in fallback mode; a mismatch raises otherwise."""
        mode = _env_choice("GSQ_KERNEL_SELFCHECK", SELFCHECK_CHOICES, "on")
        if mode == "off":
            return True
        bits, g, n, k, dtype = self.fmt.bits, self.fmt.group_size, layer.gsq_n, layer.gsq_k, layer.gsq_act_dtype
        key = (kernel, n, k, bits, g, dtype)
        if key not in _selfcheck_results:
            w = dequantize_packed(qweight, scales.float(), bits, g).to(qweight.device)
            gen = torch.Generator().manual_seed(0)
            worst = 0.0
            for m in SELFCHECK_MS:
                a = torch.randn(m, k, generator=gen).to(dtype).to(qweight.device)
                got = self._gemm(kernel, a, b, s, n, k).float()
                ref = a.float() @ w.t()
                rel = ((got - ref).norm() / ref.norm()).item()
                worst = max(worst, rel if torch.isfinite(got).all() else float("inf"))
            _selfcheck_results[key] = worst <= SELFCHECK_MAX_REL_ERR
            if not _selfcheck_results[key]:
                msg = (f"gsq: load-time self-check failed for layer {getattr(layer, 'prefix', '') or '?'}: the "
                       f"{kernel} kernel differs from dequantize + matmul by relative error {worst:.3g} "
                       f"(N={n}, K={k}, bits={bits}, G={g}, {dtype}; limit {SELFCHECK_MAX_REL_ERR})")
                if mode == "on":
                    raise RuntimeError(msg + ". Set GSQ_KERNEL_SELFCHECK=fallback to serve such layers on the "
                                       "slower dequantize path.")
                logger.warning("%s; serving layers of this shape on the dequantize path", msg)
        return _selfcheck_results[key]

    def _gemm(self, kernel: str, x: torch.Tensor, b, s, n: int, k: int) -> torch.Tensor:
        if kernel == "cuda-emu":
            from gsq_vllm import cuda_emu  # noqa: F401  (registers torch.ops.gsq.gemm_emulated)

            return torch.ops.gsq.gemm_emulated(x, b, s, storage_bits(self.fmt.bits), self.fmt.group_size, n, k)
        from gsq_vllm import cuda_gemm

        return cuda_gemm.gsq_gemm(x, b, s, self.fmt.bits, self.fmt.group_size, n, k)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        bits, g = self.fmt.bits, self.fmt.group_size
        qweight = layer.qweight.data
        scales = layer.scales.data
        kernel = self._choose_kernel(layer, qweight)
        if kernel != "cpu":
            from gsq_vllm import cuda_gemm

            # The CUDA kernel reads its scales in the activation dtype.
            b, s = cuda_gemm.repack(qweight, scales, bits, g, dtype=layer.gsq_act_dtype)
            if not self._kernel_passes_selfcheck(layer, kernel, qweight, scales, b, s):
                kernel = "cpu"
        if kernel != "cpu":
            layer.gsq_kernel = kernel
            layer.gsq_b = torch.nn.Parameter(b, requires_grad=False)
            layer.gsq_s = torch.nn.Parameter(s, requires_grad=False)
        else:
            _log_cpu_kernel_once()
            lo, hi = cpu_gemm.repack_for_cpu(qweight.cpu(), bits, g)
            layer.gsq_kernel = "cpu"
            layer.gsq_lo = torch.nn.Parameter(lo.to(qweight.device), requires_grad=False)
            layer.gsq_hi = torch.nn.Parameter(hi.to(qweight.device), requires_grad=False)
            layer.gsq_s = torch.nn.Parameter(scales.contiguous(), requires_grad=False)
        del layer.qweight
        del layer.scales
        # A plain attribute, not a parameter: vLLM code that needs a layer's float weight (MLA's
        # kv_b_proj, absorbed into attention at load) finds the device through `qweight` and then
        # calls `apply` on an identity matrix, which gives exactly the dequantized weight.
        layer.qweight = layer.gsq_b.data if kernel != "cpu" else layer.gsq_lo.data

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [..., K] -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, x.shape[-1])
        bits = storage_bits(self.fmt.bits)
        if layer.gsq_kernel != "cpu":
            y = self._gemm(layer.gsq_kernel, x2, layer.gsq_b, layer.gsq_s, layer.gsq_n, layer.gsq_k)
        else:
            y = torch.ops.gsq.cpu_gemm(x2, layer.gsq_lo, layer.gsq_hi, layer.gsq_s, bits, self.fmt.group_size)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
