"""gsq-convert: compressed-tensors / GPTQ checkpoints in, compressed-tensors out, losslessly.

Inputs are built here, no model hub: compressed-tensors checkpoints by the
compressed-tensors library itself (its model compressor on a tiny random
Llama), GPTQ checkpoints packed to the layout AutoGPTQ documents (written
out below independently of our own packing). "Lossless" is checked against
each format's own dequantization: the compressed-tensors library's
decompressor, and GPTQ's formula ``scale * (q - (zero + 1))``.
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gsq_format import convert
from gsq_format import format as F

ct = pytest.importorskip("compressed_tensors")

HIDDEN, INTER, LAYERS = 128, 256, 2
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _llama(vocab=256, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _codes_scales(n, k, g, value_bits, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 7) if value_bits == 4 else F.grid_range(value_bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.01).to(dtype)
    return q, s


def write_ct(folder: Path, num_bits: int, g: int, value_bits, symmetric=True, actorder=None, seed=0,
             vocab=256, tokenizer_dir=None):
    """A tiny Llama quantized by the compressed-tensors library: weights set to q * s with codes q of
    ``value_bits`` and scales s, then the library's own quantize + pack + save. Returns {prefix: (q, s)}."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    model = _llama(vocab, seed).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=num_bits, type="int", symmetric=symmetric, strategy="group", group_size=g,
                            actorder=actorder)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    truth = {}
    with torch.no_grad():
        for i in range(LAYERS):
            for lin in LINEARS:
                prefix = f"model.layers.{i}.{lin}"
                mod = model.get_submodule(prefix)
                n, k = mod.weight.shape
                q, s = _codes_scales(n, k, g, value_bits, seed=hash(prefix) % 1000 + seed)
                mod.weight.copy_((q.float().view(n, -1, g) * s.float().unsqueeze(-1)).view(n, k))
                mod.weight_scale.copy_(s)
                if not symmetric:
                    mod.weight_zero_point.fill_(1)
                truth[prefix] = (q, s)
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    model.save_pretrained(str(folder))
    comp.update_config(str(folder))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return truth


def _autogptq_pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing of unsigned codes ``[R, C]`` along R into int32 rows (its documented loop:
    2/4 bits: code j of a run at bits ``bits * j``; 3 bits: 10 codes, a straddling code, 10, ...)."""
    u = u.to(torch.int64)
    rows, cols = u.shape
    if bits in (2, 4):
        per = 32 // bits
        out = torch.zeros(rows // per, cols, dtype=torch.int64)
        for j in range(per):
            out |= u[j::per] << (bits * j)
    else:
        out = torch.zeros(rows // 32 * 3, cols, dtype=torch.int64)
        i = row = 0
        while row < out.shape[0]:
            for j in range(10):
                out[row] |= u[i + j] << (3 * j)
            i += 10
            out[row] |= u[i] << 30
            row += 1
            out[row] |= (u[i] >> 2) & 1
            i += 1
            for j in range(10):
                out[row] |= u[i + j] << (3 * j + 1)
            i += 10
            out[row] |= u[i] << 31
            row += 1
            out[row] |= (u[i] >> 1) & 3
            i += 1
            for j in range(10):
                out[row] |= u[i + j] << (3 * j + 2)
            i += 10
            row += 1
    out &= 0xFFFFFFFF
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def write_gptq(folder: Path, bits: int, g: int, value_bits, version="gptq", zero_shift=0, permute=False, seed=0):
    """A GPTQ checkpoint of the tiny Llama: qweight [K*b/32, N], qzeros [K/G, N*b/32], scales [K/G, N]
    fp16, g_idx [K]. Returns {prefix: (q, s)} with s [N, K/G]."""
    model = _llama(seed=seed)
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    mid = 1 << (bits - 1)
    stored = (mid - 1 if version == "gptq" else mid) + zero_shift
    truth = {}
    for i in range(LAYERS):
        for lin in LINEARS:
            prefix = f"model.layers.{i}.{lin}"
            w = state.pop(f"{prefix}.weight")
            n, k = w.shape
            q, s = _codes_scales(n, k, g, value_bits, seed=hash(prefix) % 1000 + seed, dtype=torch.float16)
            truth[prefix] = (q, s)
            u = (q.to(torch.int64) + mid).t()  # [K, N]
            state[f"{prefix}.qweight"] = _autogptq_pack(u, bits)
            state[f"{prefix}.qzeros"] = _autogptq_pack(torch.full((n, k // g), stored), bits).t().contiguous()
            state[f"{prefix}.scales"] = s.t().contiguous()
            g_idx = torch.arange(k, dtype=torch.int32) // g
            state[f"{prefix}.g_idx"] = g_idx[torch.randperm(k)] if permute else g_idx
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": permute,
                                  "sym": True, "checkpoint_format": version}
    (folder / "config.json").write_text(json.dumps(cfg))
    return truth


def _gptq_dequant(folder: Path, prefix: str, bits: int, g: int, version: str) -> torch.Tensor:
    """GPTQ's own formula on the stored tensors: W[k, n] = scales[g, n] * (u[k, n] - zero[g, n])."""
    t = load_file(str(folder / "model.safetensors"))
    qweight, qzeros, scales = t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"], t[f"{prefix}.scales"]
    k, n = scales.shape[0] * g, scales.shape[1]
    u = convert._unpack_along(qweight, bits, k, dim=0)
    z = convert._unpack_along(qzeros, bits, n, dim=1) + (1 if version == "gptq" else 0)
    return (scales.float().repeat_interleave(g, 0) * (u - z.repeat_interleave(g, 0)).float()).t()


