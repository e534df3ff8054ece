"""Mixture-of-Experts blocks for the pipeline: one ``nn.Linear`` per expert weight.

transformers (5.x) holds a sparse block's experts as two fused 3-D parameters
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``),
while checkpoints on disk (and vLLM) name every expert's gate, up and down
separately. :func:`unfuse_experts` swaps each fused experts module for
:class:`ExpertList`, whose children carry the checkpoint's own names, so the
pipeline treats every expert weight as an ordinary linear: it loads it by
name, takes its Hessian over exactly the tokens the (float) router sends to
that expert, quantizes it, and writes it under its checkpoint name.

Supported: Qwen3-MoE (``mlp.experts.{e}.gate_proj/up_proj/down_proj``, router
``mlp.gate``), Qwen2-MoE (the same names, plus a shared expert ``mlp.shared_expert.*``
behind a sigmoid gate ``mlp.shared_expert_gate``), DeepSeek-V3 (the same expert names,
shared experts ``mlp.shared_experts.*``, a sigmoid router with a bias
``mlp.gate.e_score_correction_bias`` and grouped top-k; MLA attention) and Mixtral (on disk
``block_sparse_moe.experts.{e}.w1/w3/w2``, router ``block_sparse_moe.gate``;
transformers calls the block ``mlp``).

Streaming (quantize/moe_block.py): an :class:`ExpertList` whose ``capture`` is set
does not run its experts; it hands the sparse block's input rows and the router's
choice to ``capture`` and returns zeros, so one pass of the block gives everything
but the routed experts' sum, and the experts can then be loaded, used and freed one
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MoESpec:
    disk_block: str  # the sparse block's module name in checkpoints
    gate: str  # per-expert linear names in checkpoints
    up: str
    down: str
    num_experts_key: str  # config.json key holding the expert count


MOE_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": MoESpec("mlp", "gate_proj", "up_proj", "down_proj", "num_experts"),
    "Qwen2MoeForCausalLM": MoESpec("mlp", "gate_proj", "up_proj", "down_proj", "num_experts"),
    "MixtralForCausalLM": MoESpec("block_sparse_moe", "w1", "w3", "w2", "num_local_experts"),
    "DeepseekV3ForCausalLM": MoESpec("mlp", "gate_proj", "up_proj", "down_proj", "n_routed_experts"),
}
# A sparse block's shared (always-on) experts, where the architecture has them (Qwen2-MoE: one behind
# a sigmoid gate; DeepSeek-V3: an ungated MLP): kept float unless asked.
SHARED_EXPERTS = ("mlp.shared_expert", "mlp.shared_experts")


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears named as in the checkpoint."""

    def __init__(self, spec: MoESpec, hidden: int, inter: int, act) -> None:
        super().__init__()
        self.names = (spec.gate, spec.up, spec.down)
        self.add_module(spec.gate, nn.Linear(hidden, inter, bias=False))
        self.add_module(spec.up, nn.Linear(hidden, inter, bias=False))
        self.add_module(spec.down, nn.Linear(inter, hidden, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """Drop-in for transformers' fused experts: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, the same sum over each token's chosen experts.

    With ``capture`` set (a callable), the experts are not run (they may be on the meta device):
    ``capture(hidden_states, top_k_index, top_k_weights)`` is called and zeros are returned."""

    capture = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.capture is not None:
            self.capture(hidden_states, top_k_index, top_k_weights)
            return torch.zeros_like(hidden_states)
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            tok, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[tok]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def moe_spec(arch: str) -> MoESpec | None:
    return MOE_ARCHITECTURES.get(arch)


def unfuse_experts(model: nn.Module, arch: str) -> int:
    """Replace every fused experts module of ``model`` (on its current device, typically meta)
    by an :class:`ExpertList`; return how many blocks had one."""
    spec = MOE_ARCHITECTURES[arch]
    count = 0
    for block in model.model.layers:
        experts = getattr(getattr(block, "mlp", None), "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue  # a dense block (Qwen3-MoE's mlp_only_layers)
        e, two_i, h = experts.gate_up_proj.shape
        device = experts.gate_up_proj.device
        with torch.device(device):
            block.mlp.experts = ExpertList(ExpertMLP(spec, h, two_i // 2, experts.act_fn) for _ in range(e))
        count += 1
    return count


def sparse_experts(block: nn.Module) -> ExpertList | None:
    """The block's :class:`ExpertList`, or None for a dense block."""
    experts = getattr(getattr(block, "mlp", None), "experts", None)
    return experts if isinstance(experts, ExpertList) else None


def disk_name(name: str, arch: str | None) -> str:
    """The checkpoint's name for the model's (unfused) parameter or module ``name``."""
    spec = MOE_ARCHITECTURES.get(arch or "")
    if spec is None or spec.disk_block == "mlp":
        return name
    for part in (".mlp.experts.", ".mlp.gate."):
        if part in f".{name}.":
            return f".{name}".replace(".mlp.", f".{spec.disk_block}.", 1)[1:]
    return name


def expert_of(name: str) -> str | None:
    """``"mlp.experts.3"`` for ``"mlp.experts.3.gate_proj"`` (any prefix); None for other linears."""
    parts = name.split(".")
    for j in range(len(parts) - 1):
        if parts[j] == "experts" and parts[j + 1].isdigit():
            return ".".join(parts[: j + 2])
    return None
