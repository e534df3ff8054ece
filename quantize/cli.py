"""``gsq-quantize``: quantize a HF causal-LM folder (or the embedded default) to a GSQ checkpoint.

Defaults (nsamples 16 x seqlen 256) keep a GPTQ run of SmolLM2-135M at a
few minutes on 2 CPU cores. Bad input -> one line on stderr, exit code 2,
no checkpoint folder at --out.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from dataclasses import asdict

from gsq_format.format import FormatError, normalize_bits
from quantize import gsq
from quantize.e2e import E2EOptions
from quantize.report import write_report
from quantize.settings import GSQSettings, MoESettings, QuantizeSettings, StartSettings


def add_gsq_arguments(parser: argparse.ArgumentParser) -> None:
    """GSQ options for `gsq-quantize --method gsq`. Explicit flags override the preset."""
    g = parser.add_argument_group("GSQ")
    g.add_argument("--preset", choices=sorted(gsq.PRESETS), default="paper",
                   help="paper: the reference's shipped configs (10 epochs, 64 sequences per step in micro-batches of 2, "
                        "lr logits 2e-4 / scales 1e-4, bf16 logits); steps256: 8 epochs of 4 sequences a step "
                        "(256 steps over 128 sequences), GPTQ's codes as the exact init, bf16 matmuls where native; "
                        "fast: CPU (2 epochs, 1 sequence per step, lr logits 3e-4 / scales 5e-5)")
    g.add_argument("--gsq-epochs", type=int, default=None)
    g.add_argument("--gsq-batch-size", type=int, default=None, help="sequences per Lion step")
    g.add_argument("--gsq-micro-batch-size", type=int, default=None,
                   help="sequences per forward/backward (gradients accumulate; memory only)")
    g.add_argument("--gsq-lr-logits", type=float, default=None)
    g.add_argument("--gsq-lr-scales", type=float, default=None)
    g.add_argument("--gsq-wd-logits", type=float, default=None)
    g.add_argument("--gsq-tau", type=float, nargs=2, default=None, metavar=("START", "END"))
    g.add_argument("--gsq-kappa", type=float, nargs=2, default=None, metavar=("START", "END"))
    g.add_argument("--gsq-init-noise", type=float, default=None, metavar="W",
                   help="weight of the N(0,1) term in the logit init (default 1, the reference's; 0 starts every "
                        "weight on its GPTQ code: the reference's init moves a few %% of the codes at random)")
    g.add_argument("--gsq-alpha", type=float, default=None,
                   help="logit init strength (default 6; 3 for --gsq-ternary-style ours)")
    g.add_argument("--gsq-ternary-style", choices=["ours", "reference"], default=None,
                   help="--bits 1.58: reference (default: the GSQ reference's sign/mask logits, prior +-6 on "
                        "both, 2*kappa*logit; SmolLM2 ternary MLP 294 vs 364) or ours (the 2-class quadratic "
                        "prior, strength 3)")
    g.add_argument("--logits-dtype", choices=["float32", "bfloat16", "bf16"], default=None,
                   help="dtype of the GSQ logits and their optimizer state (default float32; bf16 halves "
                        "the largest memory of a GPU run, as the reference does, at coarser Lion steps)")
    g.add_argument("--gsq-token-norm-cap", type=float, default=None, metavar="C",
                   help="weight a token whose float block output has more than C x the median squared norm by "
                        "C*median/norm^2 in GSQ's loss (and its held-out choice), so attention-sink tokens do not "
                        "make the whole loss (default: plain MSE, as the reference)")
    g.add_argument("--gsq-compute-dtype", choices=["float32", "bfloat16", "auto"], default=None,
                   help="the block's training matmuls: float32 (default), bfloat16 (autocast), or auto: bfloat16 "
                        "where the device has native bf16 matmuls (CUDA, AVX-512-BF16, AMX)")
    g.add_argument("--gsq-store-noise", action="store_true",
                   help="keep the Gumbel noise for backward instead of regenerating it")


def gsq_options_from_args(args) -> gsq.GSQOptions:
    """GSQOptions of the --preset with every explicit --gsq-* flag over it."""
    kw = dict(gsq.PRESETS[getattr(args, "preset", None) or "paper"])
    direct = {"gsq_epochs": "epochs", "gsq_batch_size": "batch_size", "gsq_micro_batch_size": "micro_batch_size",
              "gsq_lr_logits": "lr_logits", "gsq_lr_scales": "lr_scales",
              "gsq_wd_logits": "wd_logits", "gsq_alpha": "alpha", "gsq_init_noise": "init_noise"}
    for arg, field in direct.items():
        if getattr(args, arg, None) is not None:
            kw[field] = getattr(args, arg)
    if getattr(args, "gsq_tau", None) is not None:
        kw["tau_start"], kw["tau_end"] = args.gsq_tau
    if getattr(args, "gsq_kappa", None) is not None:
        kw["kappa_start"], kw["kappa_end"] = args.gsq_kappa
    if getattr(args, "logits_dtype", None) is not None:
        kw["logits_dtype"] = "bfloat16" if args.logits_dtype == "bf16" else args.logits_dtype
    if getattr(args, "gsq_compute_dtype", None) is not None:
        kw["compute_dtype"] = args.gsq_compute_dtype
    if getattr(args, "gsq_store_noise", False):
        kw["store_noise"] = True
    if getattr(args, "gsq_ternary_style", None) is not None:
        kw["ternary_style"] = args.gsq_ternary_style
    if getattr(args, "gsq_token_norm_cap", None) is not None:
        if args.gsq_token_norm_cap <= 0:
            raise FormatError("--gsq-token-norm-cap must be > 0")
        kw["token_norm_cap"] = args.gsq_token_norm_cap
    opts = gsq.GSQOptions(**kw)
    if opts.epochs < 1 or opts.batch_size < 1 or opts.micro_batch_size < 1:
        raise FormatError("--gsq-epochs, --gsq-batch-size and --gsq-micro-batch-size must be >= 1")
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gsq-quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model folder, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="checkpoint folder to write (not needed with --plan)")
    p.add_argument("--method", choices=["rtn", "gptq", "gsq"], default="gptq")
    p.add_argument("--bits", default="2", help="2, 3 or 1.58 (ternary)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--gsq-nsamples", type=int, default=None,
                   help="--method gsq: train GSQ on the first N calibration sequences only; GPTQ's Hessians use "
                        "all --nsamples (the reference takes its Hessians from a larger set than GSQ's tokens)")
    p.add_argument("--gsq-held-out", type=int, default=0, metavar="N",
                   help="--method gsq: score GSQ's init and each epoch's hardened codes on N calibration sequences "
                        "after the --gsq-nsamples it trains on, and keep the best (0, default: no held-out set; "
                        "the init is kept when the last epoch is worse on the training sequences)")
    p.add_argument("--gsq-ternary-init", choices=["gptq", "random"], default="gptq",
                   help="--method gsq --bits 1.58: start GSQ from GPTQ's ternary codes (default), or as the reference's "
                        "init_method random: GSQ from random logits on each linear's Hessian-weighted weight error "
                        "first (--gsq-ternary-init-steps steps), then GSQ on the block output from there")
    p.add_argument("--gsq-ternary-init-steps", type=int, default=2000, metavar="N",
                   help="steps of the random-init weight-space stage (default 2000, the reference's; each step sees "
                        "1/32 of the Hessian's rows)")
    p.add_argument("--attention-mode", choices=["joint", "reference"], default="joint",
                   help="--method gsq with attention quantized: joint (default: GSQ trains all linears on the "
                        "block output) or reference (the GSQ reference's: q/k GSQ on the Hessian-weighted weight "
                        "error, v/o GSQ on the attention output, MLP Hessians taken after attention is quantized)")
    p.add_argument("--moe-min-tokens", type=int, default=64,
                   help="MoE: an expert the router sends fewer calibration tokens than this is RTN-quantized "
                        "(named in the log and moe_rtn_experts.json)")
    p.add_argument("--moe-quantize-dense", action="store_true",
                   help="MoE models: also quantize the dense-MLP blocks (kept in float by default, as the GSQ "
                        "reference does); routers are never quantized")
    p.add_argument("--moe-quantize-shared", action="store_true",
                   help="MoE models with a shared expert (Qwen2-MoE): quantize it too, by GPTQ (kept in float by "
                        "default, as the GSQ reference does)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", default="wikipedia", help="corpus name (wikipedia, owt) or a .jsonl/.txt file")
    p.add_argument("--calib-chat", action="store_true",
                   help="wrap each calibration document in the model's chat template (instruct models)")
    p.add_argument("--skip-attention", action="store_true", help="keep attention linears unquantized")
    p.add_argument("--modules-to-not-convert", default="", help="comma-separated module names kept unquantized")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian damping (fraction of mean diagonal)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal, with each group's scale fixed "
                        "up front (static groups: the checkpoint needs no permutation). Default on")
    p.add_argument("--refit-scales", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: after rounding, re-choose each row's group scales for its codes by least "
                        "squares on the layer's Hessian-weighted error. Default on")
    p.add_argument("--true-sequential", action="store_true",
                   help="GPTQ: take each linear's Hessian with the linears before it in the block already "
                        "quantized (q/k/v, then o, then gate/up, then down), not all from the float block")
    p.add_argument("--scale-search", choices=["mse", "gptq-ref"], default="gptq-ref",
                   help="RTN/GPTQ group scales: gptq-ref (default; the GSQ reference's: 80 clip factors, "
                        "|error|^2.4, negative scales at 2 and 3 bits) or mse (41 positive clip factors, squared error)")
    p.add_argument("--e2e-epochs", type=int, default=0,
                   help="after every block is quantized, train all group scales together (codes fixed) on the "
                        "KL divergence from the float model's logits, for this many passes over the calibration "
                        "sequences (quantize/e2e.py; dense models; holds the float and the quantized model whole "
                        "on the device). Default 0: off")
    p.add_argument("--e2e-lr", type=float, default=2e-3, help="--e2e-epochs: Adam's learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init", default=None, metavar="FOLDER",
                   help="--method gsq: start from this quantized checkpoint's codes and scales instead of GPTQ "
                        "(GSQ, compressed-tensors pack-quantized or GPTQ format; refine in place)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when present), cpu, cuda or cuda:N: where blocks, activations, Hessians, "
                        "GPTQ and GSQ run; the model is streamed from disk one block at a time either way")
    p.add_argument("--activation-budget", type=float, default=None, metavar="GIB",
                   help="memory the calibration activations may take (three [nsamples, seqlen, hidden] float32 "
                        "tensors) before they move to files in the work folder (default: half of the free "
                        "device memory, or of the host's available memory on CPU)")
    p.add_argument("--plan", action="store_true",
                   help="print the peak device/host memory and disk this run would need (a model, from "
                        "config.json alone: --model may be a folder with only config.json) and exit")
    p.add_argument("--plan-json", default=None, metavar="FILE", help="with --plan: also write the plan as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads spin and run 10-20x slower)")
    p.add_argument("--work-dir", default=None, help="resume folder (default: .<out>.work next to --out)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-file", default=None, metavar="FILE",
                   help="progress lines are appended here too, time-stamped (default: <out>.log)")
    add_gsq_arguments(p)
    return p


def resolve_device(name: str):
    """``--device`` -> torch.device; FormatError for an unknown or absent device."""
    import re

    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise FormatError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise FormatError(f"--device {name}: torch sees no CUDA device here (use --device cpu)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise FormatError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def _print_plan(args, bits, excluded, gsq_options) -> int:
    import json
    import os
    from pathlib import Path

    from quantize.activations import default_budget
    from quantize.models import resolve_model
    from quantize.plan import PlanSettings, format_plan, make_plan, read_config

    folder = Path(args.model)
    cfg = read_config(resolve_model(args.model) if args.model == "default" else folder)
    if args.device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.activation_budget is not None:
        budget = int(args.activation_budget * 2**30)
    else:
        import torch

        budget = default_budget(torch.device("cpu")) if device == "cpu" else None
    opts = gsq_options
    ps = PlanSettings(method=args.method, bits=bits, group_size=args.group_size, nsamples=args.nsamples,
                      seqlen=args.seqlen, batch_size=args.batch_size, excluded=excluded, device=device,
                      gsq_micro_batch=min(opts.micro_batch_size, opts.batch_size) if opts else 1,
                      logits_bytes=2 if opts and opts.logits_dtype == "bfloat16" else 4,
                      activation_budget=budget, moe_quantize_dense=args.moe_quantize_dense,
                      moe_quantize_shared=args.moe_quantize_shared, e2e_epochs=args.e2e_epochs)
    plan = make_plan(cfg, ps)
    title = (f"gsq-quantize --plan: {args.model} ({(cfg.get('architectures') or ['?'])[0]}), {args.method} "
             f"{bits}-bit G{args.group_size}, {args.nsamples} x {args.seqlen} calibration tokens, on {device}"
             + (" (GPU activation budget: pass --activation-budget)" if device == "cuda" and budget is None else ""))
    print(format_plan(plan, title))
    if args.plan_json:
        out = Path(args.plan_json)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps({"settings": ps.__dict__, **plan.as_json()}, indent=2))
        os.replace(tmp, out)
    return 0


def gsq_steps_line(options: gsq.GSQOptions, sequences: int, preset: str) -> str:
    """What GSQ will do a block: its Lion steps depend on the training sequences, and a preset's
    regime (``steps256``: 256 steps of 4) holds only with as many sequences as it was measured with."""
    steps = gsq.lion_steps(options, sequences)
    line = (f"[gsq-quantize] GSQ: {sequences} training sequences, {steps} Lion steps of "
            f"{min(options.batch_size, sequences)} a block")
    if preset == "steps256" and steps < 256:
        line += (f"; --preset steps256 is measured with 256 steps: use --nsamples 128 (and --gsq-nsamples 128 "
                 f"or none) for its regime")
    return line


def progress_log(path):
    """A log function: each line to ``stream`` (stderr), and appended to ``path`` (None: nowhere
    else) with a time stamp, so a long run's progress can be followed without its terminal."""
    f = None
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", buffering=1, encoding="utf-8")

    def log(message: str, stream=None) -> None:
        print(message, file=stream or sys.stderr)
        if f is not None:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    return log


