"""A quantization run's settings: one dataclass per stage, built from the command line in one
place (``quantize.cli.settings_from_args``). GSQ's own hyper-parameters are ``quantize.gsq.GSQOptions``
and the end-to-end stage's ``quantize.e2e.E2EOptions``; both are parts of ``QuantizeSettings``.

The checkpoint records the run's settings (``quantization_config.quantizer`` in its config.json)
as one flat dict under the flag names gsq-quantize has always written there: ``QuantizeSettings.record``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from quantize.e2e import E2EOptions
from quantize.gsq import GSQOptions


@dataclass
class StartSettings:
    """How each linear's codes start, by RTN or GPTQ (quantize/start.py)."""

    damp: float = 0.01
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal, static groups (docs/results/gsq-reference.md: 50.8 -> 48.0)
    refit_scales: bool = True  # GPTQ: re-choose each row's group scales for its codes (least squares on H)
    true_sequential: bool = False  # GPTQ: a linear's Hessian after the linears it reads from are quantized
    scale_search: str = "gptq-ref"  # RTN / GPTQ group scales: gptq-ref or mse (quantize/rtn.py)


@dataclass
class GSQSettings:
    """--method gsq: what GSQ trains on and where it starts; ``options``: its hyper-parameters."""

    options: GSQOptions = field(default_factory=GSQOptions)
    nsamples: int | None = None  # GSQ trains on the first this many sequences (None: all);
                                 # Hessians and propagation always use all of the run's `nsamples`
    held_out: int = 0  # GSQ picks its init or an epoch's codes by the block-output error on this
                       # many of the sequences after the first `nsamples` (0: no held-out set)
    init: str | None = None  # start from this quantized checkpoint's codes and scales, not GPTQ
    ternary_init: str = "gptq"  # --bits 1.58: "gptq", or "random" (the reference's init_method random:
                                # GSQ from random logits on the Hessian-weighted weight error first)
    ternary_init_steps: int = 2000  # steps of that weight-space stage (the reference's 2000)
    attention_mode: str = "joint"  # with attention quantized: "joint" (all linears on the block output)
                                   # or "reference" (the GSQ reference's: see BlockPipeline._quantize_attention_first)


@dataclass
class MoESettings:
    """Mixture-of-experts models (quantize/moe_block.py)."""

    min_tokens: int = 64  # an expert routed fewer calibration tokens is RTN-quantized, not GPTQ/GSQ
    quantize_dense: bool = False  # also quantize dense-MLP blocks (kept float by default)
    quantize_shared: bool = False  # also quantize shared experts (kept float by default)


@dataclass
class QuantizeSettings:
    """The run: method, grid, calibration, and each stage's settings."""

    method: str = "gptq"
    bits: float | int = 2
    group_size: int = 64
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    modules_to_not_convert: list[str] = field(default_factory=list)
    batch_size: int = 8
    start: StartSettings = field(default_factory=StartSettings)
    gsq: GSQSettings = field(default_factory=GSQSettings)
    moe: MoESettings = field(default_factory=MoESettings)
    # after the blocks: every group scale trained together on the float model's logits (quantize/e2e.py)
    e2e: E2EOptions = field(default_factory=E2EOptions)

    def record(self) -> dict:
        """The settings as the checkpoint records them: flat, under gsq-quantize's names (the
        GSQ hyper-parameters are in the run's report and gsq_logs.json, not here)."""
        g, m = self.gsq, self.moe
        return {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed, **asdict(self.start),
                "init": g.init, "gsq_nsamples": g.nsamples, "gsq_held_out": g.held_out,
                "ternary_init": g.ternary_init, "ternary_init_steps": g.ternary_init_steps,
                "attention_mode": g.attention_mode, "moe_min_tokens": m.min_tokens,
                "moe_quantize_dense": m.quantize_dense, "moe_quantize_shared": m.quantize_shared,
                "e2e_epochs": self.e2e.epochs, "e2e_lr": self.e2e.lr}
