"""Ternary starting points, in the GSQ reference's own weight-space objective: GPTQ's ternary codes
against its ``init_method: random`` pre-stage (GSQ from strength-0 logits on tr(dW H dW^T),
``gsq-quantize --gsq-ternary-init random``), per MLP linear of SmolLM2-135M's first blocks.

A whole-model perplexity comparison needs the pre-stage on all 90 MLP linears: at 2000 steps
(the reference's) that is 1-2 h on 2 CPU cores, so this measures the start each gives GSQ, on the
loss the pre-stage minimises, block by block with the float model's inputs:

    python -m benchmarks.ternary_init --blocks 1 --steps 400 2000 --pieces 32 1

Prints a table (weighted error relative to GPTQ's: below 1 means the random pre-stage starts GSQ
from a better point) and writes --json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.results_io import add_common_args, machine_info, write_json


def weighted_error(w: torch.Tensor, q, hess: torch.Tensor, damp: float) -> float:
    dw = w - q.dequantize()
    h = hess + damp * hess.diagonal().mean() * torch.eye(hess.shape[0])
    return float(torch.einsum("nk,kj,nj->", dw, h, dw))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, nargs="+", default=[400])
    p.add_argument("--pieces", type=int, nargs="+", default=[32],
                   help="mini-batches of L^T's rows per pass: 32 is gsq-quantize's, 1 the reference's full batch")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--damp", type=float, default=0.01)
    add_common_args(p, "benchmarks/results/ternary_init.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoTokenizer

    from quantize.activations import Activations
    from quantize.block_forward import run_block_with_hessians
    from quantize.data import load_split, tokenize_sequences
    from quantize.gptq import gptq_quantize
    from quantize.gsq import PRESETS, GSQOptions
    from quantize.models import WeightReader, build_skeleton, prepare_default_model
    from quantize.gsq import refine_weight_space, ternary_random_options
    from quantize.rtn import rtn_quantize

    model_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenize_sequences(load_split("wikipedia", "calib"), tok, args.seqlen, args.nsamples)
    model = build_skeleton(model_dir)
    reader = WeightReader(model_dir)
    x = reader.get("model.embed_tokens.weight").float()[ids]
    rotary = type(model.model.rotary_emb)(config=model.config)
    pos_emb = rotary(x[:1], torch.arange(args.seqlen).unsqueeze(0))
    opts = GSQOptions(**{**PRESETS["fast"], "keep_best": False})  # the pre-stage itself, not the RTN safeguard
    names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    rows = []
    runs = [(s, pc) for pc in args.pieces for s in args.steps]
    print(f"{'layer':<28}{'GPTQ':>12}" + "".join(f"{f'random {s}/{pc}':>16}" for s, pc in runs) + f"{'RTN':>10}")
    for i in range(args.blocks):
        block = reader.load_into(model.model.layers[i], f"model.layers.{i}").eval()
        xa = Activations(tuple(x.shape), "cpu")
        xa[0:len(x)] = x
        out, hess, _ = run_block_with_hessians(block, names, xa, pos_emb, 4, Activations(tuple(x.shape), "cpu"))
        for n in names:
            w = block.get_submodule(n).weight.detach().float()
            gptq = gptq_quantize(w, hess[n], 1.58, args.group_size, damp=args.damp)
            base = weighted_error(w, gptq, hess[n], args.damp)
            row = {"layer": f"model.layers.{i}.{n}", "gptq": base,
                   "rtn": weighted_error(w, rtn_quantize(w, 1.58, args.group_size), hess[n], args.damp) / base}
            for steps, pieces in runs:
                t0 = time.time()
                start = rtn_quantize(w, 1.58, args.group_size)
                q, _ = refine_weight_space(w, hess[n], start, ternary_random_options(opts, steps, pieces), 1000 + i,
                                           args.damp, pieces)
                key = f"random_{steps}_p{pieces}"
                row[key] = weighted_error(w, q, hess[n], args.damp) / base  # RTN's codes are not its start
                row[key + "_s"] = time.time() - t0
            rows.append(row)
            print(f"{row['layer']:<28}{base:>12.4g}" + "".join(
                f"{row[f'random_{s}_p{pc}']:>10.3f}x {row[f'random_{s}_p{pc}_s']:>3.0f}s" for s, pc in runs)
                + f"{row['rtn']:>9.3f}x", flush=True)
        x = out.data.clone()  # the float block's outputs are the next block's inputs
        model.model.layers[i].to("meta")
    gm = {f"{s}_p{pc}": float(torch.tensor([r[f"random_{s}_p{pc}"] for r in rows]).log().mean().exp())
          for s, pc in runs}
    print("geometric mean, random / GPTQ (steps_p<pieces>): " + ", ".join(f"{k} {v:.3f}x" for k, v in gm.items()))
    write_json({"machine": machine_info(torch=torch.__version__), "args": vars(args), "rows": rows,
                "geomean_random_over_gptq": gm}, args.json)


if __name__ == "__main__":
    main()
