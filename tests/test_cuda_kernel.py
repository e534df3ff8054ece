"""GPU correctness of torch.ops.gsq.gemm (skipped cleanly without CUDA + extension).

Reference: float64 ``A @ dequant(B).T`` from the checkpoint layout (format.py),
relative Frobenius error <= 1e-2, fresh random non-zero inputs, the output
buffer poisoned (NaN) before every run by filling the block the caching
allocator hands out next.
"""

import pytest
import torch

from gsq_vllm import cuda_gemm as cg
from gsq_format.format import dequantize, grid_range, pack_codes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cg.cuda_kernel_available(), reason="needs CUDA and the gsq_vllm._C extension"),
]

MS = [1, 2, 3, 4, 8, 16, 32, 64, 128, 256]
# (N, K, G): SmolLM2-135M (K=576 = 9x64, G=64), Llama-3.1-8B, Llama-3.1-70B slices
SHAPES = [
    (576, 576, 64), (192, 576, 64), (1536, 576, 64), (576, 1536, 128),
    (4096, 4096, 128), (6144, 4096, 64), (14336, 4096, 128), (4096, 14336, 128),
    (1024, 8192, 128), (8192, 8192, 64),
]


def _layer(n, k, bits, g, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = grid_range(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype)
    qweight = pack_codes(q, bits)
    w64 = dequantize(q, s, g, torch.float64)
    b_r, s_r = cg.repack(qweight.cuda(), s.cuda(), bits, g)
    return w64.cuda(), b_r, s_r


def _poison(shape, dtype):
    # The caching allocator hands the next same-size request the block freed last:
    # fill that block with NaN so any output the kernel fails to write shows up.
    x = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    del x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 1.58])
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_gemm_matches_float64(n, k, g, bits, dtype):
    w64, b_r, s_r = _layer(n, k, bits, g, dtype, seed=n * 7 + k + g)
    for m in MS:
        a = (torch.randn(m, k, device="cuda") + 0.1).to(dtype)
        ref = a.double() @ w64.t()
        _poison((m, n), dtype)
        out = cg.gsq_gemm(a, b_r, s_r, bits, g, n, k)
        torch.cuda.synchronize()
        assert out.shape == (m, n) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"M={m}: unwritten or non-finite outputs"
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"M={m} N={n} K={k} G={g} bits={bits} {dtype}: rel err {rel:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_under_torch_compile(dtype):
    n, k, g, bits = 1024, 1024, 128, 3
    w64, b_r, s_r = _layer(n, k, bits, g, dtype, seed=1)
    f = torch.compile(lambda a: cg.gsq_gemm(a, b_r, s_r, bits, g, n, k), fullgraph=True)
    a = torch.randn(8, k, device="cuda", dtype=dtype)
    out = f(a)
    ref = a.double() @ w64.t()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


def test_gemm_cuda_graph_capture():
    n, k, g, bits, dtype = 2048, 4096, 128, 2, torch.float16
    w64, b_r, s_r = _layer(n, k, bits, g, dtype, seed=2)
    a = torch.randn(4, k, device="cuda", dtype=dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cg.gsq_gemm(a, b_r, s_r, bits, g, n, k)  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cg.gsq_gemm(a, b_r, s_r, bits, g, n, k)
    a.copy_(torch.randn_like(a))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = a.double() @ w64.t()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= 1e-2


def _swap_linears(model, ckpt_tensors, make_fn):
    """Replace every quantized nn.Linear of ``model`` by ``make_fn(qweight, scales, n, k)``'s
    ``[M, K] -> [M, N]`` function (the bias, if any, is added after)."""

    class PathLinear(torch.nn.Module):
        def __init__(self, fn, bias):
            super().__init__()
            self.fn, self.bias = fn, bias

        def forward(self, x):
            y = self.fn(x.reshape(-1, x.shape[-1]))
            y = y if self.bias is None else y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])

    for name in [k[: -len(".qweight")] for k in ckpt_tensors if k.endswith(".qweight")]:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        fn = make_fn(ckpt_tensors[name + ".qweight"], ckpt_tensors[name + ".scales"],
                     lin.out_features, lin.in_features)
        setattr(model.get_submodule(parent), child, PathLinear(fn, lin.bias))
    return model


def _gpu_and_cpu_path_logits(tmp_path, bits, device):
    """Logits of a tiny quantized Llama through the plugin's two GEMM paths, bf16: the CUDA kernel
    (``gsq_gemm`` on ``device``) and the CPU path (``cpu_gemm``). Shapes fit the kernel (N % 64,
    K % 64), so every linear takes the kernel."""
    from gsq_vllm import cpu_gemm
    from gsq_format.format import load_tensors, read_quant_config, storage_bits
    from quantize.cli import main as quantize_main
    from quantize.evaluate import load_model
    from quantize.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "model", hidden=128, intermediate=256, heads=2, kv_heads=1)
    ckpt = tmp_path / "ckpt"
    assert quantize_main(["--model", str(model_dir), "--out", str(ckpt), "--method", "rtn", "--bits", str(bits),
                          "--group-size", "64", "--nsamples", "2", "--seqlen", "16"]) == 0
    g, tensors = read_quant_config(ckpt).group_size, load_tensors(ckpt)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))

    def cuda_fn(qweight, scales, n, k):
        assert cg.cuda_supports(n, k, bits, g)
        b_r, s_r = cg.repack(qweight.to(device), scales.to(device), bits, g, dtype=torch.bfloat16)
        return lambda x: cg.gsq_gemm(x, b_r, s_r, bits, g, n, k)

    def cpu_fn(qweight, scales, n, k):
        lo, hi = cpu_gemm.repack_for_cpu(qweight, bits, g)
        return lambda x: cpu_gemm.cpu_gemm(x, lo, hi, scales, storage_bits(bits), g)

    with torch.no_grad():
        gpu = _swap_linears(load_model(ckpt)[0], tensors, cuda_fn).to(device, torch.bfloat16)
        cpu = _swap_linears(load_model(ckpt)[0], tensors, cpu_fn).to(torch.bfloat16)
        return gpu(input_ids=ids.to(device)).logits.float().cpu(), cpu(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [2, 3])
def test_plugin_gpu_path_gives_cpu_path_logits(tmp_path, bits):
    gpu, cpu = _gpu_and_cpu_path_logits(tmp_path, bits, "cuda")
    assert torch.isfinite(gpu).all()
    rel = ((gpu - cpu).norm() / cpu.norm()).item()
    assert rel <= 2e-2, f"{bits}-bit: GPU vs CPU path logits rel err {rel:.3e}"
    # greedy next tokens agree except at near-ties
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean().item() >= 0.9
