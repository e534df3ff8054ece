"""Running one transformer block over calibration activations: plain, or with each linear's
input Hessian accumulated on the way (the pipeline's float pass)."""

from __future__ import annotations

import torch

from quantize.activations import Activations


# The attention's linears, by their name in a Llama-style block: queries/keys, values/output.
QK = ("self_attn.q_proj", "self_attn.k_proj")
VO = ("self_attn.v_proj", "self_attn.o_proj")

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
    only the tokens the router sends them (the pipeline streams experts instead: quantize/moe_block.py).

    Linears called one after the other on the same tensor object (q/k/v, gate/up) share one Hessian:
    it is accumulated once, by the first of them, and the same ``[K,K]`` tensor is returned under
    each of their names (read it, do not modify it in place). A linear must be a sharer in every
    batch or in none."""
    hess = {n: None for n in names}
    counts = dict.fromkeys(names, 0)
    owner: dict[str, str] = {}  # name -> the linear that summed the input it shares
    last: list = [None, None]  # (the last input summed, the linear that summed it)

    def accumulate(n, inp):
        t = inp[0]
        counts[n] += t.shape[:-1].numel()
        if t is last[0] and n != last[1]:  # already summed into hess[last[1]] during this block call
            if hess[n] is not None or owner.setdefault(n, last[1]) != last[1]:
                raise RuntimeError(f"{n} shares its input with {last[1]} in one batch but not in another")
            return
        if n in owner:
            raise RuntimeError(f"{n} shares its input with {owner[n]} in one batch but not in another")
        last[0], last[1] = t, n
        a = t.detach().reshape(-1, t.shape[-1]).float()
        if hess[n] is None:
            hess[n] = torch.zeros(a.shape[1], a.shape[1], device=x.device)
        hess[n].addmm_(a.t(), a)  # returns nothing: a hook's return value would replace the output

    hooks = [block.get_submodule(n).register_forward_hook(lambda mod, inp, out, n=n: accumulate(n, inp))
             for n in names]
    try:
        result = run_block(block, x, pos_emb, batch_size, out)
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        if n in owner:
            hess[n] = hess[owner[n]]
        elif hess[n] is None:  # never called (an expert no token reached): an all-zero Hessian, as before
            k = block.get_submodule(n).in_features
            hess[n] = torch.zeros(k, k, device=x.device)
    return result, hess, counts
