"""The GGUF the served-vs-llama.cpp benchmark writes (benchmarks/served_vs_llama_cpp.py): the same weights
as the HF folder, q/k rows in llama.cpp's rotary pairing, the embedded SmolLM2 tokenizer."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from benchmarks.served_vs_llama_cpp import rotary_rows_to_interleaved, write_gguf  # noqa: E402


def _angles(d: int, pos: int, base: float = 10000.0) -> np.ndarray:
    return pos * base ** (-np.arange(0, d, 2) / d)  # one angle per rotated pair


def _rope_hf(q: np.ndarray, pos: int) -> np.ndarray:
    """HF Llama: dims i and i + d/2 rotate together (rotate_half)."""
    d = q.shape[-1]
    c, s = np.cos(_angles(d, pos)), np.sin(_angles(d, pos))
    a, b = q[..., : d // 2], q[..., d // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _rope_interleaved(q: np.ndarray, pos: int) -> np.ndarray:
    """llama.cpp's LLAMA rope (mode 0): dims 2i and 2i + 1 rotate together."""
    d = q.shape[-1]
    c, s = np.cos(_angles(d, pos)), np.sin(_angles(d, pos))
    a, b = q[..., 0::2], q[..., 1::2]
    out = np.empty_like(q)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def test_permuted_rows_give_the_same_attention_scores_under_interleaved_rope():
    rng = np.random.default_rng(0)
    n_head, n_kv, d, hidden = 4, 2, 16, 32
    wq, wk = rng.standard_normal((n_head * d, hidden)), rng.standard_normal((n_kv * d, hidden))
    x, y = rng.standard_normal(hidden), rng.standard_normal(hidden)
    pq, pk = rotary_rows_to_interleaved(wq, n_head), rotary_rows_to_interleaved(wk, n_kv)
    for pos_q, pos_k in ((0, 0), (5, 2), (37, 11)):
        q_hf = _rope_hf((wq @ x).reshape(n_head, d), pos_q)
        k_hf = _rope_hf((wk @ y).reshape(n_kv, d), pos_k)
        q_cpp = _rope_interleaved((pq @ x).reshape(n_head, d), pos_q)
        k_cpp = _rope_interleaved((pk @ y).reshape(n_kv, d), pos_k)
        group = n_head // n_kv  # query head h reads KV head h // group
        scores_hf = np.array([q_hf[h] @ k_hf[h // group] for h in range(n_head)])
        scores_cpp = np.array([q_cpp[h] @ k_cpp[h // group] for h in range(n_head)])
        np.testing.assert_allclose(scores_cpp, scores_hf, rtol=1e-10, atol=1e-10)
    # and the rotation itself only permutes each head's dims
    q_hf = _rope_hf((wq @ x).reshape(n_head, d), 7)
    np.testing.assert_allclose(rotary_rows_to_interleaved(q_hf.reshape(-1, 1), n_head).reshape(n_head, d),
                               _rope_interleaved((pq @ x).reshape(n_head, d), 7), rtol=1e-10, atol=1e-10)


def test_write_gguf_round_trip(tmp_path):
    from safetensors.torch import load_file

    from quantize.models import find_default_gguf
    from quantize.tiny import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, seed=3)
    dest = write_gguf(folder, tmp_path / "tiny.gguf", find_default_gguf())
    assert not list(tmp_path.glob("*.partial"))
    r = gguf.GGUFReader(str(dest))
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 64, 128)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    src = gguf.GGUFReader(str(find_default_gguf()))
    assert meta["tokenizer.ggml.tokens"] == src.fields["tokenizer.ggml.tokens"].contents()
    assert meta["tokenizer.ggml.merges"][:100] == src.fields["tokenizer.ggml.merges"].contents()[:100]

    hf = {k: v.to(torch.float32).numpy() for k, v in load_file(str(next(folder.glob("*.safetensors")))).items()}
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd for the output
    assert len(tensors) == 2 + 9 * 2
    for name, want in [("token_embd.weight", hf["model.embed_tokens.weight"]),
                       ("blk.1.attn_q.weight", rotary_rows_to_interleaved(hf["model.layers.1.self_attn.q_proj.weight"], 4)),
                       ("blk.0.attn_k.weight", rotary_rows_to_interleaved(hf["model.layers.0.self_attn.k_proj.weight"], 2)),
                       ("blk.0.attn_v.weight", hf["model.layers.0.self_attn.v_proj.weight"]),
                       ("blk.1.ffn_down.weight", hf["model.layers.1.mlp.down_proj.weight"]),
                       ("blk.0.ffn_norm.weight", hf["model.layers.0.post_attention_layernorm.weight"]),
                       ("output_norm.weight", hf["model.norm.weight"])]:
        t = tensors[name]
        got = np.asarray(t.data).reshape(want.shape)
        assert got.dtype == (np.float32 if want.ndim == 1 else np.float16), name
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-3, atol=1e-6, err_msg=name)


def test_write_gguf_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(ValueError, match="not a llama model"):
        write_gguf(tmp_path, tmp_path / "x.gguf", tmp_path / "unused.gguf")
