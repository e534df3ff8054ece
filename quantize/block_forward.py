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


def run_block(block, x: Activations, pos_emb, batch_size: int, out: Activations) -> Activations:
    """Block outputs f32 ``[n,S,H]`` into ``out`` for inputs f32 ``[n,S,H]``, in batches, without gradients."""
    with torch.no_grad():
        for sl, xb in x.batches(batch_size):
            out[sl] = call_block(block, xb, pos_emb)
    return out


def run_block_with_hessians(block, names: list[str], x: Activations, pos_emb, batch_size: int, out: Activations):
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
