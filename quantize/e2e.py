"""End-to-end scale tuning: after every block is quantized, train all group scales at once against the logits.

GPTQ and GSQ each fit one block's output given quantized inputs; neither sees
what a block's error costs at the model's output, and the errors of every
block add up there. This stage keeps every code fixed and trains each
linear's group scales (``scales * (1 + r)``, r from 0) together, by Adam on
the KL divergence from the float model's next-token distribution to the
quantized model's, over the calibration tokens, with a cosine learning rate
over ``epochs`` passes. Only the scales move (1/G of the weights), so the
grid, the codes and the checkpoint format are as before. It is the scale
step of end-to-end methods such as EfficientQAT's E2E-QP, on the logits as
the teacher (measured on SmolLM2 in docs/results/quality.md, "End-to-end scale tuning").

Memory: unlike the block loop, the whole quantized model (float32 non-quantized
weights, int8 codes) lives on the run's device. The float model is not kept: one
no-grad pass over the calibration sequences records its final hidden states
(f32 ``[n, S, H]``, on the host), and each step's teacher logits are the LM head
on them. A step keeps for its backward every linear's float codes and dequantized
weight, every block's activations and a few logit-sized tensors (``gsq-quantize
--plan`` counts them). Dense models only: MoE checkpoints are refused before any
work (their experts are unfused here and fused in transformers' forward).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantize.block_forward import call_block


@dataclass
class E2EOptions:
    epochs: int = 0  # passes over the calibration sequences; 0: no end-to-end stage
    lr: float = 2e-3  # Adam's peak learning rate on the relative scale change r
    batch_size: int = 4  # sequences a step


class GroupScaledLinear(torch.nn.Module):
    """A quantized linear whose group scales train: ``y = x W^T`` with
    ``W[n, g*G:(g+1)*G] = codes[n, g*G:(g+1)*G] * scales[n, g] * (1 + rel[n, g])``.

    ``codes``: int8 ``[N, K]`` (fixed); ``scales``: f32 ``[N, K/G]`` (fixed start);
    ``rel``: f32 ``[N, K/G]``, the trained parameter, zero at the start."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("start", scales.to(torch.float32))
        self.rel = torch.nn.Parameter(torch.zeros_like(self.start))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def scales(self) -> torch.Tensor:
        return self.start * (1 + self.rel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.codes.shape
        groups = self.start.shape[1]
        w = (self.codes.to(torch.float32).view(n, groups, k // groups) * self.scales().unsqueeze(-1)).view(n, k)
        return F.linear(x, w, self.bias)


def swap_in(model: torch.nn.Module, name: str, codes: torch.Tensor, scales: torch.Tensor) -> GroupScaledLinear:
    """Replace the linear ``name`` (dotted, in ``model``) by a GroupScaledLinear of ``codes`` and
    ``scales`` that keeps its bias; return the new module."""
    parent, _, child = name.rpartition(".")
    m = GroupScaledLinear(codes, scales, model.get_submodule(name).bias)
    setattr(model.get_submodule(parent) if parent else model, child, m)
    return m


def final_hidden(model, rotary, ids: torch.Tensor) -> torch.Tensor:
    """f32 ``[b, S, H]`` for int64 ``ids [b, S]``: the embedding, every block through
    :func:`call_block` (causal attention, no mask), then the final norm: what the LM head reads."""
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    x = model.model.embed_tokens(ids)
    pos_emb = rotary(x, pos)
    for block in model.model.layers:
        x = call_block(block, x, pos_emb)
    return model.model.norm(x)


def logits(model, rotary, ids: torch.Tensor) -> torch.Tensor:
    """f32 ``[b, S, vocab]`` for int64 ``ids [b, S]``: the LM head on :func:`final_hidden`."""
    return model.lm_head(final_hidden(model, rotary, ids)).float()


def teacher_hidden(model, rotary, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The float model's :func:`final_hidden` for every sequence of ``ids`` (int64 ``[n, S]``), f32
    ``[n, S, H]`` on the host: recorded once, before the model's linears are swapped for
    quantized ones, so the stage needs no second copy of the model as its teacher."""
    with torch.no_grad():
        return torch.cat([final_hidden(model, rotary, ids[b:b + batch_size]).float().cpu()
                          for b in range(0, ids.shape[0], batch_size)])


def kl_from_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), both f32 ``[b, S, vocab]``."""
    t = torch.log_softmax(teacher_logits, dim=-1)
    s = torch.log_softmax(student_logits, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def tune_scales(student, rotary, quantized: dict[str, GroupScaledLinear], ids: torch.Tensor,
                teacher: torch.Tensor, options: E2EOptions, seed: int, log=print,
                log_seconds: float = 60.0) -> dict[str, torch.Tensor]:
    """Train the scales of ``quantized`` (module name in ``student`` -> its GroupScaledLinear,
    already in place there) so ``student``'s logits match the float model's on ``ids`` (int64
    ``[n, S]`` on the run's device); ``teacher`` is the float model's :func:`teacher_hidden` for
    them, f32 ``[n, S, H]``, and its logits are ``student``'s LM head (not quantized) on it.
    Return each linear's new scales, f32 ``[N, K/G]``. Deterministic for a given ``seed``.
    ``log`` gets each epoch's mean KL, and a progress line at most every ``log_seconds`` within one."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = [m.rel for m in quantized.values()]
    for p in params:
        p.requires_grad_(True)
    bs = min(options.batch_size, ids.shape[0])
    per_epoch = ids.shape[0] // bs
    total = options.epochs * per_epoch
    opt = torch.optim.Adam(params, lr=options.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / total)))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    started = last_log = time.monotonic()
    for epoch in range(options.epochs):
        order = torch.randperm(ids.shape[0], generator=gen, device="cpu")
        kl_sum = 0.0
        for b in range(per_epoch):
            rows = order[b * bs:(b + 1) * bs]
            with torch.no_grad():
                target = student.lm_head(teacher[rows].to(ids.device)).float()
            loss = kl_from_teacher(logits(student, rotary, ids[rows.to(ids.device)]), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            kl_sum += loss.item()
            if time.monotonic() - last_log >= log_seconds:
                last_log = time.monotonic()
                done = epoch * per_epoch + b + 1
                log(f"[gsq-quantize] end-to-end scales, epoch {epoch + 1}/{options.epochs}: step {b + 1}/{per_epoch}, "
                    f"mean KL so far {kl_sum / (b + 1):.4f}, ~{(last_log - started) / done * (total - done) / 60:.1f} min left")
        log(f"[gsq-quantize] end-to-end scales, epoch {epoch + 1}/{options.epochs}: "
            f"mean KL from the float model {kl_sum / per_epoch:.4f} over {per_epoch} steps")
    return {name: m.scales().detach() for name, m in quantized.items()}


def tune_checkpoint(model_dir, ckpt_dir, out_dir, ids: torch.Tensor, options: E2EOptions, seed: int,
                    log=print) -> "Path":
    """The end-to-end stage applied to a finished dense GSQ checkpoint: its codes kept, its scales
    trained by :func:`tune_scales` against ``model_dir``'s float model on ``ids`` (int64 ``[n, S]``),
    written as a new checkpoint at ``out_dir`` (atomically; same quantization config, the stage's
    settings added under ``quantizer.e2e``). Runs on the CPU.

    Equals ``gsq-quantize --e2e-epochs`` after the same blocks up to one rounding: the pipeline's
    stage starts from its float32 work-folder scales, this one from the checkpoint's stored ones."""
    from pathlib import Path

    from gsq_format.convert import read_checkpoint
    from gsq_format.format import CheckpointWriter, read_quant_config
    from quantize.models import load_float_model

    ck = read_checkpoint(ckpt_dir)
    if ck.source != "gsq":
        raise ValueError(f"{ckpt_dir}: a GSQ checkpoint is needed, this one is {ck.source}")
    student = load_float_model(model_dir)
    rotary = type(student.model.rotary_emb)(config=student.config)
    teacher = teacher_hidden(student, rotary, ids, options.batch_size)
    quantized = {prefix: swap_in(student, prefix, codes, scales.float())
                 for prefix, (codes, scales) in ck.linears.items()}
    tuned = tune_scales(student, rotary, quantized, ids, teacher, options, seed=seed, log=log)
    qcfg = read_quant_config(ckpt_dir)
    qcfg.quantizer = {**qcfg.quantizer, "e2e": {"epochs": options.epochs, "lr": options.lr,
                                                "batch_size": options.batch_size, "seed": seed,
                                                "sequences": int(ids.shape[0]), "seqlen": int(ids.shape[1])}}
    writer = CheckpointWriter(out_dir, base_config=ck.config, quant_config=qcfg)
    try:
        for prefix in sorted(ck.linears):
            writer.add_quantized(prefix, ck.linears[prefix][0], tuned[prefix])
        for name in sorted(ck.tensors):
            writer.add(name, ck.tensors[name])
        return Path(writer.finish(tokenizer_dir=ck.folder))
    except BaseException:
        writer.abort()
        raise
