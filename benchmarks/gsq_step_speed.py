"""What GSQ costs a block on the CPU: the fused kernels (csrc/quantize/{gsq_soft,lion}.cpp) vs the
torch formulas with torch's generator and lion_pytorch's update (GSQ_SOFT_KERNEL=torch).

Runs `refine_block` on SmolLM2-135M's block 0 with random calibration-shaped inputs (the cost does
not depend on the values) in a preset's regime (default `steps256`, the main job's: 4 sequences of
256 tokens a Lion step), twice: one epoch and two epochs over the preset's sequences. The difference
is the cost of the extra epoch's steps (-> ms a step); the rest is the fixed cost a block pays once
(the logits' init, the hard scoring of the init and of the last epoch). Projected: a block's GSQ
time in the preset's regime, `lion_steps` x ms a step + the fixed cost. Each variant runs in its
own process. Prints a table, writes JSON.

    python -m benchmarks.gsq_step_speed --out benchmarks/results/gsq_step_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.results_io import RESULTS, add_common_args, machine_line, write_json

ROOT = Path(__file__).resolve().parent.parent
CASES = [("3", "mlp"), ("2", "mlp"), ("1.58", "mlp"), ("3", "all")]


def measure(bits: str, scope: str, preset: str, sequences: int, group_size: int, threads: int) -> dict:
    import torch

    from quantize.block_forward import call_block
    from quantize.gsq import _CPU_EXT, lion_steps, options_from_spec, refine_block
    from quantize.models import WeightReader, build_skeleton, prepare_default_model
    from quantize.pipeline import block_linears
    from quantize.rtn import rtn_quantize

    torch.set_num_threads(threads)
    model_dir = prepare_default_model()
    model = build_skeleton(model_dir)
    block = WeightReader(model_dir).load_into(model.model.layers[0], "model.layers.0").eval()
    names = block_linears(block, ["self_attn"] if scope == "mlp" else [], "model.layers.0")
    b = float(bits) if "." in bits else int(bits)
    init = {n: rtn_quantize(block.get_submodule(n).weight.data, b, group_size) for n in names}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sequences, 256, model.config.hidden_size, generator=g)
    with torch.device("cpu"):
        rotary = type(model.model.rotary_emb)(config=model.config)
    pos_emb = rotary(x[:1], torch.arange(256).unsqueeze(0))
    with torch.no_grad():
        y = call_block(block, x, pos_emb)
    options = options_from_spec(preset)
    seconds = {}
    for epochs in (1, 2):
        opts = replace(options, epochs=epochs, keep_best=False)
        t0 = time.perf_counter()
        refine_block(block, lambda inp: call_block(block, inp, pos_emb), names, init, x, y, opts, seed=0)
        seconds[epochs] = time.perf_counter() - t0
    epoch_steps = lion_steps(replace(options, epochs=1), sequences)
    per_step = (seconds[2] - seconds[1]) / epoch_steps
    fixed = seconds[1] - epoch_steps * per_step
    block_steps = lion_steps(options, sequences)
    return {"ms_per_step": 1e3 * per_step, "fixed_s": fixed, "block_steps": block_steps,
            "block_s": block_steps * per_step + fixed, "seconds": seconds, "fused": _CPU_EXT is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="steps256", help="GSQ preset spec, as gsq-quantize's (default steps256)")
    ap.add_argument("--sequences", type=int, default=128, help="training sequences of 256 tokens (default 128, "
                    "the main job's --gsq-nsamples)")
    ap.add_argument("--group-size", type=int, default=32, help="default 32, the main job's")
    add_common_args(ap, str(RESULTS / "gsq_step_speed.json"), flag="--out", threads=2)
    ap.add_argument("--one", nargs=2, metavar=("BITS", "SCOPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.preset, args.sequences, args.group_size, args.threads)))
        return 0
    rows = []
    for bits, scope in CASES:
        row = {"bits": bits, "quantized": scope}
        for variant, env in (("torch", "torch"), ("fused", "auto")):
            p = subprocess.run([sys.executable, "-m", "benchmarks.gsq_step_speed", "--one", bits, scope,
                                "--preset", args.preset, "--sequences", str(args.sequences),
                                "--group-size", str(args.group_size), "--threads", str(args.threads)],
                               env=dict(os.environ, GSQ_SOFT_KERNEL=env, PYTHONPATH=str(ROOT)),
                               capture_output=True, text=True, check=True, cwd=ROOT)
            row[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        row["speedup"] = row["torch"]["block_s"] / row["fused"]["block_s"]
        rows.append(row)
        print(f"{bits:>5}-bit {scope:<4} ms a step: torch {row['torch']['ms_per_step']:6.1f}  fused "
              f"{row['fused']['ms_per_step']:6.1f}   a block ({row['fused']['block_steps']} steps + fixed): "
              f"torch {row['torch']['block_s']:5.1f} s  fused {row['fused']['block_s']:5.1f} s  "
              f"x{row['speedup']:.2f}", flush=True)
    write_json({"machine": machine_line(), "preset": args.preset, "sequences": args.sequences,
                "group_size": args.group_size, "threads": args.threads,
                "note": "SmolLM2-135M block 0, random inputs of 256 tokens, RTN init; block_s = steps x "
                        "ms_per_step + fixed_s (init + two hard scorings)", "rows": rows}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
