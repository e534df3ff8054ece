"""``gsq-quantize --plan``: the memory and disk a run will need, from ``config.json`` alone.

A model of the pipeline (quantize/pipeline.py), not a measurement: it adds up the tensors each
phase of a run holds at once, on the run's device and on the host, and reports the largest
phase. Host numbers include the Python/torch/transformers process itself (RUNTIME_HOST, fitted
to CPU runs); device numbers include a CUDA context estimate (CUDA_CONTEXT, not measured: no GPU
was available). ``benchmarks/plan_check.py`` compares the host peak with measured runs.

Works for the architectures the pipeline runs (Llama, Mistral, Qwen2/3, and the MoE ones:
Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3 with MLA attention). A sparse block is planned
as the pipeline runs it (quantize/moe_block.py): its routed experts streamed one at a time, so
only the non-expert weights, one expert's weights, Hessians and GSQ state, that expert's routed
rows and four activation tensors are held at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gsq_format.format import FormatError, is_excluded, normalize_bits, storage_bits

GiB = 2**30
# Resident memory of a gsq-quantize process besides the tensors counted below: interpreter,
# torch, transformers, tokenizer, calibration text, allocator slack. Fitted so the SmolLM2 runs of
# benchmarks/plan_check.py land within 15 % (0.90-1.14 of the measured peak RSS); a model term,
# not a measured constant (an idle process with everything imported holds about 0.4 GiB).
RUNTIME_HOST = int(0.62 * GiB)
# A CUDA context with cuBLAS/cuDNN handles; an estimate, not measured here.
CUDA_CONTEXT = int(0.6 * GiB)
# Router linears are never quantized (quantize/pipeline.py ALWAYS_EXCLUDED).
ALWAYS_EXCLUDED = ("mlp.gate", "router", "shared_expert_gate")
# Rows routed to the busiest expert, as a multiple of an even share (T * top_k / experts): a
# planning assumption (routers are uneven), not a measurement.
HOT_EXPERT_FACTOR = 4
CHUNK_ROWS = 16384  # as quantize/moe_block.py (not imported: the plan needs no torch)


@dataclass
class LinearShape:
    name: str      # relative to the block, e.g. "mlp.experts.3.up_proj"
    n: int         # out features
    k: int         # in features
    expert: int | None = None   # routed expert index, None for everything else


@dataclass
class BlockShape:
    linears: list[LinearShape]
    act_floats_per_token: int   # floats a block keeps per token for backward (GSQ)
    other_params: int = 0       # norms etc.
    top_k: int = 0              # experts per token (sparse blocks)

    @property
    def params(self) -> int:
        return sum(li.n * li.k for li in self.linears) + self.other_params


def _dense_mlp(prefix: str, h: int, inter: int) -> list[LinearShape]:
    return [LinearShape(f"{prefix}.gate_proj", inter, h), LinearShape(f"{prefix}.up_proj", inter, h),
            LinearShape(f"{prefix}.down_proj", h, inter)]


def _experts(prefix: str, experts: int, h: int, inter: int) -> list[LinearShape]:
    out = []
    for e in range(experts):
        out += [LinearShape(f"{prefix}.{e}.{p}", inter, h, e) for p in ("gate_proj", "up_proj")]
        out.append(LinearShape(f"{prefix}.{e}.down_proj", h, inter, e))
    return out


def block_shapes(cfg: dict) -> list[BlockShape]:
    """One BlockShape per layer of a HF config dict."""
    h = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    blocks = []
    if "n_routed_experts" in cfg or "kv_lora_rank" in cfg:   # DeepSeek-V3 / Kimi-K2
        qr, kvr = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
        nope, rope, vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        attn = ([LinearShape("self_attn.q_a_proj", qr, h), LinearShape("self_attn.q_b_proj", heads * (nope + rope), qr)]
                if qr else [LinearShape("self_attn.q_proj", heads * (nope + rope), h)])
        attn += [LinearShape("self_attn.kv_a_proj_with_mqa", kvr + rope, h),
                 LinearShape("self_attn.kv_b_proj", heads * (nope + vd), kvr),
                 LinearShape("self_attn.o_proj", h, heads * vd)]
        experts, shared = cfg.get("n_routed_experts") or 0, cfg.get("n_shared_experts") or 0
        moe_i, topk = cfg.get("moe_intermediate_size", inter), cfg.get("num_experts_per_tok", 1)
        first_dense = cfg.get("first_k_dense_replace", 0)
        attn_floats = 6 * h + heads * (2 * (nope + rope) + 2 * vd) + 2 * kvr + (qr or 0)
        for i in range(layers):
            if i < first_dense or not experts:
                mlp, mlp_floats = _dense_mlp("mlp", h, inter), 4 * inter
            else:
                mlp = [LinearShape("mlp.gate", experts, h)] + _experts("mlp.experts", experts, h, moe_i)
                if shared:
                    mlp += _dense_mlp("mlp.shared_experts", h, shared * moe_i)
                mlp_floats = 4 * moe_i * (topk + shared) + experts
            blocks.append(BlockShape(attn + mlp, attn_floats + mlp_floats, 2 * h, topk if experts else 0))
        return blocks
    attn = [LinearShape("self_attn.q_proj", heads * hd, h), LinearShape("self_attn.k_proj", kv * hd, h),
            LinearShape("self_attn.v_proj", kv * hd, h), LinearShape("self_attn.o_proj", h, heads * hd)]
    # Kept for backward per token: norms' in/out (4h), q/k/v and their rotated copies, the
    # attention output and o_proj's input, the MLP's gate, up, activation and product.
    floats = 4 * h + 2 * (heads + 2 * kv) * hd + 2 * heads * hd
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0   # Qwen2/3-MoE, Mixtral
    if not experts:
        return [BlockShape(attn + _dense_mlp("mlp", h, inter), floats + 4 * inter, 2 * h) for _ in range(layers)]
    moe_i = cfg.get("moe_intermediate_size") or inter        # Mixtral: intermediate_size is the expert's
    topk = cfg.get("num_experts_per_tok", 2)
    shared_i = cfg.get("shared_expert_intermediate_size") or 0
    dense_layers, step = set(cfg.get("mlp_only_layers") or []), cfg.get("decoder_sparse_step") or 1
    for i in range(layers):
        if i in dense_layers or (i + 1) % step:
            blocks.append(BlockShape(attn + _dense_mlp("mlp", h, inter), floats + 4 * inter, 2 * h))
            continue
        mlp = [LinearShape("mlp.gate", experts, h)] + _experts("mlp.experts", experts, h, moe_i)
        if shared_i:
            mlp += _dense_mlp("mlp.shared_expert", h, shared_i) + [LinearShape("mlp.shared_expert_gate", 1, h)]
        blocks.append(BlockShape(attn + mlp, floats + 4 * moe_i * topk + 4 * shared_i + experts, 2 * h, topk))
    return blocks


@dataclass
class PlanSettings:
    method: str = "gsq"
    bits: float | int = 2
    group_size: int = 64
    nsamples: int = 16
    seqlen: int = 256
    batch_size: int = 8                 # pipeline forward batch
    excluded: list[str] = field(default_factory=list)
    device: str = "cpu"                 # "cpu" or "cuda"
    gsq_micro_batch: int = 1
    logits_bytes: int = 4
    activation_budget: int | None = None  # bytes; None: never spill
    moe_quantize_dense: bool = False    # as quantize/settings.py MoESettings
    moe_quantize_shared: bool = False
    e2e_epochs: int = 0                 # quantize/e2e.py's stage after the blocks (0: none)
    e2e_batch: int = 4                  # its sequences a step


@dataclass
class Plan:
    device_peak: int
    host_peak: int
    disk_peak: int
    phases: dict[str, dict[str, int]]     # phase -> {"device": bytes, "host": bytes}
    parts: dict[str, int]                 # named terms of the largest block stage, bytes
    stage: str                            # which block and stage that is
    disk: dict[str, int]
    spilled: bool
    notes: list[str]

    def as_json(self) -> dict:
        return {"device_peak_bytes": self.device_peak, "host_peak_bytes": self.host_peak,
                "disk_peak_bytes": self.disk_peak, "phases": self.phases, "parts": self.parts, "stage": self.stage,
                "disk": self.disk, "activations_spilled": self.spilled, "notes": self.notes,
                "model": "STATIC MODEL of the pipeline's tensors, not a measurement"}


def make_plan(cfg: dict, s: PlanSettings) -> Plan:
    """The memory and disk plan of quantizing the model of ``cfg`` (a config.json dict)."""
    bits = normalize_bits(s.bits)
    h = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    tied = bool(cfg.get("tie_word_embeddings", False))
    blocks = block_shapes(cfg)
    excluded = list(s.excluded) + ["lm_head"]
    on_gpu = s.device == "cuda"
    n, seq = s.nsamples, s.seqlen
    act = 4 * n * seq * h                                  # one [n, S, H] float32 tensor
    moe = any(li.expert is not None for b in blocks for li in b.linears)
    held = 4 if moe else 3         # activation tensors a block holds at once (moe_block.ACTIVATIONS_HELD)
    spilled = s.activation_budget is not None and held * act > s.activation_budget
    v = {1.58: 2, 2: 4, 3: 5}[bits]                         # logits per weight
    notes = []
    if moe:   # as the pipeline: dense MLPs of an MoE model and shared experts stay float by default
        sparse = [any(li.expert is not None for li in b.linears) for b in blocks]
        if not s.moe_quantize_dense:
            excluded += [f"model.layers.{i}.mlp" for i, sp in enumerate(sparse) if not sp]
        if not s.moe_quantize_shared:
            excluded += ["mlp.shared_expert", "mlp.shared_experts"]

    def quantized(b: BlockShape, i: int) -> list[LinearShape]:
        return [li for li in b.linears
                if not is_excluded(f"model.layers.{i}.{li.name}", excluded)
                and not is_excluded(f"model.layers.{i}.{li.name}", ALWAYS_EXCLUDED)]

    def weight_count(ls) -> int:
        return sum(li.n * li.k for li in ls)

    def gsq_parts(unit: list[LinearShape], backward_floats_per_token: int) -> dict[str, int]:
        w, big, m = weight_count(unit), max(li.n * li.k for li in unit), s.gsq_micro_batch
        parts = {"GSQ logits, gradients, Lion state": 3 * v * w * s.logits_bytes}
        if bits == 3:   # local-shift levels (float32) and mask (bool), [5, N, K] each
            parts["GSQ 3-bit levels and mask"] = 25 * w
        parts["GSQ soft weights kept for backward"] = 4 * w
        parts["GSQ noise/softmax of the largest linear"] = 6 * 4 * v * big
        parts["GSQ activations for backward"] = 4 * m * seq * backward_floats_per_token + 2 * 4 * m * seq * h
        return parts

    worst: dict[str, int] = {}
    worst_stage = ""
    worst_total = -1
    worst_gsq_rows = 0
    q_weights = 0
    acts = (lambda k: 0) if spilled else (lambda k: k * act)
    disk_batches = held * 4 * s.batch_size * seq * h if spilled else 0
    for i, b in enumerate(blocks):
        ql = quantized(b, i)
        q_weights += weight_count(ql)
        fwd = 4 * s.batch_size * seq * b.act_floats_per_token + disk_batches
        gptq = s.method in ("gptq", "gsq")
        by_expert: dict = {}
        for li in b.linears:
            if li.expert is not None:
                by_expert.setdefault(li.expert, []).append(li)
        if by_expert:
            # A sparse block, streamed: everything but the routed experts, plus one expert at a time.
            routed = [li for li in ql if li.expert is not None]
            rest = [li for li in ql if li.expert is None]
            one = max(by_expert.values(), key=weight_count)
            resident = 4 * (b.params - sum(weight_count(ls) for ls in by_expert.values()))
            tokens = n * seq
            rows = min(tokens, HOT_EXPERT_FACTOR * tokens * b.top_k // len(by_expert))
            routing = 12 * tokens * b.top_k                  # int64 ids + float32 weights
            hess_rest = sum(4 * li.k * li.k for li in rest) if gptq else 0
            one_w = 4 * weight_count(one)
            # Hessians and outputs go a chunk of rows at a time: rows, output; gate, up, act.
            chunk = 4 * min(rows, CHUNK_ROWS) * (2 * h + 3 * one[0].n)
            # GSQ's copy of the rows (router weight appended) and their weighted float outputs:
            # in memory, or in files beside the activations when those spill.
            gsq_rows = 4 * rows * (2 * h + 1)
            worst_gsq_rows = max(worst_gsq_rows, gsq_rows if s.method == "gsq" else 0)
            stages = {
                "load": {"activations": acts(1), "block weights (no routed experts)": 2 * resident},
                "float pass + Hessians": {"activations": acts(3), "block weights (no routed experts)": resident,
                                          "Hessians": hess_rest, "forward batch": fwd, "routing": routing},
                "expert stream": {"activations": acts(4), "block weights (no routed experts)": resident,
                                  "one expert's weights": one_w, "a chunk of its routed rows": chunk,
                                  "routing": routing},
            }
            if gptq and routed:
                big = max(one, key=lambda li: li.n * li.k)
                # gate and up share one Hessian (their common input); down has its own
                stages["expert stream"]["its Hessians"] = 4 * one[0].k ** 2 + sum(
                    4 * li.k ** 2 for li in one if li.name.endswith("down_proj"))
                stages["expert stream"]["GPTQ of its largest linear"] = 3 * 4 * big.n * big.k + 5 * 4 * big.k * big.k
            if s.method == "gsq" and routed:
                stages["expert GSQ"] = {"activations": acts(4), "block weights (no routed experts)": resident,
                                        "one expert's weights": one_w, "a chunk of its routed rows": chunk,
                                        "its routed rows for GSQ": 0 if spilled else gsq_rows,
                                        "routing": routing, **gsq_parts(one, 4 * one[0].n)}
            if s.method == "gsq" and rest:
                stages["attention GSQ"] = {"activations": acts(3), "block weights (no routed experts)": resident,
                                           **gsq_parts(rest, b.act_floats_per_token)}
        else:
            # A block's life: load it (its float32 parameters and the state dict's copies) with the
            # inputs alive; run it for the targets and Hessians; GPTQ, linear by linear, with all
            # Hessians alive; free them; GSQ; run it again into the next inputs.
            hess = sum(4 * li.k * li.k for li in ql) if gptq else 0
            stages = {
                "load": {"activations": acts(1), "block weights": 2 * 4 * b.params},
                "forward + Hessians": {"activations": acts(2), "block weights": 4 * b.params, "Hessians": hess,
                                       "forward batch": fwd},
                "next inputs": {"activations": acts(3), "block weights": 4 * b.params, "forward batch": fwd},
            }
            big = max(ql, key=lambda li: li.n * li.k, default=None)
            if hess and big is not None:   # W, W permuted, Q; H's copies and the H^-1 chain
                stages["GPTQ"] = {"activations": acts(2), "block weights": 4 * b.params, "Hessians": hess,
                                  "GPTQ of the largest linear": 3 * 4 * big.n * big.k + 5 * 4 * big.k * big.k}
            if s.method == "gsq" and ql:
                stages["GSQ"] = {"activations": acts(2), "block weights": 4 * b.params,
                                 **gsq_parts(ql, b.act_floats_per_token)}
        for stage, parts in stages.items():
            total = sum(parts.values())
            if total > worst_total:
                worst, worst_stage, worst_total = dict(parts), f"block {i}: {stage}", total

    embed = vocab * h
    largest_other = embed * 2                                            # bf16 embedding, as stored
    runtime_dev = CUDA_CONTEXT if on_gpu else 0
    # Host-side staging when the run is on a GPU: safetensors reads each tensor to the host first.
    stage_block = 2 * max(b.params for b in blocks)
    phases = {}
    if on_gpu:
        phases["check + embed"] = {"device": runtime_dev + 4 * embed + (0 if spilled else act),
                                   "host": RUNTIME_HOST + 2 * largest_other}
        phases["largest block"] = {"device": runtime_dev + worst_total, "host": RUNTIME_HOST + stage_block}
    else:
        phases["check + embed"] = {"device": 0, "host": RUNTIME_HOST + 2 * largest_other + 4 * embed
                                   + (0 if spilled else act)}
        phases["largest block"] = {"device": 0, "host": RUNTIME_HOST + worst_total}
    # write_checkpoint: one block's codes + scales, a shard being filled (2 GiB max), a tensor.
    qmax_block = max(sum(li.n * li.k for li in quantized(b, i)) for i, b in enumerate(blocks))
    all_params = sum(b.params for b in blocks)
    unquantized = all_params - q_weights + embed * (1 if tied else 2)
    ckpt_quantized = q_weights * storage_bits(bits) / 8 + q_weights * 2 / s.group_size   # codes + bf16 scales
    ckpt = ckpt_quantized + 2 * unquantized
    shard = min(2 * GiB, ckpt)
    if s.e2e_epochs:
        # quantize/e2e.py: the quantized model whole (its non-quantized weights in float32, int8
        # codes, per group a start scale, the trained change, its gradient and Adam's two moments) and
        # the float model's final hidden states for every calibration sequence (float32, host);
        # kept for backward, each linear's float codes (for the scales' gradient) and its
        # dequantized weight, and every block's activations; the KL's logit-sized tensors (teacher and
        # student logits, log-softmaxes, the teacher's probabilities, the product, their gradients).
        # Before the linears are swapped in, the same model is whole in float32 for one no-grad pass.
        tokens = s.e2e_batch * seq
        model_f32 = 4 * (all_params + embed * (1 if tied else 2))
        student = 4 * unquantized + q_weights + 20 * q_weights // s.group_size
        step = 2 * 4 * q_weights + 4 * tokens * sum(b.act_floats_per_token for b in blocks) + 10 * 4 * tokens * vocab
        teacher = 4 * n * seq * h
        e2e = max(model_f32, student + step)
        phases["end-to-end scales"] = ({"device": runtime_dev + e2e, "host": RUNTIME_HOST + stage_block + teacher}
                                       if on_gpu else {"device": 0, "host": RUNTIME_HOST + e2e + teacher})
    phases["write checkpoint"] = {"device": 0,
                                  "host": RUNTIME_HOST + qmax_block * (1 + 4 / s.group_size) + shard + largest_other}
    if spilled:
        notes.append(f"activations ({held * act / GiB:.1f} GiB for {held}) exceed the budget: they live in "
                     f"files in the work folder; the page cache holds what fits (reclaimable)")
    if moe:
        notes.append(f"MoE: routed experts are streamed one at a time; the busiest expert is assumed to get "
                     f"{HOT_EXPERT_FACTOR}x an even share of the routed rows")
    # Disk: the work folder keeps every block's codes (int8) and scales (float32) until the end
    # and the current block's inputs (the resume state); spilled, also the targets and the next
    # inputs. The checkpoint is written beside it.
    work = q_weights * (1 + 4 / s.group_size) + (held * act + worst_gsq_rows if spilled else act)
    disk = {"work folder": int(work), "checkpoint": int(ckpt), "checkpoint: quantized linears": int(ckpt_quantized)}
    return Plan(device_peak=max(p["device"] for p in phases.values()),
                host_peak=max(p["host"] for p in phases.values()),
                disk_peak=int(work + ckpt), phases=phases, parts=worst, stage=worst_stage, disk=disk, spilled=spilled, notes=notes)


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model folder, or the file itself; FormatError if unusable."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{p}: cannot read a model config ({e})") from None
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in cfg]
    if missing:
        raise FormatError(f"{p}: config lacks {', '.join(missing)}")
    return cfg


def format_plan(plan: Plan, title: str) -> str:
    def g(b):
        return f"{b / GiB:8.2f} GiB"

    lines = [title, "STATIC MODEL of the pipeline's tensors, not a measurement.", "",
             f"{'phase':<22}{'device':>14}{'host':>14}"]
    for name, p in plan.phases.items():
        lines.append(f"{name:<22}{g(p['device']) if p['device'] else '           -':>14}{g(p['host']):>14}")
    lines += ["", f"largest block stage ({plan.stage}), by part:"]
    lines += [f"  {k:<46}{g(b)}" for k, b in sorted(plan.parts.items(), key=lambda kv: -kv[1]) if b]
    lines += ["", f"peak: device {g(plan.device_peak).strip()}, host {g(plan.host_peak).strip()}, "
              f"disk {g(plan.disk_peak).strip()} ("
              + ", ".join(f"{k} {g(b).strip()}" for k, b in plan.disk.items() if ":" not in k) + ")"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
