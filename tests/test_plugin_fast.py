"""Fast tests of the vLLM plugin: config validation, CPU GEMM, fused weight loading.

No engine is started; vLLM layers are built directly under a 1-rank gloo
process group (recipe in /work/shared/notes/vllm-cpu.md).
"""

import socket

import pytest
import torch

from gsq_format import format as F
from gsq_vllm.cpu_gemm import choose_block_k, cpu_gemm, repack_for_cpu

BITS = [2, 3, 1.58]


def _random_quantized(n, k, bits, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = F.grid_range(bits)
    q = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
    return q, s


# ---------------------------------------------------------------- CPU GEMM


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,k,g,m", [(48, 576, 64, 3), (40, 2048 + 1024, 128, 1), (16, 96, 32, 7)])
def test_cpu_gemm_matches_dequantized_reference(bits, n, k, g, m):
    q, s = _random_quantized(n, k, bits, g, seed=n + k)
    qweight = F.pack_codes(q, bits)
    block_k = choose_block_k(k, g)
    assert k % block_k == 0 and block_k % g == 0
    lo, hi = repack_for_cpu(qweight, bits, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x @ F.dequantize(q, s, g).t()
    y = cpu_gemm(x, lo, hi, s, F.storage_bits(bits), g)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # bf16 activations: same result as a bf16 matmul of the bf16-rounded weight
    yb = cpu_gemm(x.bfloat16(), lo, hi, s, F.storage_bits(bits), g)
    refb = (x.bfloat16().float() @ F.dequantize(q, s, g, torch.bfloat16).float().t())
    torch.testing.assert_close(yb.float(), refb, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 5, 20])
def test_all_cpu_paths_match_reference(bits, m):
    """Blocked GEMM with torch dequant, blocked GEMM with C++ dequant, fused C++ kernel."""
    from gsq_vllm import cpu_gemm as C

    n, k, g = 72, 640, 32
    q, s = _random_quantized(n, k, bits, g, seed=m)
    lo, hi = repack_for_cpu(F.pack_codes(q, bits), bits, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    ref = x @ F.dequantize(q, s, g).t()
    sb = F.storage_bits(bits)
    torch.testing.assert_close(C._blocked_gemm(x, lo, hi, s, sb, g, use_cpp=False), ref, rtol=1e-5, atol=1e-5)
    if not C.cpp_kernel_available():
        pytest.skip("gsq_vllm._C_cpu not built")
    torch.testing.assert_close(C._blocked_gemm(x, lo, hi, s, sb, g), ref, rtol=1e-5, atol=1e-5)
    y = C._cpp.gemm(x.contiguous(), lo, hi, s.float().contiguous(), sb, g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # the C++ dequant of a group range, in both output dtypes, is the format's dequantize exactly
    for dtype in (torch.float32, torch.bfloat16):
        w = C._cpp.dequant(lo, hi, s.float().contiguous(), sb, g, 3, 7, dtype)
        assert torch.equal(w, F.dequantize(q, s, g, dtype)[:, 3 * g:7 * g])


def test_cpu_gemm_repack_keeps_storage_bits_per_weight():
    n, k, g = 32, 1024, 64
    for bits in (2, 3):
        q, _ = _random_quantized(n, k, bits, g)
        lo, hi = repack_for_cpu(F.pack_codes(q, bits), bits, g)
        assert (lo.numel() + hi.numel()) * 8 == n * k * bits


def test_cpu_gemm_traces_under_torch_compile():
    n, k, g = 32, 256, 64
    q, s = _random_quantized(n, k, 2, g)
    lo, hi = repack_for_cpu(F.pack_codes(q, 2), 2, g)
    x = torch.randn(2, k)
    fn = torch.compile(lambda a: torch.ops.gsq.cpu_gemm(a, lo, hi, s, 2, g) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x), 2 * (x @ F.dequantize(q, s, g).t()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- vLLM-side

vllm = pytest.importorskip("vllm", reason="vllm not installed")
pytestmark = pytest.mark.vllm

import emu_util  # noqa: E402

emu_util.register_emulated_kernel()  # GSQ_KERNEL=cuda-emu below


def _quant_dict(bits=2, group_size=64, modules_to_not_convert=(), **over):
    """A valid quantization_config dict, then ``over`` written on top (may make it invalid)."""
    d = F.GSQQuantConfig(bits=bits, group_size=group_size,
                         modules_to_not_convert=list(modules_to_not_convert)).to_dict()
    d.update(over)
    return d


def test_config_from_valid_dict():
    from gsq_vllm.config import GSQConfig

    cfg = GSQConfig.from_config(_quant_dict(bits=3, group_size=32, modules_to_not_convert=["lm_head"]))
    assert cfg.fmt.bits == 3 and cfg.fmt.group_size == 32
    assert cfg.get_name() == "gsq"
    assert cfg.get_min_capability() == 80


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"bits": 4, "storage_bits": 4}, "bits"),
        ({"group_size": 100}, "group_size"),
        ({"format_version": 99}, "format_version"),
        ({"quant_method": "gptq"}, "quant_method"),
        ({"storage_bits": 3}, "storage_bits"),
        ({"scale_dtype": "float32"}, "scale_dtype"),
    ],
)
def test_config_rejects_bad_dict_with_clear_error(over, needle):
    from gsq_vllm.config import GSQConfig

    with pytest.raises(ValueError, match=needle):
        GSQConfig.from_config(_quant_dict(**over))


