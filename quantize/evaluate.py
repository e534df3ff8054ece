"""Perplexity of bf16 model folders and GSQ checkpoints (dequantized reference path, plain torch).

A GSQ folder is loaded by building the model from its config without the
``quantization_config`` entry (transformers refuses unknown quant methods),
then filling each quantized linear with ``scales * codes`` from
``gsq_format.format``. Compute runs in float32 on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from gsq_format.format import (
    FormatError,
    GSQQuantConfig,
    QWEIGHT_SUFFIX,
    SCALES_SUFFIX,
    check_quantized_tensors,
    dequantize_packed,
    load_tensors,
    read_model_config,
)
from quantize.models import check_architecture
from quantize.moe import disk_name, moe_spec, unfuse_experts


def load_model(folder: str | os.PathLike) -> tuple[torch.nn.Module, str]:
    """(float32 causal LM in eval mode, kind) where kind is "bf16" or "<method>-<bits>b-g<G>" (method: rtn, gptq, gsq)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg = read_model_config(folder)
    arch = check_architecture(cfg, folder)
    qdict = cfg.pop("quantization_config", None)
    if qdict is None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa")
        return model.eval(), "bf16"
    qcfg = GSQQuantConfig.from_dict(qdict)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if moe_spec(arch) is not None:
        unfuse_experts(model, arch)  # one linear per expert weight, named as in the checkpoint
    internal = {disk_name(n, arch): n for n in model.state_dict()}
    tensors = load_tensors(folder)
    state = {}
    for name, t in tensors.items():
        if name.endswith("." + QWEIGHT_SUFFIX):
            prefix = name[: -len(QWEIGHT_SUFFIX) - 1]
            scales = tensors.get(f"{prefix}.{SCALES_SUFFIX}")
            if scales is None:
                raise FormatError(f"{folder}: {prefix}.{SCALES_SUFFIX} is missing")
            check_quantized_tensors(prefix, t, scales, qcfg)
            state[f"{prefix}.weight"] = dequantize_packed(t, scales, qcfg.bits, qcfg.group_size)
        elif not name.endswith("." + SCALES_SUFFIX):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(f"{folder}: tensor {name} contains NaN or Inf")
            state[name] = t.float()
    state = {internal.get(n, n): t for n, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FormatError(f"{folder}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), f"{qcfg.method}-{qcfg.bits}b-g{qcfg.group_size}"


def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over token ids int64 ``[n, S]`` (each row scored independently)."""
    from tqdm import tqdm

    nll, count = 0.0, 0
    batches = range(0, ids.shape[0], batch_size)
    with torch.no_grad():
        for b in tqdm(batches, desc="perplexity", disable=not progress or not sys.stderr.isatty(), leave=False):
            x = ids[b : b + batch_size]
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def evaluate_folders(folders: list[str], corpus: str, nsamples: int | None, seqlen: int, progress=True) -> list[dict]:
    """Perplexity rows ``{"model", "kind", "ppl", "tokens"}`` for each folder on the eval split."""
    from transformers import AutoTokenizer

    from quantize.data import load_split, tokenize_sequences

    rows = []
    docs = load_split(corpus, "eval")
    for folder in folders:
        model, kind = load_model(folder)
        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tokenize_sequences(docs, tok, seqlen, nsamples)
        ppl = perplexity(model, ids, progress=progress)
        rows.append({"model": str(folder), "kind": kind, "ppl": ppl, "tokens": int(ids[:, 1:].numel()),
                     "corpus": corpus, "seqlen": seqlen})
        del model
    return rows


def served_perplexity(base_url: str, ids: torch.Tensor, model: str | None = None, timeout: float = 600) -> float:
    """exp(mean next-token NLL) of token ids int64 ``[n, S]`` as a running OpenAI-compatible vLLM
    server scores them: each row is sent as a token-id prompt with ``prompt_logprobs`` (vLLM's
    extension), one generated token that is ignored. Same rows and NLL as :func:`perplexity`."""
    import httpx

    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    with httpx.Client(timeout=timeout) as client:
        if model is None:
            model = client.get(f"{base}/models").raise_for_status().json()["data"][0]["id"]
        nll, count = 0.0, 0
        for row in ids.tolist():
            r = client.post(f"{base}/completions", json={
                "model": model, "prompt": row, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
            if r.status_code != 200:
                raise FormatError(f"server {base}: HTTP {r.status_code}: {r.text[:300]}")
            scored = r.json()["choices"][0]["prompt_logprobs"]
            for tok, entry in zip(row[1:], scored[1:]):  # the first prompt token has no logprob
                nll -= entry[str(tok)]["logprob"]
                count += 1
    return math.exp(nll / count)


def served_row(base_url: str, tokenizer_folder: str, corpus: str, nsamples: int | None, seqlen: int) -> dict:
    """A perplexity row for a server, on the rows :func:`evaluate_folders` scores (same tokenizer)."""
    from transformers import AutoTokenizer

    from quantize.data import load_split, tokenize_sequences

    ids = tokenize_sequences(load_split(corpus, "eval"), AutoTokenizer.from_pretrained(tokenizer_folder), seqlen,
                             nsamples)
    return {"model": base_url, "kind": "served", "ppl": served_perplexity(base_url, ids),
            "tokens": int(ids[:, 1:].numel()), "corpus": corpus, "seqlen": seqlen}


def format_table(rows: list[dict]) -> str:
    w = max([len(r["model"]) for r in rows] + [5])
    lines = [f"{'model':<{w}}  {'kind':<22}  {'ppl':>10}  {'tokens':>8}"]
    lines += [f"{r['model']:<{w}}  {r['kind']:<22}  {r['ppl']:>10.3f}  {r['tokens']:>8}" for r in rows]
    return "\n".join(lines)


def write_json(rows: list[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)
