import pytest
import torch

from gsq_vllm.format import FormatError, grid_range
from quantize.gptq import gptq_quantize
from quantize.rtn import rtn_quantize


def _data(n=48, k=128, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    # Correlated inputs with uneven channel scales, like real activations.
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    return w, x


@pytest.mark.parametrize("bits", [2, 3, 1.58])
def test_rtn_codes_on_grid_and_clip_search_beats_absmax(bits):
    w, _ = _data()
    q = rtn_quantize(w, bits, 32)
    qmin, qmax = grid_range(bits)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax
    err = (q.dequantize() - w).pow(2).sum()
    g = w.reshape(-1, 32)
    s = g.abs().amax(1, keepdim=True) / qmax
    naive = (torch.clamp(torch.round(g / s), qmin, qmax) * s - g).pow(2).sum()
    assert err < naive


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits, act_order):
    w, x = _data()
    h = x.t() @ x
    rtn = rtn_quantize(w, bits, 32)
    gptq = gptq_quantize(w, h, bits, 32, act_order=act_order)
    ref = x @ w.t()
    e_rtn = (x @ rtn.dequantize().t() - ref).pow(2).mean()
    e_gptq = (x @ gptq.dequantize().t() - ref).pow(2).mean()
    assert e_gptq < 0.9 * e_rtn


def test_gptq_handles_dead_input_columns():
    w, x = _data()
    x[:, 5] = 0
    q = gptq_quantize(w, x.t() @ x, 2, 32)
    assert torch.isfinite(q.scales).all() and (q.codes[:, 5] == 0).all()


def test_group_size_must_divide_k():
    w = torch.randn(8, 576)
    with pytest.raises(FormatError, match="does not divide"):
        rtn_quantize(w, 2, 128)
    with pytest.raises(FormatError, match="does not divide"):
        gptq_quantize(w, torch.eye(576), 2, 128)