def test_plugin_registers_gsq():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from gsq_vllm.config import GSQConfig
    from gsq_vllm.plugin import register

    register()
    assert "gsq" in QUANTIZATION_METHODS
    assert get_quantization_config("gsq") is GSQConfig


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_dist():
    """A 1-rank model-parallel group so vLLM parallel layers can be built without an engine."""
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        if not model_parallel_is_initialized():
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", backend="gloo",
            )
            initialize_model_parallel(1, 1)
        yield


def _load(layer, tensors, shard_ids):
    """Load checkpoint tensors per shard the way vLLM's model loader does."""
    params = dict(layer.named_parameters())
    for shard_id, (qw, sc) in zip(shard_ids, tensors):
        for pname, t in (("qweight", qw), ("scales", sc)):
            p = params[pname]
            if shard_id is None:
                p.weight_loader(p, t)
            else:
                p.weight_loader(p, t, shard_id)
    layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("bits", BITS)
def test_fused_qkv_loads_and_matches_reference(vllm_dist, bits):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    from gsq_vllm.config import GSQConfig

    hidden, head, nq, nkv, g = 192, 32, 6, 2, 64
    cfg = GSQConfig.from_config(_quant_dict(bits=bits, group_size=g))
    layer = QKVParallelLinear(hidden, head, nq, nkv, bias=False, params_dtype=torch.float32,
                              quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj")
    parts = [_random_quantized(n, hidden, bits, g, seed=i) for i, n in enumerate((nq * head, nkv * head, nkv * head))]
    _load(layer, [(F.pack_codes(q, bits), s) for q, s in parts], ["q", "k", "v"])
    # The checkpoint-layout codes are freed: no parameter left but the kernel's (`qweight` is only a
    # reference to the repacked codes, for vLLM code that looks a layer's device up through it).
    params = dict(layer.named_parameters())
    assert layer.gsq_kernel.name == "cpu" and "qweight" not in params and "scales" not in params
    # the kernel is the layer's one submodule: its packed tensors are the layer's parameters
    assert {n for n in params} == {"gsq_kernel.lo", "gsq_kernel.hi", "gsq_kernel.s"}
    assert layer.qweight.data_ptr() == layer.gsq_kernel.lo.data_ptr()
    w = torch.cat([F.dequantize(q, s, g) for q, s in parts])
    x = torch.randn(4, hidden)
    torch.testing.assert_close(layer(x)[0], x @ w.t(), rtol=1e-5, atol=1e-5)
    # What vLLM's MLA does with kv_b_proj at load: the layer's float weight, through apply(eye).
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_and_maybe_dequant_weights

    torch.testing.assert_close(get_and_maybe_dequant_weights(layer), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_fused_gate_up_and_row_parallel_load(vllm_dist, bits):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    from gsq_vllm.config import GSQConfig

    hidden, inter, g = 128, 256, 32
    cfg = GSQConfig.from_config(_quant_dict(bits=bits, group_size=g))
    gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=torch.float32,
                                         quant_config=cfg, prefix="model.layers.0.mlp.gate_up_proj")
    parts = [_random_quantized(inter, hidden, bits, g, seed=10 + i) for i in range(2)]
    _load(gate_up, [(F.pack_codes(q, bits), s) for q, s in parts], [0, 1])
    down = RowParallelLinear(inter, hidden, bias=False, params_dtype=torch.float32,
                             quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    qd, sd = _random_quantized(hidden, inter, bits, g, seed=20)
    _load(down, [(F.pack_codes(qd, bits), sd)], [None])
    x = torch.randn(3, hidden)
    w_gu = torch.cat([F.dequantize(q, s, g) for q, s in parts])
    h = gate_up(x)[0]
    torch.testing.assert_close(h, x @ w_gu.t(), rtol=1e-5, atol=1e-5)
    a = h[:, :inter] * h[:, inter:]  # stands in for SiLU-and-mul: down sees [M, inter]
    torch.testing.assert_close(down(a)[0], a @ F.dequantize(qd, sd, g).t(), rtol=1e-4, atol=1e-4)


def test_modules_to_not_convert_gives_unquantized_linear(vllm_dist):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    from gsq_vllm.config import GSQConfig
    from gsq_vllm.linear import GSQLinearMethod

    cfg = GSQConfig.from_config(_quant_dict(modules_to_not_convert=["down_proj"]))
    kept = ReplicatedLinear(128, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    quant = ReplicatedLinear(128, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.up_proj")
    assert isinstance(kept.quant_method, UnquantizedLinearMethod)
    assert isinstance(quant.quant_method, GSQLinearMethod)


def test_kept_linear_and_lm_head_use_the_dense_cpu_kernel_where_bf16_is_slow(vllm_dist):
    """A linear the checkpoint keeps in bf16, and lm_head, are vLLM's unquantized methods; on a
    CPU without a bf16 dot product their ``cpu_linear`` (what vLLM's CPU dispatch calls) is
    gsq::cpu_dense, and the logits are x @ W.T either way."""
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    from gsq_vllm import cpu_gemm as C
    from gsq_vllm.config import GSQConfig

    cfg = GSQConfig.from_config(_quant_dict(modules_to_not_convert=["down_proj"]))
    kept = ReplicatedLinear(128, 64, bias=False, quant_config=cfg, params_dtype=torch.bfloat16,
                            prefix="model.layers.0.mlp.down_proj")
    head = ParallelLMHead(256, 128, quant_config=cfg, params_dtype=torch.bfloat16, prefix="lm_head")
    assert isinstance(kept.quant_method, UnquantizedLinearMethod)
    assert isinstance(head.quant_method, UnquantizedEmbeddingMethod)
    gen = torch.Generator().manual_seed(4)
    for layer in (kept, head):
        w = torch.randn(layer.weight.shape, generator=gen).bfloat16()
        layer.weight.data.copy_(w)
        ours = C.dense_kernel_wanted(layer.weight)
        layer.quant_method.process_weights_after_loading(layer)  # vLLM's path may drop the weight
        x = torch.randn(5, 128, generator=gen).bfloat16()
        y = layer.quant_method.apply(layer, x)
        ref = x.double() @ w.double().t()
        torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        if ours:
            assert torch.equal(layer.weight.data, w)  # kept: tied embeddings read the same tensor
            assert torch.equal(y, C.cpu_dense(x, w, None))


def test_lm_head_one_row_runs_cpu_dense_where_bf16_is_native(vllm_dist, monkeypatch):
    """On a CPU with a bf16 dot product lm_head's calls with one row of x (batch-1 decode) run
    gsq::cpu_dense, calls with more rows vLLM's own GEMM (oneDNN), as GSQ_CPU_DENSE=0 does for
    every call. Both round the same float32 sums to bf16 (mostly the same bits), so the profiler
    tells which op ran."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from gsq_vllm import cpu_gemm as C
    from gsq_vllm.config import GSQConfig

    if not C.cpp_kernel_available() or not C._cpp.bf16_gemm_is_native():
        pytest.skip("needs gsq_vllm._C_cpu on a CPU with a bf16 dot product (elsewhere cpu_dense serves every call)")

    def ran_cpu_dense(layer, x):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = layer.quant_method.apply(layer, x)
        return y, any(e.name == "gsq::cpu_dense" for e in prof.events())

    cfg = GSQConfig.from_config(_quant_dict())
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(256, 128, generator=gen).bfloat16()
    x1, x5 = torch.randn(1, 128, generator=gen).bfloat16(), torch.randn(5, 128, generator=gen).bfloat16()
    for setting in ("1", "0"):
        monkeypatch.setenv("GSQ_CPU_DENSE", setting)
        head = ParallelLMHead(256, 128, quant_config=cfg, params_dtype=torch.bfloat16, prefix="lm_head")
        head.weight.data.copy_(w)
        head.quant_method.process_weights_after_loading(head)
        for x, ours in ((x1, setting == "1"), (x5, False)):
            y, dense = ran_cpu_dense(head, x)
            assert dense == ours, (setting, x.shape[0])
            ref = x.double() @ w.double().t()
            torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        assert torch.equal(head.weight.data, w)  # tied embeddings read the same tensor


def test_dense_int8_serves_lm_head_and_kept_linears_but_not_the_embedding(vllm_dist, monkeypatch):
    """GSQ_CPU_DENSE=int8: lm_head and a kept linear compute with an int8 copy of their weight
    (gsq::cpu_dense_int8) up to 2 rows of x and with the bf16 weight above (lm_head, where the CPU
    has a bf16 dot product, through vLLM's own GEMM); that weight stays (a tied embedding reads it),
    and the embedding gets no int8 copy. Without the variable nothing changes (the test above)."""
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    from gsq_vllm import cpu_gemm as C
    from gsq_vllm.config import GSQConfig

    if not C.cpp_kernel_available():
        pytest.skip("gsq_vllm._C_cpu not built")
    monkeypatch.setenv("GSQ_CPU_DENSE", "int8")
    cfg = GSQConfig.from_config(_quant_dict(modules_to_not_convert=["down_proj"]))
    kept = ReplicatedLinear(128, 64, bias=False, quant_config=cfg, params_dtype=torch.bfloat16,
                            prefix="model.layers.0.mlp.down_proj")
    head = ParallelLMHead(256, 128, quant_config=cfg, params_dtype=torch.bfloat16, prefix="lm_head")
    embed = VocabParallelEmbedding(256, 128, quant_config=cfg, params_dtype=torch.bfloat16, prefix="model.embed_tokens")
    gen = torch.Generator().manual_seed(5)
    for layer in (kept, head):
        w = torch.randn(layer.weight.shape, generator=gen).bfloat16()
        layer.weight.data.copy_(w)
        layer.quant_method.process_weights_after_loading(layer)
        assert torch.equal(layer.weight.data, w)
        x = torch.randn(2, 128, generator=gen).bfloat16()  # decode-sized: the int8 kernel
        y = layer.quant_method.apply(layer, x)
        assert torch.equal(y, C.cpu_dense_int8(x, *C.quantize_dense_int8(w), None))
        ref = x.double() @ w.double().t()
        assert (y.double() - ref).norm() / ref.norm() < 0.02
        x = torch.randn(5, 128, generator=gen).bfloat16()  # more rows: the bf16 weight
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = layer.quant_method.apply(layer, x)
        in_op = any(e.name == "gsq::cpu_dense_int8" for e in prof.events())
        if layer is head and C._bf16_gemm_is_native():  # vLLM's own lm_head GEMM (weight packed once), not the op
            vllm_head = ParallelLMHead(256, 128, params_dtype=torch.bfloat16, prefix="lm_head")
            vllm_head.weight.data.copy_(w)
            vllm_head.quant_method.process_weights_after_loading(vllm_head)
            assert torch.equal(y, vllm_head.quant_method.apply(vllm_head, x)) and not in_op
        else:
            assert in_op  # in the op: cpu_dense where bf16 is not native; torch's linear where it is
            assert torch.equal(y, C.cpu_dense(x, w, None) if not C._bf16_gemm_is_native()
                               else torch.nn.functional.linear(x, w))
    embed.weight.data.copy_(torch.randn(embed.weight.shape, generator=gen).bfloat16())
    embed.quant_method.process_weights_after_loading(embed)
    assert not hasattr(embed, "gsq_dense_wq")


def test_group_size_not_dividing_input_is_a_clear_error(vllm_dist):
    from vllm.model_executor.layers.linear import ReplicatedLinear

    from gsq_vllm.config import GSQConfig

    cfg = GSQConfig.from_config(_quant_dict(group_size=128))
    with pytest.raises(ValueError, match="does not divide"):
        ReplicatedLinear(576, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.up_proj")


def test_moe_router_stays_unquantized(vllm_dist):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    from gsq_vllm.config import GSQConfig
    from gsq_vllm.linear import GSQLinearMethod

    cfg = GSQConfig.from_config(_quant_dict())
    router = ReplicatedLinear(128, 8, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.gate")
    gate_proj = ReplicatedLinear(128, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.gate_proj")
    assert isinstance(router.quant_method, UnquantizedLinearMethod)
    assert isinstance(gate_proj.quant_method, GSQLinearMethod)


# ---------------------------------------------------------------- CUDA layout on CPU (emulated)


@pytest.fixture
def fresh_selfcheck(monkeypatch):
    from gsq_vllm import kernels

    monkeypatch.setattr(kernels, "_selfcheck_results", {})


def _bf16_gate_up(bits, g=64, hidden=128, inter=128, seed=30):
    """A loaded bf16 gate_up layer (N = 2 * inter, K = hidden) and its dequantized fp32 weight."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    from gsq_vllm.config import GSQConfig

    cfg = GSQConfig.from_config(_quant_dict(bits=bits, group_size=g))
    layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=torch.bfloat16,
                                       quant_config=cfg, prefix="model.layers.0.mlp.gate_up_proj")
    parts = [_random_quantized(inter, hidden, bits, g, seed=seed + i) for i in range(2)]
    _load(layer, [(F.pack_codes(q, bits), s) for q, s in parts], [0, 1])
    return layer, torch.cat([F.dequantize(q, s, g) for q, s in parts])


@pytest.mark.parametrize("bits", [2, 3, 1.58])
def test_cuda_emu_kernel_serves_a_layer(vllm_dist, monkeypatch, fresh_selfcheck, bits):
    monkeypatch.setenv("GSQ_KERNEL", "cuda-emu")
    layer, w = _bf16_gate_up(bits)
    assert layer.gsq_kernel.name == "cuda-emu" and layer.gsq_kernel.b.dtype == torch.int32
    x = torch.randn(5, 128).bfloat16()
    y = layer(x)[0]
    ref = x.float() @ w.t()
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_unknown_kernel_choice_is_a_clear_error(vllm_dist, monkeypatch):
    monkeypatch.setenv("GSQ_KERNEL", "tpu")
    with pytest.raises(ValueError, match="GSQ_KERNEL='tpu': choose one of auto, cuda, cuda-emu, cpu"):
        _bf16_gate_up(2)


def test_load_time_selfcheck_stops_a_wrong_kernel(vllm_dist, monkeypatch, fresh_selfcheck, tmp_path):
    from test_cuda_emu_mutants import MUTANTS, _build

    from gsq_vllm import cuda_emu

    wrong = cuda_emu.Emulator(_build("wrong scale column", MUTANTS["wrong scale column"], tmp_path))  # a mutated csrc
    monkeypatch.setattr(cuda_emu, "_default", wrong)
    monkeypatch.setenv("GSQ_KERNEL", "cuda-emu")
    with pytest.raises(RuntimeError, match=r"self-check failed for layer model.layers.0.mlp.gate_up_proj.*"
                                           r"N=256, K=128, bits=2, G=64"):
        _bf16_gate_up(2)
    # fallback: the layer loads on the dequantize path and computes the right thing
    monkeypatch.setenv("GSQ_KERNEL_SELFCHECK", "fallback")
    layer, w = _bf16_gate_up(2)
    assert layer.gsq_kernel.name == "cpu"
    x = torch.randn(3, 128).bfloat16()
    ref = x.float() @ w.t()
    assert ((layer(x)[0].float() - ref).norm() / ref.norm()).item() < 1e-2


def test_kernel_choice_follows_gsq_kernel(monkeypatch):
    """gsq_vllm.kernels.choose: auto takes the first registered kernel that supports the weight and never
    the emulator; a named kernel serves the shapes it takes and the CPU fallback the rest; a named kernel
    that cannot run here is an error."""
    from gsq_vllm import kernels as K

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert [c.name for c in K.registered_kernels()] == ["cuda", "cuda-emu", "cpu"]
    monkeypatch.delenv("GSQ_KERNEL", raising=False)
    assert K.choose(128, 128, 64, 2, bf16, cpu) is K.CPUKernel  # no CUDA layer here
    monkeypatch.setenv("GSQ_KERNEL", "cuda-emu")
    assert K.choose(128, 128, 64, 1.58, bf16, cpu) is emu_util.EmulatedCUDAKernel
    assert K.choose(96, 128, 64, 2, bf16, cpu) is K.CPUKernel  # N not a multiple of 64
    assert K.choose(128, 128, 64, 2, torch.float32, cpu) is K.CPUKernel  # the kernel takes fp16/bf16
    assert not K.CUDAKernel.supports(128, 128, 64, 2, bf16, cpu)[0]
    monkeypatch.setenv("GSQ_KERNEL", "cuda")
    with pytest.raises(ValueError, match=r"GSQ_KERNEL=cuda, but the gsq CUDA kernel is not usable here \(layer on cpu"):
        K.choose(128, 128, 64, 2, bf16, cpu)
