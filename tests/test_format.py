"""Checkpoint format: exact pack/unpack round trips, layout, config schema, atomic writes."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq_format import format as fmt


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 1.58]),
    n=st.integers(1, 9),
    runs=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, n, runs, seed):
    qmin, qmax = fmt.grid_range(bits)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(qmin, qmax + 1, (n, 32 * runs), generator=g).to(torch.int8)
    packed = fmt.pack_codes(q, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == fmt.packed_shape(n, 32 * runs, bits)
    assert torch.equal(fmt.unpack_codes(packed, bits), q)


@pytest.mark.parametrize("nbits,pack,unpack", [(2, fmt.pack_int2, fmt.unpack_int2), (3, fmt.pack_int3, fmt.unpack_int3)])
def test_extreme_codes_round_trip(nbits, pack, unpack):
    # All-ones codes set every bit, including the int32 sign bit and the straddling codes.
    for value in (0, 2**nbits - 1):
        u = torch.full((2, 64), value, dtype=torch.uint8)
        assert torch.equal(unpack(pack(u)), u)


def test_int2_bit_positions():
    u = torch.zeros(1, 32, dtype=torch.uint8)
    u[0, 1] = 3  # code 1 -> bits 2,3 of word 0
    u[0, 17] = 1  # code 17 -> bit 2 of word 1
    assert fmt.pack_int2(u).tolist() == [[0b1100, 0b100]]


def test_int3_dense_bit_stream():
    # Code i of a run sits at stream bits [3i, 3i+3); code 10 straddles words 0 and 1.
    u = torch.zeros(1, 32, dtype=torch.uint8)
    u[0, 10] = 0b111  # stream bits 30, 31, 32
    words = fmt.pack_int3(u).tolist()[0]
    assert [w & 0xFFFFFFFF for w in words] == [0b11 << 30, 0b1, 0]
    u = torch.zeros(1, 32, dtype=torch.uint8)
    u[0, 21] = 0b101  # stream bits 63 (set), 64 (clear), 65 (set)
    words = [w & 0xFFFFFFFF for w in fmt.pack_int3(u).tolist()[0]]
    assert words == [0, 1 << 31, 0b10]


def test_pack_rejects_out_of_grid_codes():
    with pytest.raises(fmt.FormatError, match="must lie in"):
        fmt.pack_codes(torch.full((1, 32), 2, dtype=torch.int8), 2)
    with pytest.raises(fmt.FormatError, match="must lie in"):
        fmt.pack_codes(torch.full((1, 32), -2, dtype=torch.int8), 1.58)
    with pytest.raises(fmt.FormatError, match="multiple of 32"):
        fmt.pack_codes(torch.zeros((1, 48), dtype=torch.int8), 3)


def test_dequantize_matches_definition():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-4, 4, (3, 128), generator=g).to(torch.int8)
    s = torch.rand(3, 2, generator=g)
    w = fmt.dequantize(q, s, 64)
    assert torch.allclose(w[:, :64], q[:, :64].float() * s[:, :1])
    assert torch.allclose(w[:, 64:], q[:, 64:].float() * s[:, 1:])
    assert torch.equal(fmt.dequantize_packed(fmt.pack_codes(q, 3), s, 3, 64), w)


@pytest.mark.parametrize("bad", [4, 1, "five", 2.5, True])
def test_bad_bits_rejected(bad):
    with pytest.raises(fmt.FormatError, match="bits must be"):
        fmt.normalize_bits(bad)


def test_group_size_must_divide_k():
    with pytest.raises(fmt.FormatError, match="does not divide its 576"):
        fmt.check_group_size(576, 128, "q_proj")
    fmt.check_group_size(576, 64)
    with pytest.raises(fmt.FormatError, match="not supported"):
        fmt.check_group_size(576, 48)


def test_config_round_trip_and_validation():
    c = fmt.GSQQuantConfig(bits="ternary", group_size=64, modules_to_not_convert=["lm_head"])
    d = c.to_dict()
    assert d["storage_bits"] == 2 and d["quant_method"] == "gsq"
    assert fmt.GSQQuantConfig.from_dict(json.loads(json.dumps(d))) == c
    with pytest.raises(fmt.FormatError, match="format_version"):
        fmt.GSQQuantConfig.from_dict({**d, "format_version": 99})
    with pytest.raises(fmt.FormatError, match="quant_method"):
        fmt.GSQQuantConfig.from_dict({**d, "quant_method": "gptq"})
    with pytest.raises(fmt.FormatError, match="missing"):
        fmt.GSQQuantConfig.from_dict({"quant_method": "gsq", "bits": 2})
    with pytest.raises(fmt.FormatError, match="storage_bits"):
        fmt.GSQQuantConfig.from_dict({**d, "storage_bits": 3})


def test_is_excluded():
    skip = ["lm_head", "self_attn", "mlp.gate"]
    assert fmt.is_excluded("lm_head", skip)
    assert fmt.is_excluded("model.layers.3.self_attn.q_proj", skip)
    assert fmt.is_excluded("model.layers.3.mlp.gate", skip)
    assert not fmt.is_excluded("model.layers.3.mlp.gate_proj", skip)
    assert not fmt.is_excluded("model.layers.3.mlp.up_proj", skip)


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (1.58, 32)])
def test_writer_size_and_reload(tmp_path, bits, group):
    qcfg = fmt.GSQQuantConfig(bits=bits, group_size=group)
    qmin, qmax = fmt.grid_range(bits)
    n, k = 96, 256
    q = torch.randint(qmin, qmax + 1, (n, k)).to(torch.int8)
    s = torch.rand(n, k // group) + 0.1
    out = tmp_path / "ckpt"
    w = fmt.CheckpointWriter(out, {"model_type": "llama"}, qcfg, shard_bytes=4096)
    w.add_quantized("model.layers.0.mlp.up_proj", q, s)
    w.add_quantized("model.layers.1.mlp.up_proj", q, s)
    w.add("model.norm.weight", torch.ones(k, dtype=torch.bfloat16))
    w.finish()
    assert (out / fmt.INDEX_FILE).is_file()  # small shard size forces several shards
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    bpw, count = fmt.checkpoint_bits_per_weight(out)
    assert count == 2 * n * k
    assert bpw == pytest.approx(fmt.storage_bits(bits) + 16 / group, rel=1e-9)
    tensors = fmt.load_tensors(out)
    back = fmt.unpack_codes(tensors["model.layers.1.mlp.up_proj.qweight"], bits)
    assert torch.equal(back, q)
    assert fmt.read_quant_config(out) == qcfg


def test_writer_abort_leaves_nothing(tmp_path):
    qcfg = fmt.GSQQuantConfig(bits=2, group_size=64)
    w = fmt.CheckpointWriter(tmp_path / "ckpt", {}, qcfg)
    with pytest.raises(fmt.FormatError, match="does not divide"):
        w.add_quantized("x", torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 1))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_nan_scales(tmp_path):
    w = fmt.CheckpointWriter(tmp_path / "ckpt", {}, fmt.GSQQuantConfig(bits=2, group_size=64))
    with pytest.raises(fmt.FormatError, match="NaN"):
        w.add_quantized("x", torch.zeros(4, 64, dtype=torch.int8), torch.full((4, 1), float("nan")))
    w.abort()


def test_truncated_safetensors_is_a_format_error(tmp_path):
    qcfg = fmt.GSQQuantConfig(bits=3, group_size=64)
    w = fmt.CheckpointWriter(tmp_path / "ckpt", {}, qcfg)
    w.add_quantized("a", torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 1))
    out = w.finish()
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(fmt.FormatError, match="corrupt or truncated"):
        fmt.load_tensors(out)