def _run(*argv):
    """gsq-convert's main in this process, as a CompletedProcess: a subprocess would import the
    compressed-tensors library again (8-10 s on 2 cores, most of each test). _run_process, the
    real command, is kept for one refusal."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = convert.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return subprocess.CompletedProcess(["gsq-convert", *map(str, argv)], rc, out.getvalue(), err.getvalue())


def _run_process(*argv):
    return subprocess.run([sys.executable, "-m", "gsq_format.convert", *map(str, argv)], capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------ compressed-tensors in


@pytest.mark.parametrize("num_bits,value_bits,expect", [(2, 2, 2), (3, 3, 3), (4, 2, 2), (4, 3, 3)])
def test_compressed_tensors_import_is_lossless(tmp_path, num_bits, value_bits, expect):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src, out = tmp_path / "ct", tmp_path / "gsq"
    truth = write_ct(src, num_bits, 64, value_bits)
    r = _run(src, out)
    assert r.returncode == 0, r.stderr
    qcfg = F.read_quant_config(out)
    assert qcfg.bits == expect and qcfg.group_size == 64 and qcfg.scale_dtype == "bfloat16"
    ours = F.load_tensors(out)
    theirs = load_file(str(src / "model.safetensors"))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=True, strategy="group", group_size=64))
    for prefix, (q, s) in truth.items():
        codes = F.unpack_codes(ours[f"{prefix}.qweight"], expect)
        assert torch.equal(codes, q) and torch.equal(ours[f"{prefix}.scales"], s), prefix
        # every weight equals what the library's own decompressor gives
        lib = PackedQuantizationCompressor.decompress(
            {k: theirs[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}, scheme)
        mine = F.dequantize(codes, ours[f"{prefix}.scales"], 64, lib["weight"].dtype)
        assert torch.equal(mine, lib["weight"]), prefix
    # the other tensors as they were (lm_head stays float), and true 2/3-bit storage
    assert torch.equal(ours["lm_head.weight"], theirs["lm_head.weight"])
    assert "lm_head" in qcfg.modules_to_not_convert
    bpw, _ = F.checkpoint_bits_per_weight(out)
    assert bpw == pytest.approx(expect + 16 / 64)


# ------------------------------------------------------------------ GPTQ in


@pytest.mark.parametrize("bits,value_bits,version", [(2, 2, "gptq"), (3, 3, "gptq"), (4, 3, "gptq"),
                                                     (4, 2, "gptq_v2"), (3, 3, "gptq_v2")])
def test_gptq_import_is_lossless(tmp_path, bits, value_bits, version):
    src, out = tmp_path / "gptq", tmp_path / "gsq"
    truth = write_gptq(src, bits, 128, value_bits, version)
    r = _run(src, out)
    assert r.returncode == 0, r.stderr
    qcfg = F.read_quant_config(out)
    assert qcfg.bits == value_bits and qcfg.scale_dtype == "float16"
    ours = F.load_tensors(out)
    for prefix, (q, s) in truth.items():
        codes = F.unpack_codes(ours[f"{prefix}.qweight"], value_bits)
        assert torch.equal(codes, q), prefix
        mine = F.dequantize(codes, ours[f"{prefix}.scales"], 128)
        assert torch.equal(mine, _gptq_dequant(src, prefix, bits, 128, version)), prefix
    assert F.checkpoint_bits_per_weight(out)[0] == pytest.approx(value_bits + 16 / 128)


# ------------------------------------------------------------------ compressed-tensors out


def _gsq_checkpoint(folder: Path, bits, g=64):
    """A GSQ checkpoint of the tiny Llama with random codes; returns {prefix: (q, s)}."""
    model = _llama()
    qcfg = F.GSQQuantConfig(bits=bits, group_size=g, method="rtn")
    w = F.CheckpointWriter(folder, base_config=model.config.to_dict(), quant_config=qcfg)
    truth = {}
    for name, t in model.state_dict().items():
        prefix = name.removesuffix(".weight")
        if any(prefix.endswith(lin) for lin in LINEARS):
            q, s = _codes_scales(*t.shape, g, bits, seed=hash(prefix) % 1000)
            w.add_quantized(prefix, q, s)
            truth[prefix] = (q, s)
        else:
            w.add(name, t)
    w.finish()
    return truth


@pytest.mark.parametrize("bits,container", [(2, None), (3, None), (1.58, None), (2, 4), (3, 4)])
def test_export_round_trips_through_the_compressed_tensors_library(tmp_path, bits, container):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, ct_dir, back = tmp_path / "gsq", tmp_path / "ct", tmp_path / "back"
    truth = _gsq_checkpoint(src, bits)
    args = [src, ct_dir, "--to", "compressed-tensors"] + (["--container-bits", container] if container else [])
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    qc = QuantizationConfig.model_validate(json.loads((ct_dir / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    assert scheme.weights.num_bits == (container or F.storage_bits(bits)) and scheme.weights.symmetric
    assert qc.format == "pack-quantized" and "lm_head" in qc.ignore
    t = load_file(str(ct_dir / "model.safetensors"))
    for prefix, (q, s) in truth.items():
        lib = PackedQuantizationCompressor.decompress(
            {k: t[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}, scheme)
        assert torch.equal(lib["weight"], F.dequantize(q, s, 64, lib["weight"].dtype)), prefix
    # and back: the same GSQ tensors
    assert _run(ct_dir, back).returncode == 0
    a, b = F.load_tensors(src), F.load_tensors(back)
    assert F.read_quant_config(back).bits == (2 if bits == 1.58 else bits)
    for prefix in truth:
        assert torch.equal(a[f"{prefix}.qweight"], b[f"{prefix}.qweight"]), prefix
        assert torch.equal(a[f"{prefix}.scales"], b[f"{prefix}.scales"]), prefix


# ------------------------------------------------------------------ refused


def _refused(r, out: Path, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gsq-convert: error:"), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def test_asymmetric_compressed_tensors_is_refused(tmp_path):
    write_ct(tmp_path / "ct", 4, 64, 2, symmetric=False)
    _refused(_run_process(tmp_path / "ct", tmp_path / "out"), tmp_path / "out", "not symmetric")


def test_stray_zero_point_tensor_is_refused_by_name(tmp_path):
    write_ct(tmp_path / "ct", 2, 64, 2)
    f = tmp_path / "ct" / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight_zero_point"] = torch.zeros(256, 2, dtype=torch.int32)
    save_file(t, str(f))
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out",
             "model.layers.1.mlp.up_proj.weight_zero_point", "asymmetric")


def test_act_order_compressed_tensors_is_refused(tmp_path):
    write_ct(tmp_path / "ct", 4, 64, 2, actorder="group")
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out", "actorder")


def test_codes_outside_the_3bit_grid_are_refused(tmp_path):
    write_ct(tmp_path / "ct", 4, 64, 4)  # genuine 4-bit values
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out", "outside the 3-bit grid", "model.layers.")


def test_missing_scales_are_refused_by_name(tmp_path):
    write_ct(tmp_path / "ct", 2, 64, 2)
    f = tmp_path / "ct" / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(t, str(f))
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out",
             "model.layers.0.self_attn.o_proj.weight_scale is missing")


def test_truncated_shard_is_refused(tmp_path):
    write_ct(tmp_path / "ct", 2, 64, 2)
    f = tmp_path / "ct" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out", "corrupt or truncated")


def test_asymmetric_gptq_zero_points_are_refused(tmp_path):
    write_gptq(tmp_path / "gptq", 2, 128, 2, zero_shift=1)
    _refused(_run(tmp_path / "gptq", tmp_path / "out"), tmp_path / "out", ".qzeros", "symmetric midpoint")


def test_gptq_act_order_permutation_is_refused(tmp_path):
    write_gptq(tmp_path / "gptq", 3, 128, 3, permute=True)
    _refused(_run(tmp_path / "gptq", tmp_path / "out"), tmp_path / "out", ".g_idx", "act-order")


def test_unsupported_group_size_is_refused(tmp_path):
    write_ct(tmp_path / "ct", 2, 16, 2)
    _refused(_run(tmp_path / "ct", tmp_path / "out"), tmp_path / "out", "group size 16")


def test_existing_output_survives_a_refused_conversion(tmp_path):
    write_gptq(tmp_path / "gptq", 2, 128, 2, zero_shift=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run(tmp_path / "gptq", out)
    assert r.returncode == 2 and (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------ gsq-quantize --init


def _quantize(*argv):
    return subprocess.run([sys.executable, "-m", "quantize.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600)


def test_gsq_refines_from_the_init_checkpoint(tmp_path):
    """GSQ started from --init: at 3 bits it moves each code by at most 2 from its init, so an
    init of all +3 leaves every code >= 1, which a GPTQ start (codes of both signs) never does."""
    from quantize.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", hidden=64, intermediate=128)
    cfg = json.loads((model / "config.json").read_text())
    t = load_file(str(model / "model.safetensors"))
    qcfg = F.GSQQuantConfig(bits=3, group_size=64, method="gptq")
    w = F.CheckpointWriter(tmp_path / "init", base_config=cfg, quant_config=qcfg)
    for name, x in t.items():
        prefix = name.removesuffix(".weight")
        if any(prefix.endswith(lin) for lin in LINEARS):
            w.add_quantized(prefix, torch.full(x.shape, 3, dtype=torch.int8),
                            torch.full((x.shape[0], x.shape[1] // 64), 1e-3))
        else:
            w.add(name, x)
    w.finish()
    common = ["--model", model, "--bits", "3", "--group-size", "64", "--nsamples", "2", "--seqlen", "16",
              "--calib", "wikipedia", "--preset", "fast", "--gsq-epochs", "1"]
    r = _quantize(*common, "--out", tmp_path / "refined", "--method", "gsq", "--init", tmp_path / "init")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = F.load_tensors(tmp_path / "refined")
    codes = [F.unpack_codes(v, 3) for k, v in ours.items() if k.endswith(".qweight")]
    assert len(codes) == 2 * 7 and all(int(c.min()) >= 1 for c in codes)
    assert F.read_quant_config(tmp_path / "refined").quantizer["init"] == str(tmp_path / "init")
    # refused: --init without GSQ, a group size that differs, codes wider than --bits
    r = _quantize(*common, "--out", tmp_path / "x", "--method", "gptq", "--init", tmp_path / "init")
    assert r.returncode == 2 and "--method gsq" in r.stderr
    r = _quantize(*[a if a != "64" else "32" for a in common], "--out", tmp_path / "x", "--method", "gsq",
                  "--init", tmp_path / "init")
    assert r.returncode == 2 and "group size 64" in r.stderr
    r = _quantize(*[a if a != "3" else "2" for a in common], "--out", tmp_path / "x", "--method", "gsq",
                  "--init", tmp_path / "init")
    assert r.returncode == 2 and "outside the 2-bit grid" in r.stderr
    assert not (tmp_path / "x").exists()
