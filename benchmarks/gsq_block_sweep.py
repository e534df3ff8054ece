"""GSQ's scaling curve on a few blocks of SmolLM2-135M: held-out block-output error of GSQ
relative to its GPTQ init, as a function of the training regime.

Every setting refines the same init (the pipeline's GPTQ: act-order, refit scales, the
reference's scale search, on a Hessian of --gptq-nsamples x 256 wikipedia tokens) of the same
block's linears; the block's inputs come from the float model's earlier blocks, so the numbers
compare regimes, not pipelines. GSQ trains on wikipedia calibration text *after* the GPTQ set
(disjoint from it; past ~90k tokens, owt's calibration text follows) and is scored on --held-out windows of --held-out-seqlen tokens from the
wikipedia evaluation split (disjoint from both). Per setting it reports the hard block-output MSE
relative to the init, plain (the loss GSQ minimises) and with attention-sink tokens capped
(``token_weights`` with C = 20: a token of more than 20x the median squared norm counts with its
relative error), each also after re-fitting the group scales to the hardened codes on the GPTQ
Hessian (``refit``).

    python -m benchmarks.gsq_block_sweep --bits 2 --blocks 3,15 \\
        --setting init --setting "fast,tokens=8192" --setting "fast,tokens=131072,batch_size=16"

A setting is a GSQ preset name (or ``init``: the argmax of the initial logits, zero steps) and
comma-separated overrides: any GSQOptions field, plus ``tokens`` (GSQ training tokens, default
8192) and ``seqlen`` (its window length, default 256). Prints a table per block and a summary,
writes --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import torch

SINK_CAP = 20.0
EXTRA_KEYS = {"tokens": 8192, "seqlen": 256}


def parse_setting(text: str) -> tuple[object, dict]:
    """(GSQOptions, {tokens, seqlen}) of one setting string; SystemExit on a bad one."""
    from dataclasses import replace

    from gsq_format.format import FormatError
    from quantize.gsq import options_from_spec

    preset, *overrides = text.split(",")
    extra = dict(EXTRA_KEYS)
    for item in [o for o in overrides if o.partition("=")[0] in extra]:
        extra[item.partition("=")[0]] = int(item.partition("=")[2])
    rest = [o for o in overrides if o.partition("=")[0] not in extra]
    try:  # "init": the init of float32 logits (as the fast preset has them), hardened after zero steps
        opts = options_from_spec(",".join(["fast" if preset == "init" else preset, *rest]))
    except FormatError as e:
        raise SystemExit(f"setting {text!r}: {e}") from None
    if extra["tokens"] % extra["seqlen"]:
        raise SystemExit(f"tokens must be a multiple of seqlen in setting {text!r}")
    # keep_best off: measure the method itself, not the safeguard
    return replace(opts, keep_best=False, epochs=0 if preset == "init" else opts.epochs), extra


def block_mse(block, names, weights, call, x, targets, cap_median=None) -> float:
    """Hard block-output MSE with ``weights``; with ``cap_median`` sink tokens are capped."""
    from quantize.gsq import _block_loss

    cap = SINK_CAP if cap_median is not None else None
    with torch.no_grad():
        for n in names:
            block.get_submodule(n).weight.copy_(weights[n].dequantize())
        total = sum(_block_loss(call(x[i:i + 4]), targets[i:i + 4], cap, cap_median or 0.0).item()
                    for i in range(0, x.shape[0], 4))
    return total / targets.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="2")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--blocks", default="3", help="comma-separated block indices")
    p.add_argument("--scope", choices=["mlp", "all"], default="mlp")
    p.add_argument("--gptq-nsamples", type=int, default=128, help="256-token windows of GPTQ's Hessian set")
    p.add_argument("--held-out", type=int, default=32, help="held-out windows")
    p.add_argument("--held-out-seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", action="append", default=None)
    p.add_argument("--json", default="runs/gsq_block_sweep.json")
    args = p.parse_args(argv)
    settings = args.setting or ["init", "fast"]
    parsed = {s: parse_setting(s) for s in settings}
    blocks = sorted(int(b) for b in args.blocks.split(","))
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from gsq_format.format import normalize_bits
    from quantize.activations import Activations
    from quantize.block_forward import call_block, run_block_with_hessians
    from quantize.data import load_split, tokenize_sequences
    from quantize.gptq import gptq_quantize, refit_scales
    from quantize.gsq import _median_token_norm2, hardened_init, lion_steps, refine_block
    from quantize.models import WeightReader, build_skeleton, prepare_default_model
    from quantize.pipeline import block_linears
    from quantize.settings import StartSettings
    from benchmarks.results_io import machine_info, write_json

XX
    bits = normalize_bits(args.bits)
    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream = tokenize_sequences(load_split("wikipedia", "calib"), tok, 64, None).flatten()
    gptq_tokens = args.gptq_nsamples * 256
    # GSQ's text: wikipedia's calibration text after GPTQ's (disjoint from it), then owt's
    # calibration split (the installed corpora hold ~123k natural tokens each)
    pool = torch.cat([stream[gptq_tokens:], tokenize_sequences(load_split("owt", "calib"), tok, 64, None).flatten()])
    need = max(e["tokens"] for _, e in parsed.values())
    if need > len(pool):
        raise SystemExit(f"the calibration text holds {len(pool)} tokens after GPTQ's {gptq_tokens}; "
                         f"a setting asks for {need}")
    seqlens = sorted({e["seqlen"] for _, e in parsed.values()})
    ids = {"gptq": stream[:gptq_tokens].view(-1, 256),
           "held": tokenize_sequences(load_split("wikipedia", "eval"), tok, args.held_out_seqlen, args.held_out)}
    for s in seqlens:
        n = max(e["tokens"] for _, e in parsed.values() if e["seqlen"] == s) // s
        ids[f"train{s}"] = pool[:n * s].view(n, s)
    print(f"tokens: GPTQ {gptq_tokens}, GSQ pool {len(pool)} (using up to {need}), held-out "
          f"{args.held_out} x {args.held_out_seqlen}; blocks {blocks}; {args.threads} threads", flush=True)

    model = build_skeleton(model_dir)
    reader = WeightReader(model_dir)
    emb = reader.get("model.embed_tokens.weight").float()
    rotary = type(model.model.rotary_emb)(config=model.config)
    pos = {}

    def pos_emb(seqlen):
        if seqlen not in pos:
            pos[seqlen] = rotary(emb[:1].unsqueeze(0), torch.arange(seqlen).unsqueeze(0))
        return pos[seqlen]

    def forward_all(layer, x):
        with torch.no_grad():
            return torch.cat([call_block(layer, x[j:j + 8], pos_emb(x.shape[1])) for j in range(0, len(x), 8)])

    xs = {k: emb[v] for k, v in ids.items()}  # float inputs of the current block, f32 [n, S, H]
    done = 0
    rows = []
    t_start = time.time()
    for b in blocks:
        for i in range(done, b):  # the float model's blocks before b
            layer = reader.load_into(model.model.layers[i], f"model.layers.{i}").eval()
            xs = {k: forward_all(layer, x) for k, x in xs.items()}
            model.model.layers[i].to("meta")
        block = reader.load_into(model.model.layers[b], f"model.layers.{b}").eval()
        names = block_linears(block, ["self_attn"] if args.scope == "mlp" else [], f"model.layers.{b}")
        orig = {n: block.get_submodule(n).weight.detach().clone() for n in names}
        x_gptq = Activations(tuple(xs["gptq"].shape), "cpu")
        x_gptq[0:len(x_gptq)] = xs["gptq"]
        _, hess, _ = run_block_with_hessians(block, names, x_gptq, pos_emb(256), 8, None)
        init = {}
        for n in names:
            q = gptq_quantize(orig[n], hess[n], bits, args.group_size, damp=defaults.damp,
                              act_order=defaults.act_order, scale_search=defaults.scale_search)
            init[n] = refit_scales(orig[n], hess[n], q, damp=defaults.damp) if defaults.refit_scales else q
        tgt = {k: forward_all(block, x) for k, x in xs.items()}  # the float block's outputs
        call_h = lambda inp: call_block(block, inp, pos_emb(args.held_out_seqlen))  # noqa: E731
        med = _median_token_norm2(tgt["held"], 8)

        def score(weights):
            out = {"held": block_mse(block, names, weights, call_h, xs["held"], tgt["held"]),
                   "held_capped": block_mse(block, names, weights, call_h, xs["held"], tgt["held"], med)}
            refit = {n: refit_scales(orig[n], hess[n], weights[n], damp=defaults.damp) for n in names}
            out["held_refit"] = block_mse(block, names, refit, call_h, xs["held"], tgt["held"])
            out["held_capped_refit"] = block_mse(block, names, refit, call_h, xs["held"], tgt["held"], med)
            return out

        base = score(init)
        row = {"block": b, "init": base, "settings": {}}
        rows.append(row)
        print(f"\nblock {b}: init (GPTQ) held-out MSE {base['held']:.4e}, sink-capped {base['held_capped']:.4e}",
              flush=True)
        print(f"  {'setting':<52}{'steps':>6}{'train':>8}{'held':>8}{'capped':>8}{'+refit':>8}{'cap+ref':>8}{'s':>7}")
        for text, (opts, extra) in parsed.items():
            s = extra["seqlen"]
            n_seqs = extra["tokens"] // s
            x, t = xs[f"train{s}"][:n_seqs], tgt[f"train{s}"][:n_seqs]
            call = lambda inp, s=s: call_block(block, inp, pos_emb(s))  # noqa: E731
            with torch.no_grad():
                for n in names:
                    block.get_submodule(n).weight.copy_(orig[n])
            seed = args.seed * 1_000_003 + b
            t0 = time.time()
            if opts.epochs == 0:
                refined, steps = hardened_init(block, names, init, opts, seed), 0
            else:
                refined, _ = refine_block(block, call, names, init, x, t, opts, seed=seed)
                steps = lion_steps(opts, n_seqs)
            secs = time.time() - t0
            sc = score(refined)
            sc["train"] = block_mse(block, names, refined, call, x, t)
            rel = {k: v / base[k] for k, v in sc.items() if k in base}
            rel["train"] = sc["train"] / block_mse(block, names, init, call, x, t)
            row["settings"][text] = {"tokens": extra["tokens"], "seqlen": s, "steps": steps,
                                     "token_passes": opts.epochs * extra["tokens"],
                                     "seconds": secs, "mse": sc, "rel": rel}
            print(f"  {text:<52}{steps:>6}{rel['train']:>8.3f}{rel['held']:>8.3f}{rel['held_capped']:>8.3f}"
                  f"{rel['held_refit']:>8.3f}{rel['held_capped_refit']:>8.3f}{secs:>7.0f}", flush=True)
            write_json({"model": "SmolLM2-135M-Instruct", "machine": machine_info(), "args": vars(args),
                        "blocks": rows, "sink_cap": SINK_CAP, "seconds": time.time() - t_start}, args.json)
        with torch.no_grad():
            for n in names:
                block.get_submodule(n).weight.copy_(orig[n])
        model.model.layers[b].to("meta")
        xs, hess, done = tgt, None, b + 1  # the next block's inputs are this float block's outputs

    print(f"\n{'setting':<52}{'held':>8}{'capped':>8}{'+refit':>8}{'cap+ref':>8}   "
          f"geometric mean over blocks {blocks} (x init; < 1 is better)")
    for text in settings:
        if any(text not in r["settings"] for r in rows):
            continue
        gm = lambda key: math.exp(sum(math.log(r["settings"][text]["rel"][key]) for r in rows) / len(rows))  # noqa: E731
        print(f"{text:<52}{gm('held'):>8.3f}{gm('held_capped'):>8.3f}{gm('held_refit'):>8.3f}"
              f"{gm('held_capped_refit'):>8.3f}")


if __name__ == "__main__":
    main()
