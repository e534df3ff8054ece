"""Running one transformer block over calibration activations: plain, or with each linear's
input Hessian accumulated on the way (the pipeline's float pass)."""

from __future__ import annotations

import torch

from quantize.activations import Activations


def call_block(block, x: torch.Tensor, pos_emb) -> torch.Tensor:
    """One differentiable block call: f32 ``[b,S,H]`` -> ``[b,S,H]`` (causal attention via sdpa, no mask)."""
    out = block(x, attention_mask=None, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def call_attention(block, x: torch.Tensor, pos_emb) -> torch.Tensor:
    """The block's attention output before the residual add: ``self_attn(input_layernorm(x))``."""
    out = block.self_attn(hidden_states=block.input_layernorm(x), attention_mask=None, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out


def run_block(block, x: Activations, pos_emb, batch_size: int, out: Activations | None) -> Activations | None:
    """Block outputs f32 ``[n,S,H]`` into ``out`` for inputs f32 ``[n,S,H]``, in batches, without gradients.
    ``out=None``: run for the hooks only and keep no outputs."""
    with torch.no_grad():
        for sl, xb in x.batches(batch_size):
            y = call_block(block, xb, pos_emb)
            if out is not None:
                out[sl] = y
    return out


def linear_stages(block, names: list[str], x: torch.Tensor, pos_emb) -> list[list[str]]:
    """``names`` grouped by the tensor they read, in the order the block calls them: e.g. Llama's
    [[q, k, v], [o], [gate, up], [down]]. One call of the block on ``x`` (f32 ``[b,S,H]``, one
    sequence is enough) with a hook per linear. GPTQ's true-sequential order: a stage's Hessians are
    taken after every earlier stage is quantized."""
    seen: list[tuple[int, str]] = []  # (input's data pointer, name), in call order
    alive = []  # every input stays referenced, so a freed one's address cannot be reused by a later one

    def record(n, inp):
        alive.append(inp[0])
        seen.append((inp[0].data_ptr(), n))

    hooks = [block.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: record(n, inp))
             for n in names]
    try:
        with torch.no_grad():
            call_block(block, x, pos_emb)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    stage_of_input: dict[int, list[str]] = {}
    for ptr, n in seen:
        if any(n in st for st in stages):
            continue  # a linear called twice (not in these models) stays in its first stage
        if ptr not in stage_of_input:
            stage_of_input[ptr] = []
            stages.append(stage_of_input[ptr])
        stage_of_input[ptr].append(n)
    missed = [n for n in names if not any(n in st for st in stages)]
    return stages + ([missed] if missed else [])


def run_block_with_hessians(block, names: list[str], x: Activations, pos_emb, batch_size: int,
                            out: Activations | None):
    """(block outputs f32 ``[n,S,H]`` in ``out``, {name: sum of x x^T f32 ``[K,K]`` over the inputs of linear
    ``name``}, {name: how many rows (tokens) it saw}). Run on a whole MoE block, an expert's linears see
    only the tokens the router sends them (the pipeline streams experts instead: quantize/moe_block.py)."""
    hess = {n: torch.zeros(block.get_submodule(n).in_features, block.get_submodule(n).in_features, device=x.device)
            for n in names}
    counts = dict.fromkeys(names, 0)

    def accumulate(n, inp):
        a = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        hess[n].addmm_(a.t(), a)  # returns nothing: a hook's return value would replace the output
        counts[n] += a.shape[0]

    hooks = [block.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: accumulate(n, inp))
             for n in names]
    try:
        return run_block(block, x, pos_emb, batch_size, out), hess, counts
    finally:
        for h in hooks:
            h.remove()
