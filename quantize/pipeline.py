"""Block-wise quantization of a HF causal LM, one transformer block in memory at a time.

Flow: embed N calibration sequences (block-0 inputs) -> for each block i:
load block i from safetensors (fp32), run it on its inputs to get the fp
targets while accumulating each linear's input Hessian, quantize its linears
(RTN, GPTQ, or GSQ refinement from GPTQ or from an existing quantized
checkpoint's codes -- ``init``), put the dequantized weights in and run
it again to get block i+1's inputs (propagated through quantized blocks).

Activations (inputs, targets, next inputs; f32 [n,S,H] each) stay on the run's
device, or above a memory budget live in files in the work folder
(quantize/activations.py).

Resume: after each block the work folder gets ``block-XXXXX.safetensors``
(codes int8 [N,K] + scales f32 [N,K/G] per linear), ``inputs-XXXXX.f32``
(next block's inputs, raw f32 [n,S,H]) and ``state.json``, each written to a
temporary file and renamed. A rerun with the same settings continues at the
next block; the run is deterministic, so the checkpoint is byte-identical.

MoE blocks (Qwen3-MoE, Qwen2-MoE, DeepSeek-V3, Mixtral; quantize/moe.py) hold one linear
per expert weight and stream their routed experts from disk one at a time
(quantize/moe_block.py): each expert's Hessian is over the tokens the float
router sends it, an expert routed fewer than ``moe_min_tokens`` is RTN-quantized
(and named in the log and ``moe_rtn_experts.json``), GSQ trains each expert on
its router-weighted output, and its codes go to
``block-XXXXX.expert-XXXXX.safetensors`` at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from gsq_format.format import (
    CheckpointWriter,
    FormatError,
    GSQQuantConfig,
    check_group_size,
    grid_range,
    is_excluded,
    read_model_config,
)
from quantize.activations import ActivationSpace, default_budget
from quantize.block_forward import QK, VO, call_attention, call_block, linear_stages, run_block, run_block_with_hessians
from quantize.files import atomic_json, atomic_save, release_host_memory
from quantize.gsq import WEIGHT_SPACE_PIECES, refine_weight_space
from quantize.models import WeightReader, build_skeleton, check_architecture, load_float_model
from quantize.moe import SHARED_EXPERTS, disk_name, expert_of, moe_spec, sparse_experts
from quantize.moe_block import ACTIVATIONS_HELD, expert_file, quantize_moe_block
from gsq_format.qtypes import QuantizedWeight
from quantize.report import layer_error
from quantize.settings import QuantizeSettings
from quantize.start import few_tokens_quantizer, start_quantizer

METHODS = ("rtn", "gptq", "gsq")
ATTENTION_MODES = ("joint", "reference")
# Changes when the work folder's files change meaning, so an older work folder is not resumed.
WORK_FORMAT = "work-4: inputs-<block>.f32, counter-based CPU noise, streamed experts in block-<b>.expert-<e>"
# Never quantized, whatever the user asks: MoE routers (a "gate" linear, not gate_proj) and
# Qwen2-MoE's one-output shared-expert gate.
ALWAYS_EXCLUDED = ("mlp.gate", "router", "shared_expert_gate")
MOE_RTN_FILE = "moe_rtn_experts.json"  # in the work folder and the checkpoint
REPORT_BLOCKS_FILE = "report_blocks.json"  # per-block errors for report.html (work folder)
E2E_SCALES_FILE = "e2e_scales.safetensors"  # the end-to-end stage's scales, by checkpoint prefix (work folder)


def block_linears(block: torch.nn.Module, excluded: list[str], block_prefix: str) -> list[str]:
    """Dotted names (relative to the block) of the linears to quantize, in module order."""
    names = []
    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Linear):
            full = f"{block_prefix}.{name}"
            if is_excluded(full, excluded) or is_excluded(full, ALWAYS_EXCLUDED):
                continue
            names.append(name)
    return names


class BlockPipeline:
    """Quantize ``model_dir`` into a GSQ checkpoint at ``out_dir``; see module docstring."""

    def __init__(self, model_dir, out_dir, settings: QuantizeSettings, work_dir=None, log=print,
                 device: torch.device | str = "cpu", activation_budget: int | None = None):
        self.model_dir = Path(model_dir)
        # Where every tensor of the run lives (blocks, activations, Hessians, GPTQ, GSQ); files
        # and the resume state stay on the host. Not part of the fingerprint: a run may resume
        # on another device.
        self.device = torch.device(device)
        # Bytes of device (or host, on CPU) memory the three activation tensors may take before
        # they spill to files in the work folder (quantize/activations.py); None: half of what is free.
        self.activation_budget = activation_budget
        self.out_dir = Path(out_dir)
        self.s = settings
        self.work_dir = Path(work_dir) if work_dir else self.out_dir.with_name(f".{self.out_dir.name}.work")
        self.gsq_options = settings.gsq.options if settings.method == "gsq" else None
        self.log = log

    # ---------------------------------------------------------------- checks
    def check(self) -> None:
        """Validate everything that can be checked before any work; raise FormatError/ModelError."""
        s = self.s
        if s.method not in METHODS:
            raise FormatError(f"method must be one of {METHODS}, got {s.method!r}")
        if s.gsq.attention_mode not in ATTENTION_MODES:
            raise FormatError(f"attention mode must be one of {ATTENTION_MODES}, got {s.gsq.attention_mode!r}")
        if s.e2e.epochs < 0 or not s.e2e.lr > 0:
            raise FormatError(f"--e2e-epochs must be >= 0 and --e2e-lr > 0, got {s.e2e.epochs} and {s.e2e.lr}")
        self.cfg = read_model_config(self.model_dir)
        self.arch = check_architecture(self.cfg, self.model_dir)
        if s.e2e.epochs and moe_spec(self.arch) is not None:
            raise FormatError(f"--e2e-epochs: end-to-end scale tuning is for dense models; {self.arch} is a MoE")
        self.model = build_skeleton(self.model_dir)
        self.reader = WeightReader(self.model_dir)
        self.layers = self.model.model.layers
        kept = set(s.modules_to_not_convert) | {"lm_head"}
        if moe_spec(self.arch) is not None and not s.moe.quantize_dense:
            # As the GSQ reference does: only the experts (and attention, unless skipped) are quantized.
            kept |= {f"model.layers.{i}.mlp" for i, b in enumerate(self.layers) if sparse_experts(b) is None}
            if not s.moe.quantize_shared:
                kept |= {e for e in SHARED_EXPERTS if any(n.endswith(e) for n, _ in self.model.named_modules())}
        self.qcfg = GSQQuantConfig(
            bits=s.bits,
            group_size=s.group_size,
            modules_to_not_convert=sorted(kept),
            method=s.method,
            quantizer=s.record(),
        )
        self.names = []
        for i, block in enumerate(self.layers):
            names = block_linears(block, self.qcfg.modules_to_not_convert, f"model.layers.{i}")
            for n in names:
                check_group_size(block.get_submodule(n).in_features, s.group_size, f"model.layers.{i}.{n}")
            self.names.append(names)
        if not any(self.names):
            raise FormatError("no linear layer left to quantize (check --modules-to-not-convert)")
        self.init = self._read_init() if s.gsq.init else None
        dev = self.device
        init = None if self.init is None else {
            k: QuantizedWeight(q.codes.to(dev), q.scales.to(dev), q.bits, q.group_size) for k, q in self.init.items()}
        self.start = start_quantizer(s, init)  # how each linear's codes start (quantize/start.py)
        self.few_tokens_start = few_tokens_quantizer(s, self.start)
        for name in self.reader.names():  # every weight finite, before any work
            self.reader.get(name)
        release_host_memory()

    def _read_init(self) -> dict[str, QuantizedWeight]:
        """The --init checkpoint's codes and scales for every linear to quantize (any format
        gsq_format.convert reads), checked against the settings."""
        from gsq_format.convert import read_checkpoint

        s = self.s
        if s.method != "gsq":
            raise FormatError("--init starts GSQ from a quantized checkpoint: use it with --method gsq")
        ck = read_checkpoint(s.gsq.init)
        if ck.group_size != s.group_size:
            raise FormatError(f"--init {s.gsq.init}: group size {ck.group_size}, but --group-size is {s.group_size}")
        qmin, qmax = grid_range(s.bits)
        init = {}
        for i, names in enumerate(self.names):
            for n in names:
                prefix = disk_name(f"model.layers.{i}.{n}", self.arch)
                if prefix not in ck.linears:
                    raise FormatError(f"--init {s.gsq.init}: {prefix} is not quantized there")
                codes, scales = ck.linears[prefix]
                shape = tuple(self.layers[i].get_submodule(n).weight.shape)
                if tuple(codes.shape) != shape:
                    raise FormatError(f"--init {s.gsq.init}: {prefix} is {tuple(codes.shape)}, the model's is {shape}")
                if int(codes.min()) < qmin or int(codes.max()) > qmax:
                    raise FormatError(f"--init {s.gsq.init}: {prefix} has codes outside the {s.bits}-bit grid "
                                      f"[{qmin}, {qmax}]; choose --bits to match the checkpoint")
                init[prefix] = QuantizedWeight(codes, scales.float(), s.bits, s.group_size)
        return init

    def _fingerprint(self, ids: torch.Tensor) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.s), sort_keys=True).encode())
        h.update(WORK_FORMAT.encode())
        h.update(ids.numpy().tobytes())
        for f in sorted(self.model_dir.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ run
    def run(self, ids: torch.Tensor, resume: bool = True) -> Path:
        """Quantize with calibration token ids int64 ``[n, S]``; return the checkpoint folder."""
        s = self.s
        refine = None
        if s.method == "gsq":
            from quantize.gsq import refine_block
            refine = functools.partial(refine_block, progress=self.log)
        fp = self._fingerprint(ids)
        state_path = self.work_dir / "state.json"
        start = 0
        if resume and state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") == fp:
                start = state["next_block"]
                self.log(f"[gsq-quantize] resuming at block {start} from {self.work_dir}")
        if start == 0:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        cfg_obj = self.model.config
        dev = self.device
        with torch.device(dev):
            rotary = type(self.model.model.rotary_emb)(config=cfg_obj)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
        budget = self.activation_budget if self.activation_budget is not None else default_budget(dev)
        held = ACTIVATIONS_HELD if any(sparse_experts(b) is not None for b in self.layers) else 3
        space = ActivationSpace((ids.shape[0], ids.shape[1], self.cfg["hidden_size"]), dev, self.work_dir, budget,
                                held=held)
        if space.on_disk:
            self.log(f"[gsq-quantize] activations ({held * space.bytes_each / 2**30:.2f} GiB for {held}) exceed the "
                     f"budget of {budget / 2**30:.2f} GiB: kept in files in {self.work_dir}")
        if start == 0:
            emb = self.reader.get("model.embed_tokens.weight").to(dev, torch.float32)
            x = space.new("inputs")
            for sl, _ in x.batches(s.batch_size):
                x[sl] = emb[ids[sl].to(dev)]
            del emb
        else:
            x = space.load_inputs(start)
        with torch.no_grad():
            pos_emb = rotary(x[:1], pos)
        gsq_logs = {}
        if (self.work_dir / "gsq_logs.json").is_file():
            gsq_logs = json.loads((self.work_dir / "gsq_logs.json").read_text())
        rtn_experts = {}  # MoE experts quantized by RTN for lack of routed tokens: name -> tokens
        if (self.work_dir / MOE_RTN_FILE).is_file():
            rtn_experts = json.loads((self.work_dir / MOE_RTN_FILE).read_text())
        self.report_blocks = []  # one record per block for quantize/report.py
        if (self.work_dir / REPORT_BLOCKS_FILE).is_file():
            self.report_blocks = json.loads((self.work_dir / REPORT_BLOCKS_FILE).read_text())

        # A bar with an ETA on a terminal (stderr a TTY), nothing otherwise; log lines print above it.
        bar = tqdm(total=len(self.layers), initial=start, unit="block", desc="gsq-quantize", dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        log = self.log if bar.disable else bar.write
        for i in range(start, len(self.layers)):
            torch.manual_seed(s.seed * 1_000_003 + i)
            prefix = f"model.layers.{i}"
            names = self.names[i]
            streamed = sparse_experts(self.layers[i]) is not None and any(expert_of(n) for n in names)
            # A sparse block's routed experts are loaded one at a time later (quantize/moe_block.py).
            block = self.reader.load_into(self.layers[i], prefix, device=dev, arch=self.arch,
                                          skip=("mlp.experts",) if streamed else ()).eval()
            result: dict[str, QuantizedWeight] = {}
            layer_errors = {}
            if streamed:
                targets, x_next, outcome, attention_logs = quantize_moe_block(
                    self, i, block, names, x, pos_emb, space, refine, result, log)
                layer_errors = outcome.layer_errors
                if outcome.rtn_experts:
                    log(f"[gsq-quantize] block {i + 1}: RTN for {len(outcome.rtn_experts)} expert(s) routed fewer "
                        f"than {s.moe.min_tokens} calibration tokens: "
                        + ", ".join(f"{e} ({c})" for e, c in outcome.rtn_experts.items()))
                    rtn_experts.update(outcome.rtn_experts)
                if outcome.gsq_logs or attention_logs:
                    gsq_logs[prefix] = {"experts": outcome.gsq_logs, "attention": attention_logs}
            else:
                targets, x_next = self._quantize_block(block, i, names, x, pos_emb, space, refine, result,
                                                       layer_errors, gsq_logs)
            space.discard(x)
            x = x_next
            num = den = 0.0
            for sl, yb in x.batches(s.batch_size):
                tb = targets[sl]
                num += (yb - tb).pow(2).sum().item()
                den += tb.pow(2).sum().item()
            space.discard(targets)
            err = num / max(den, 1e-12)
            log(f"[gsq-quantize] block {i + 1}/{len(self.layers)}: {len(names)} linears, rel. output MSE {err:.3e}")
            record = {"index": i, "rel_output_mse": err,
                      "layers": layer_errors}
            if "hard_mse" in gsq_logs.get(prefix, {}):  # a sparse block's experts have one log each
                record["gsq_init_mse"] = gsq_logs[prefix]["hard_mse"][0]
                record["gsq_final_mse"] = gsq_logs[prefix]["hard_mse"][gsq_logs[prefix].get("chosen", -1)]
                record["gsq_kept"] = gsq_logs[prefix].get("chosen")  # 0: the init, e: epoch e's codes
            self.report_blocks.append(record)
            tensors = {}
            for n, q in result.items():
                tensors[f"{n}.codes"] = q.codes.cpu()
                tensors[f"{n}.scales"] = q.scales.float().cpu()
            atomic_save(tensors, self.work_dir / f"block-{i:05d}.safetensors")
            x = space.commit_inputs(x, i + 1)
            if gsq_logs:
                atomic_json(gsq_logs, self.work_dir / "gsq_logs.json")
            if rtn_experts:
                atomic_json(rtn_experts, self.work_dir / MOE_RTN_FILE)
            atomic_json(self.report_blocks, self.work_dir / REPORT_BLOCKS_FILE)
            atomic_json({"fingerprint": fp, "next_block": i + 1}, state_path)
            space.inputs_path(i).unlink(missing_ok=True)  # only now: the state no longer names it
            self.layers[i].to("meta")
            del block, targets
            release_host_memory()
            bar.update(1)
        bar.close()

        if s.e2e.epochs:
            self._tune_end_to_end(ids)
        out = self.write_checkpoint()
        if gsq_logs:
            (out / "gsq_logs.json").write_text(json.dumps(gsq_logs, indent=2, sort_keys=True))
        if rtn_experts:
            (out / MOE_RTN_FILE).write_text(json.dumps(rtn_experts, indent=2, sort_keys=True))
        self.gsq_logs = gsq_logs
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return out

    def start_codes(self, weight, prefix: str, hess, few_tokens: bool = False) -> QuantizedWeight:
        """One linear's codes before any GSQ, by the run's start handler (quantize/start.py); an MoE
        expert routed too few tokens (``few_tokens``) gets RTN instead, unless the codes come from --init.
        ``prefix``: the linear's checkpoint name; ``hess``: its Hessian, or None."""
        return (self.few_tokens_start if few_tokens else self.start)(weight, hess, prefix)

    def _quantize_block(self, block, i, names, x, pos_emb, space, refine, result, layer_errors, gsq_logs):
        """A block held whole (every block but a sparse one with experts to quantize): fills
        ``result`` and ``layer_errors``; returns (the float block's outputs, the next block's inputs)."""
        s = self.s
        prefix = f"model.layers.{i}"
        attention_first = (refine is not None and s.gsq.attention_mode == "reference"
                           and any(n in QK + VO for n in names))
        attention_logs = {}
        if attention_first:
            # quantizes q/k/v/o (and leaves them in the block); names left: the rest
            attention_logs, float_targets = self._quantize_attention_first(block, names, x, pos_emb, space,
                                                                           result, refine, i)
        later = [n for n in names if n not in result]
        needs_hessians = self.start.needs_hessian
        # true-sequential: each stage's Hessians come from a pass through the block with the earlier
        # stages already quantized; the first pass (float, as far as this block goes) gives the targets
        stages = (linear_stages(block, later, x[0:1], pos_emb) if needs_hessians and s.start.true_sequential
                  else [later])
        float_weights = {}
        for si, stage in enumerate(stages):
            if si == 0:
                targets, hess, _ = run_block_with_hessians(block, stage if needs_hessians else [], x, pos_emb,
                                                           s.batch_size, space.new("targets"))
            else:
                _, hess, _ = run_block_with_hessians(block, stage, x, pos_emb, s.batch_size, None)
            for n in stage:
                weight = block.get_submodule(n).weight.data
                result[n] = self.start_codes(weight, disk_name(f"{prefix}.{n}", self.arch), hess.get(n))
                if n in hess:  # diag(H) only (K floats per linear) for the report's per-layer errors
                    hdiag = hess[n].diagonal().clone()
                    layer_errors[n] = {"final": layer_error(weight, result[n], hdiag), "hdiag": hdiag}
            hess = None  # K^2 floats per linear: free them before the next stage's (or GSQ's logits)
            if si + 1 < len(stages):
                for n in stage:
                    weight = block.get_submodule(n).weight.data
                    float_weights[n] = weight.clone()
                    weight.copy_(result[n].dequantize().to(weight.dtype))
        with torch.no_grad():  # GSQ and the errors below start from the float weights
            for n, w in float_weights.items():
                block.get_submodule(n).weight.data.copy_(w)
        float_weights = None
        if attention_first:
            # These outputs went through the quantized attention; GSQ's targets are the float block's.
            space.discard(targets)
            targets = float_targets
        if refine is not None and later:
            # GSQ backpropagates through this call, so it keeps gradients and takes any batch.
            forward = lambda inp: call_block(block, inp, pos_emb)  # noqa: E731
            k = s.gsq.nsamples or len(x)
            refined, blog = refine(block, forward, later, {n: result[n] for n in later}, x.first(k),
                                   targets.first(k), self.gsq_options, s.seed * 1_000_003 + i,
                                   held_out=self._held_out(x, targets))
            for n in later:
                if n in layer_errors:  # GSQ ran: keep the GPTQ init's error beside the result's
                    layer_errors[n]["init"] = layer_errors[n]["final"]
                    layer_errors[n]["final"] = layer_error(block.get_submodule(n).weight.data, refined[n],
                                                           layer_errors[n]["hdiag"])
            result.update(refined)
            if attention_logs:
                blog["attention"] = attention_logs  # q/k weight-space and v/o attention-output runs
            gsq_logs[prefix] = blog
        for e in layer_errors.values():
            e.pop("hdiag", None)
        with torch.no_grad():
            for n in names:
                block.get_submodule(n).weight.copy_(result[n].dequantize())
        return targets, run_block(block, x, pos_emb, s.batch_size, space.new("next-inputs"))

    def _held_out(self, x, targets):
        """GSQ's held-out (inputs, targets): the ``gsq_held_out`` sequences after those it trains on."""
        k, held = self.s.gsq.nsamples or len(x), self.s.gsq.held_out
        return (x.rows(k, k + held), targets.rows(k, k + held)) if held else None

    def _quantize_attention_first(self, block, names, x, pos_emb, space, result, refine, i):
        """The GSQ reference's attention (``attention_mode="reference"``): one float pass for the
        attention Hessians and the float block's outputs, then :meth:`gsq_attention`. Fills
        ``result`` for the attention linears; returns (GSQ logs, the float block's outputs)."""
        attn = [n for n in names if n in QK + VO]
        float_targets, hess, _ = run_block_with_hessians(block, attn, x, pos_emb, self.s.batch_size,
                                                         space.new("targets"))
        return self.gsq_attention(block, attn, hess, x, pos_emb, space, result, refine, i), float_targets

    def gsq_attention(self, block, attn, hess, x, pos_emb, space, result, refine, i) -> dict:
        """q/k from the start handler (GPTQ, or --init's codes), then GSQ on the Hessian-weighted weight error (no forward
        pass); v/o likewise, then GSQ on the attention output (float targets, q/k already
        quantized). ``block``'s attention must still be float; the quantized attention is left in
        it, so later Hessians (the MLP's) see it, as the reference takes them. Fills ``result``
        for ``attn``; returns the GSQ logs."""
        s = self.s
        seed = s.seed * 1_000_003 + i
        attn_targets = space.new("attention-targets")
        with torch.no_grad():
            for sl, xb in x.batches(s.batch_size):
                attn_targets[sl] = call_attention(block, xb, pos_emb)
        for n in attn:
            result[n] = self.start_codes(block.get_submodule(n).weight.data,
                                         disk_name(f"model.layers.{i}.{n}", self.arch), hess.get(n))
        logs = {}
        for n in (q for q in QK if q in attn):
            lin = block.get_submodule(n)
            result[n], logs[n] = refine_weight_space(lin.weight.data, hess[n], result[n], self.gsq_options, seed,
                                                     s.start.damp, self.gsq_options.batch_size * WEIGHT_SPACE_PIECES, n)
            with torch.no_grad():
                lin.weight.copy_(result[n].dequantize())
        vo = [n for n in VO if n in attn]
        if vo:
            forward = lambda inp: call_attention(block, inp, pos_emb)  # noqa: E731
            k = s.gsq.nsamples or len(x)
            refined, logs["v_o"] = refine(block, forward, vo, {n: result[n] for n in vo}, x.first(k),
                                          attn_targets.first(k), self.gsq_options, seed + 1,
                                          held_out=self._held_out(x, attn_targets))
            result.update(refined)
        space.discard(attn_targets)
        with torch.no_grad():
            for n in attn:
                block.get_submodule(n).weight.copy_(result[n].dequantize())
        return logs

    def _tune_end_to_end(self, ids: torch.Tensor) -> None:
        """quantize/e2e.py over the work folder's codes and scales; the new scales go to
        E2E_SCALES_FILE, which write_checkpoint reads in place of the blocks'. A resumed run
        that finds the file does not tune again."""
        from safetensors.torch import load_file

        from quantize.e2e import swap_in, teacher_hidden, tune_scales

        path = self.work_dir / E2E_SCALES_FILE
        if path.is_file():
            return
        dev = self.device
        # the teacher until its quantized linears are swapped in below
        student = load_float_model(self.model_dir, dev, self.arch, self.reader)
        with torch.device(dev):
            rotary = type(student.model.rotary_emb)(config=student.config)
        ids = ids.to(dev)
        options = self.s.e2e
        teacher = teacher_hidden(student, rotary, ids, options.batch_size)
        quantized = {}
        for i, names in enumerate(self.names):
            if not names:
                continue
            tensors = load_file(str(self.work_dir / f"block-{i:05d}.safetensors"))
            for n in names:
                full = f"model.layers.{i}.{n}"
                quantized[full] = swap_in(student, full, tensors[f"{n}.codes"].to(dev), tensors[f"{n}.scales"].to(dev))
        tuned = tune_scales(student, rotary, quantized, ids, teacher, options, seed=self.s.seed, log=self.log)
        atomic_save({disk_name(k, self.arch): v.cpu() for k, v in tuned.items()}, path)
        del teacher, student, quantized
        release_host_memory()

    def write_checkpoint(self) -> Path:
        """Assemble the final folder from the work folder's blocks and the original non-quantized tensors."""
        from safetensors.torch import load_file

        # prefix -> (block index, name in the block); one block's (or one expert's) codes in memory at a
        # time (the whole model's int8 codes would be a byte per weight: 70 GB for a 70B model).
        where = {disk_name(f"model.layers.{i}.{n}", self.arch): (i, n)
                 for i, names in enumerate(self.names) for n in names}
        loaded: dict = {"index": None, "tensors": None}
        e2e = self.work_dir / E2E_SCALES_FILE
        e2e_scales = load_file(str(e2e)) if e2e.is_file() else {}

        def codes_and_scales(prefix):
            i, n = where[prefix]
            ex = expert_of(n)
            f = (expert_file(self.work_dir, i, int(ex.rsplit(".", 1)[1])) if ex is not None and
                 sparse_experts(self.layers[i]) is not None else self.work_dir / f"block-{i:05d}.safetensors")
            if loaded["index"] != f:
                loaded["index"], loaded["tensors"] = f, load_file(str(f))
            return loaded["tensors"][f"{n}.codes"], e2e_scales.get(prefix, loaded["tensors"][f"{n}.scales"])

        base = dict(self.cfg)
        base.pop("quantization_config", None)
        writer = CheckpointWriter(self.out_dir, base_config=base, quant_config=self.qcfg)
        try:
            for name in sorted(self.reader.names()):
                prefix = name.rsplit(".", 1)[0]
                if prefix in where and name.endswith(".weight"):
                    writer.add_quantized(prefix, *codes_and_scales(prefix))
                else:
                    writer.add(name, self.reader.get(name))
            return writer.finish(tokenizer_dir=self.model_dir)
        except BaseException:
            writer.abort()
            raise
