"""Perplexity of SmolLM2-135M on held-out text: bf16 vs RTN / GPTQ / GSQ at 2, 3 bits and ternary,
MLP-only (attention kept bf16, like the reference's released checkpoints) and all linears.

Each configuration's checkpoint and result are cached under --out (one JSON per configuration),
so a rerun skips finished ones and resumes an interrupted quantization (the pipeline resumes per
block). Prints a table, writes results.json and quality.png.

    nice python -m benchmarks.quality --out runs/quality \
        --configs bf16 gptq-2-mlp gsq-2-mlp gptq-2-all gsq-2-all

Configuration names: bf16 | <rtn|gptq|gptqmse|gsq>-<2|3|1.58>-<mlp|all>[+e2e]. gptqmse is GPTQ with the
scale search used before the reference's (``--scale-search mse``), kept beside the current GPTQ
so a gain in the init is not mistaken for GSQ's. ``+e2e``: the end-to-end scale stage
(``quantize.e2e.tune_checkpoint``, --stage-epochs passes over the calibration sequences) applied to
the configuration's own checkpoint, so a method is compared with and without the stage on the
very same codes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from benchmarks.results_io import machine_info, write_json

ALL_CONFIGS = ["bf16"] + [f"{m}-{b}-{s}" for s in ("mlp", "all") for b in ("2", "3", "1.58")
                          for m in ("rtn", "gptqmse", "gptq", "gsq")]


EVAL_CORPORA = ("wikipedia", "owt")  # owt: a second held-out corpus, never calibrated or tuned on


def calib_and_eval_ids(model_dir: Path, nsamples: int, seqlen: int, eval_samples: int):
    """Token ids int64 [n, S]: calibration from wikipedia's calib split, and per corpus of
    EVAL_CORPORA evaluation windows from its eval split (disjoint from every calib split)."""
    from transformers import AutoTokenizer

    from quantize.data import load_split, tokenize_sequences

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    calib = tokenize_sequences(load_split("wikipedia", "calib"), tok, seqlen, nsamples)
    evals = {c: tokenize_sequences(load_split(c, "eval"), tok, seqlen, eval_samples) for c in EVAL_CORPORA}
    return calib, evals


def quantize_config(name, model_dir, calib, out: Path, args) -> tuple[Path, dict]:
    from quantize.cli import build_parser, settings_from_args
    from quantize.gsq import options_from_spec
    from quantize.pipeline import BlockPipeline

    method, bits, scope = name.split("-")
    search = "mse" if method == "gptqmse" else "gptq-ref"
    method = "gptq" if method == "gptqmse" else method
    # gsq-quantize's own settings for this configuration (its defaults for everything not named)
    argv = ["--model", str(model_dir), "--method", method, "--bits", bits, "--group-size", str(args.group_size),
            "--nsamples", str(calib.shape[0]), "--seqlen", str(calib.shape[1]), "--seed", "0",
            "--batch-size", "8", "--scale-search", search, "--e2e-epochs", str(args.e2e_epochs),
            "--act-order" if args.act_order else "--no-act-order",
            "--refit-scales" if args.refit_scales else "--no-refit-scales"]
    argv += ["--skip-attention"] if scope == "mlp" else []
    argv += ["--true-sequential"] if args.true_sequential else []
    argv += ["--gsq-nsamples", str(args.gsq_nsamples)] if method == "gsq" else []
    settings = settings_from_args(build_parser().parse_args(argv))
    if method == "gsq":
        settings.gsq.options = options_from_spec(args.gsq)
    ckpt = out / "ckpt" / name
    t0 = time.time()
    if not (ckpt / "config.json").is_file():
        pipe = BlockPipeline(model_dir, ckpt, settings)
        pipe.check()
        pipe.run(calib)
    return ckpt, {"quantize_s": round(time.time() - t0, 1)}


def stage_config(name, model_dir, calib, out: Path, args) -> tuple[Path, dict]:
    """``<base>+e2e``: the end-to-end stage on ``<base>``'s checkpoint (quantized first if missing)."""
    from quantize.e2e import E2EOptions, tune_checkpoint

    base = name.removesuffix("+e2e")
    base_ckpt, _ = quantize_config(base, model_dir, calib, out, args)
    ckpt = out / "ckpt" / name
    t0 = time.time()
    if not (ckpt / "config.json").is_file():
        options = E2EOptions(epochs=args.stage_epochs)  # the stage's own lr and batch, as gsq-quantize's
        tune_checkpoint(model_dir, base_ckpt, ckpt, calib, options, seed=0)
    return ckpt, {"stage_s": round(time.time() - t0, 1), "stage_epochs": args.stage_epochs}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--configs", nargs="+", default=ALL_CONFIGS)
    p.add_argument("--gsq", default="fast", metavar="SPEC",
                   help="GSQ's options: a preset and overrides, e.g. 'fast,epochs=2,lr_logits=2e-4' (quantize.gsq."
                        "options_from_spec)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (GPTQ's Hessians)")
    p.add_argument("--gsq-nsamples", type=int, default=32, help="of which GSQ trains on the first N")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=40)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ act-order, static groups (gsq-quantize's default)")
    p.add_argument("--true-sequential", action="store_true", help="GPTQ Hessians stage by stage")
    p.add_argument("--refit-scales", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ scales refitted by least squares on H (gsq-quantize's default)")
    p.add_argument("--e2e-epochs", type=int, default=0,
                   help="end-to-end scale tuning after the blocks (gsq-quantize --e2e-epochs; default 0: off)")
    p.add_argument("--stage-epochs", type=int, default=2, help="+e2e configurations: the stage's passes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see gsq-quantize --threads)")
    args = p.parse_args(argv)
    bad = [c for c in args.configs if c.removesuffix("+e2e") not in ALL_CONFIGS or c == "bf16+e2e"]
    if bad:
        raise SystemExit(f"unknown configuration(s) {bad}; choose from {ALL_CONFIGS}")
    torch.set_num_threads(max(1, args.threads))
    from quantize.evaluate import load_model, perplexity
    from quantize.models import prepare_default_model

    model_dir = prepare_default_model()
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    calib, evals = calib_and_eval_ids(model_dir, args.nsamples, args.seqlen, args.eval_samples)
    for name in args.configs:
        res_path = out / "results" / f"{name}.json"
        if res_path.is_file():
            continue
        info = {"config": name, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "gsq_nsamples": args.gsq_nsamples if name.startswith("gsq") else None,
                "eval_tokens": int(evals["wikipedia"].numel()), "group_size": args.group_size,
                "gsq": args.gsq if name.startswith("gsq") else None,
                "attention_quantized": name.removesuffix("+e2e").endswith("-all"),
                "act_order": args.act_order, "true_sequential": args.true_sequential,
                "refit_scales": args.refit_scales, "e2e_epochs": args.e2e_epochs}
        folder = model_dir
        if name.endswith("+e2e"):
            folder, extra = stage_config(name, model_dir, calib, out, args)
            info.update(extra)
        elif name != "bf16":
            folder, extra = quantize_config(name, model_dir, calib, out, args)
            info.update(extra)
        model = load_model(folder)[0]
        info["ppl"] = perplexity(model, evals["wikipedia"], progress=False)
        info["ppl_owt"] = perplexity(model, evals["owt"], progress=False)
        info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, res_path)
        print(f"[quality] {name}: ppl wikipedia {info['ppl']:.3f}, owt {info['ppl_owt']:.3f}", flush=True)
    rows = [json.loads((out / "results" / f"{c}.json").read_text())
            for c in ALL_CONFIGS + [f"{c}+e2e" for c in ALL_CONFIGS[1:]] if (out / "results" / f"{c}.json").is_file()]
    print(f"{'config':<16}{'attn q.':>8}{'ppl wiki':>14}{'ppl owt':>14}{'quant s':>9}")
    for r in rows:
        print(f"{r['config']:<16}{str(r['attention_quantized']):>8}{r['ppl']:>14.6g}{r.get('ppl_owt', float('nan')):>14.6g}"
              f"{r.get('quantize_s', 0):>9}")
    write_json({"machine": machine_info(), "rows": rows}, str(out / "results.json"))
    plot(rows, out / "quality.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["config"] for r in rows]
    colour = {"bf16": "gray", "rtn": "C3", "gptqmse": "C5", "gptq": "C1", "gsq": "C0"}
    ax.bar(names, [r["ppl"] for r in rows], color=[colour[n.split("-")[0]] for n in names])
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=m) for m, c in colour.items()], fontsize=8)
    ax.set_ylabel("perplexity (held-out wikipedia)")
    ax.set_yscale("log")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
