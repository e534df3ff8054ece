import pytest
import torch

from gsq_format.format import FormatError, grid_range
from quantize.gptq import gptq_quantize, refit_scales
from quantize.rtn import mse_scales, round_to_grid, rtn_quantize


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


@pytest.mark.parametrize("bits", [2, 3, 1.58])
def test_refit_scales_is_each_rows_least_squares_on_the_damped_hessian(bits):
    w, x = _data()
    h = x.t() @ x
    q = gptq_quantize(w, h, bits, 32)
    codes = q.codes.clone()
    codes[3, 32:64] = 0  # a group with no non-zero code keeps its scale
    q = type(q)(codes, q.scales, bits, 32)
    r = refit_scales(w, h, q, damp=0.01, rows_per_chunk=20)  # chunks that do not divide N
    assert torch.equal(r.codes, q.codes)
    assert r.scales[3, 1] == q.scales[3, 1]
    hd = h.clone()
    hd.diagonal().add_(0.01 * h.diagonal().mean())
    chol = torch.linalg.cholesky(hd)
    for row in (0, 3, 47):  # min_s |L^T (w - Q s)|^2, solved directly for one row
        groups = [g for g in range(4) if codes[row, 32 * g:32 * (g + 1)].any()]
        basis = torch.zeros(128, len(groups))
        for j, g in enumerate(groups):
            basis[32 * g:32 * (g + 1), j] = codes[row, 32 * g:32 * (g + 1)].float()
        s = torch.linalg.lstsq(chol.t() @ basis, (chol.t() @ w[row]).unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(r.scales[row, groups], s, rtol=1e-3, atol=1e-6)

    def out_err(qw):
        return (x @ (qw.dequantize() - w).t()).pow(2).sum()

    assert out_err(r) < out_err(q)


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


@pytest.mark.parametrize("bits, gain", [(2, 0.75), (3, 0.95)])
def test_gptq_ref_scale_search_mirrors_asymmetric_grids_for_positive_outliers(bits, gain):
    # Rows whose largest weight is positive: the 2-bit grid {-2, -1, 0, 1} (3-bit {-4..3}) reaches
    # its longest side only with a negative scale, so gptq-ref must pick one and beat the
    # positive-only search, at every asymmetric bit width as the GSQ reference does.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g) * 0.2
    w[:, 0] = 1.0
    s_mse = mse_scales(w, bits)
    s_ref = mse_scales(w, bits, search="gptq-ref")
    assert (s_mse > 0).all() and (s_ref < 0).float().mean() > 0.5

    def err(s):
        return (w - s * round_to_grid(w, s, bits)).abs().pow(2).sum()

    assert err(s_ref) < gain * err(s_mse)


def test_gptq_ref_scale_search_keeps_ternary_positive_and_refuses_unknown_search():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    assert (mse_scales(w, 1.58, search="gptq-ref") > 0).all()
    with pytest.raises(ValueError, match="scale search"):
        mse_scales(w, 2, search="minmax")


@pytest.mark.parametrize("search", ["mse", "gptq-ref"])
def test_scale_search_picks_each_rows_best_candidate_across_row_chunks(search):
    # More rows than the search takes at once, so a chunk boundary falls inside; a plain
    # per-row brute force over the same candidates (torch.pow, the whole matrix) must agree.
    from quantize import rtn

    g = torch.Generator().manual_seed(2)
    rows = rtn._SEARCH_ROWS + 37
    w = torch.randn(rows, 16, generator=g) * torch.rand(rows, 1, generator=g)
    w[5] = 0.0
    weight = torch.rand(16, generator=g) + 0.5
    bits, power = 2, (2.0 if search == "mse" else 2.4)
    absmax = w.abs().amax(1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    errs = torch.stack([((w - absmax * c * round_to_grid(w, absmax * c, bits)).abs().pow(power) * weight).sum(1)
                        for c in rtn._candidates(bits, search)], 1)
    got = mse_scales(w, bits, weight=weight, search=search)
    got_err = ((w - got * round_to_grid(w, got, bits)).abs().pow(power) * weight).sum(1)
    # exp(log) vs pow: the chosen candidate's error equals the best within float rounding
    assert torch.allclose(got_err, errs.min(1).values, rtol=1e-5, atol=0)
    assert got[5].item() != 0  # a row of zeros still gets a usable scale