def settings_from_args(args) -> QuantizeSettings:
    """The run's settings from gsq-quantize's parsed arguments (the one place they are built);
    FormatError for values no stage can take."""
    bits = normalize_bits(args.bits)
    if args.nsamples < 1 or args.seqlen < 2:
        raise FormatError("--nsamples must be >= 1 and --seqlen >= 2")
    if args.gsq_nsamples is not None and not 1 <= args.gsq_nsamples <= args.nsamples:
        raise FormatError(f"--gsq-nsamples must be between 1 and --nsamples ({args.nsamples})")
    if args.gsq_held_out < 0 or (args.gsq_held_out and (args.gsq_nsamples or args.nsamples) + args.gsq_held_out
                                 > args.nsamples):
        raise FormatError(f"--gsq-held-out must be >= 0 and fit after --gsq-nsamples within --nsamples "
                          f"({args.gsq_nsamples or args.nsamples} + {args.gsq_held_out} > {args.nsamples})")
    if args.gsq_ternary_init == "random" and (args.method != "gsq" or bits != 1.58 or args.init):
        raise FormatError("--gsq-ternary-init random needs --method gsq --bits 1.58 and no --init")
    if args.gsq_ternary_init_steps < 1:
        raise FormatError("--gsq-ternary-init-steps must be >= 1")
    if args.moe_min_tokens < 0:
        raise FormatError("--moe-min-tokens must be >= 0")
    excluded = [m.strip() for m in args.modules_to_not_convert.split(",") if m.strip()]
    if args.skip_attention:
        excluded.append("self_attn")
    return QuantizeSettings(
        method=args.method, bits=bits, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, modules_to_not_convert=excluded, batch_size=args.batch_size,
        start=StartSettings(damp=args.damp, act_order=args.act_order, refit_scales=args.refit_scales,
                            true_sequential=args.true_sequential, scale_search=args.scale_search),
        gsq=GSQSettings(options=gsq_options_from_args(args) if args.method == "gsq" else gsq.GSQOptions(),
                        nsamples=args.gsq_nsamples, held_out=args.gsq_held_out, init=args.init,
                        ternary_init=args.gsq_ternary_init, ternary_init_steps=args.gsq_ternary_init_steps,
                        attention_mode=args.attention_mode),
        moe=MoESettings(min_tokens=args.moe_min_tokens, quantize_dense=args.moe_quantize_dense,
                        quantize_shared=args.moe_quantize_shared),
        e2e=E2EOptions(epochs=args.e2e_epochs, lr=args.e2e_lr),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from quantize.data import DataError, load_split, tokenize_sequences
    from quantize.models import resolve_model
    from quantize.pipeline import BlockPipeline

    t0 = time.time()
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        settings = settings_from_args(args)
        bits, excluded = settings.bits, settings.modules_to_not_convert
        gsq_options = settings.gsq.options if args.method == "gsq" else None
        if args.activation_budget is not None and args.activation_budget < 0:
            raise FormatError("--activation-budget must be >= 0")
        if args.plan:
            return _print_plan(args, bits, excluded, gsq_options)
        if not args.out:
            raise FormatError("--out is required (except with --plan)")
        device = resolve_device(args.device)
        model_dir = resolve_model(args.model)
        log = progress_log(args.log_file or f"{str(args.out).rstrip('/')}.log")
        pipe = BlockPipeline(model_dir, args.out, settings, work_dir=args.work_dir, log=log, device=device,
                             activation_budget=None if args.activation_budget is None
                             else int(args.activation_budget * 2**30))
        pipe.check()
        if gsq_options is not None:
            log(gsq_steps_line(gsq_options, args.gsq_nsamples or args.nsamples, args.preset))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = tokenize_sequences(load_split(args.calib, "calib"), tok, args.seqlen, args.nsamples,
                                 chat=args.calib_chat)
        out = pipe.run(ids, resume=args.resume)
    except (FormatError, DataError, OSError) as e:
        print(f"gsq-quantize: error: {e}", file=sys.stderr)
        return 2
    from gsq_format.format import checkpoint_bits_per_weight

    bpw, n = checkpoint_bits_per_weight(out)
    report = write_report(out, {
        "model": str(model_dir), "settings": settings.record(),
        "gsq_options": asdict(gsq_options) if gsq_options else None, "device": str(device),
        "wall_s": time.time() - t0, "bits_per_weight": bpw, "quantized_weights": n,
        # ru_maxrss is KiB on Linux: the whole process's peak, this run included
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "blocks": pipe.report_blocks, "gsq_logs": pipe.gsq_logs,
    })
    log(f"gsq-quantize: wrote {out} ({args.method}, {bits}-bit, G={args.group_size}, "
        f"{bpw:.3f} bits/weight over {n} quantized weights) in {time.time() - t0:.1f} s; report: {report}",
        stream=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
