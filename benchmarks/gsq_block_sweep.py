"""Tune GSQ on a few blocks of SmolLM2-135M: block-output MSE of GSQ settings relative to GPTQ,
on the calibration inputs and on held-out inputs.

A full quality run takes 10+ minutes per configuration on 2 CPU cores; this runs only the first
--blocks blocks. Every setting refines the same GPTQ init on the same inputs (the blocks are
propagated with the GPTQ weights), so the numbers compare settings, not pipelines. The held-out
column is the one that predicts perplexity: a setting that only wins on calibration overfits.

    PYTHONPATH=. python benchmarks/gsq_block_sweep.py --bits 2 --blocks 3 \
        --setting fast --setting "fast,batch_size=1,lr_logits=1e-3"

A setting is a preset name followed by comma-separated GSQOptions overrides. Prints a table,
writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import fields

import torch


def parse_setting(text: str):
    from quantize.gsq import PRESETS, GSQOptions

    preset, *overrides = text.split(",")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} in setting {text!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    types = {f.name: f.type for f in fields(GSQOptions)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"unknown GSQ option {key!r} in setting {text!r}")
        kw[key] = int(value) if key in ("epochs", "batch_size", "micro_batch_size") else float(value)
    kw["keep_best"] = False  # measure the method itself, not the safeguard
    return GSQOptions(**kw)


def _acts(t: torch.Tensor):
    """A float32 ``[n, S, H]`` tensor as the pipeline's in-memory Activations."""
    from quantize.activations import Activations

    a = Activations(tuple(t.shape), t.device)
    a[0:len(t)] = t
    return a


def hard_mse(block, names, weights, call, x, targets) -> float:
    with torch.no_grad():
        for n in names:
            block.get_submodule(n).weight.copy_(weights[n].dequantize())
        return sum(torch.nn.functional.mse_loss(call(x[i:i + 4]), targets[i:i + 4], reduction="sum").item()
                   for i in range(0, x.shape[0], 4)) / targets.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--scope", choices=["mlp", "all"], default="mlp")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--setting", action="append", default=None)
    p.add_argument("--json", default="runs/gsq_block_sweep.json")
    args = p.parse_args(argv)
    settings = args.setting or ["fast"]
    opts = {s: parse_setting(s) for s in settings}
    torch.set_num_threads(1)

    from transformers import AutoTokenizer

    from gsq_vllm.format import normalize_bits
    from quantize.data import load_split, tokenize_sequences
    from quantize.gptq import gptq_quantize
    from quantize.gsq import refine_block
    from quantize.models import WeightReader, build_skeleton, prepare_default_model
    from quantize.activations import Activations
    from quantize.block_forward import call_block, run_block, run_block_with_hessians
    from quantize.pipeline import block_linears

    bits = normalize_bits(args.bits)
    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    calib = tokenize_sequences(load_split("wikipedia", "calib"), tok, args.seqlen, args.nsamples)
    held = tokenize_sequences(load_split("wikipedia", "eval"), tok, args.seqlen, args.eval_samples)
    model = build_skeleton(model_dir)
    reader = WeightReader(model_dir)
    emb = reader.get("model.embed_tokens.weight").float()
    x, xh = emb[calib], emb[held]
    rotary = type(model.model.rotary_emb)(config=model.config)
    pos_emb = rotary(x[:1], torch.arange(args.seqlen).unsqueeze(0))
    excluded = ["self_attn"] if args.scope == "mlp" else []

    rows = []
    for i in range(args.blocks):
        block = reader.load_into(model.model.layers[i], f"model.layers.{i}").eval()
        names = block_linears(block, excluded, f"model.layers.{i}")
        orig = {n: block.get_submodule(n).weight.detach().clone() for n in names}
        targets, hess, _ = run_block_with_hessians(block, names, _acts(x), pos_emb, 4, Activations(x.shape, "cpu"))
        targets, targets_h = targets.data, run_block(block, _acts(xh), pos_emb, 4, Activations(xh.shape, "cpu")).data
        call = lambda inp: call_block(block, inp, pos_emb)  # noqa: E731
        gptq = {n: gptq_quantize(orig[n], hess[n], bits, args.group_size) for n in names}
        base_c = hard_mse(block, names, gptq, call, x, targets)
        base_h = hard_mse(block, names, gptq, call, xh, targets_h)
        row = {"block": i, "gptq_calib": base_c, "gptq_heldout": base_h, "settings": {}}
        print(f"block {i}: GPTQ block MSE calib {base_c:.4e} held-out {base_h:.4e}", flush=True)
        for name, o in opts.items():
            with torch.no_grad():
                for n in names:
                    block.get_submodule(n).weight.copy_(orig[n])
            t0 = time.time()
            refined, _ = refine_block(block, call, names, gptq, x, targets, o, seed=1000 + i)
            c = hard_mse(block, names, refined, call, x, targets)
            h = hard_mse(block, names, refined, call, xh, targets_h)
            row["settings"][name] = {"calib_rel": c / base_c, "heldout_rel": h / base_h, "seconds": time.time() - t0}
            print(f"  {name:<48} calib x{c / base_c:.3f}  held-out x{h / base_h:.3f}  ({time.time() - t0:.0f} s)",
                  flush=True)
        # propagate with the GPTQ weights so every setting sees the same inputs in the next block
        with torch.no_grad():
            for n in names:
                block.get_submodule(n).weight.copy_(gptq[n].dequantize())
        x, xh = (run_block(block, _acts(t), pos_emb, 4, Activations(t.shape, "cpu")).data for t in (x, xh))
        model.model.layers[i].to("meta")
        rows.append(row)

    print(f"\n{'setting':<48}{'calib (x GPTQ)':>16}{'held-out (x GPTQ)':>19}   geometric mean over {args.blocks} blocks")
    for name in settings:
        gm = lambda key: float(torch.tensor([r["settings"][name][key] for r in rows]).log().mean().exp())  # noqa: E731
        print(f"{name:<48}{gm('calib_rel'):>16.3f}{gm('heldout_rel'):>19.3f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": vars(args), "blocks": rows}, f, indent=2)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
