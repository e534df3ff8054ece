"""A tiny random-weight Llama folder with the real SmolLM2 tokenizer, for fast tests.

>>> folder = build_tiny_llama(tmp_path / "tiny", seed=0)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from gsq_vllm.format import TOKENIZER_FILES


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
