"""GSQ optimisation steps per second on the CPU: fused kernels (csrc/quantize/gsq_soft.cpp) vs
the torch formulas with torch's generator (GSQ_SOFT_KERNEL=torch, the path before them).

Times `refine_block` on SmolLM2-135M's block 0 with random calibration-shaped inputs (the step
cost does not depend on the values) at the fast preset's micro-batch of one 256-token sequence,
one torch thread. Each variant runs in its own process. Prints a table, writes JSON.

    python -m benchmarks.gsq_step_speed --out benchmarks/results/gsq_step_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.results_io import RESULTS, add_common_args, machine_line, write_json

ROOT = Path(__file__).resolve().parent.parent
CASES = [("2", "mlp"), ("3", "mlp"), ("1.58", "mlp"), ("2", "all")]


def measure(bits: str, scope: str, steps: int) -> dict:
    import torch

    from quantize.gsq import GSQOptions, _CPU_EXT, refine_block
    from quantize.models import WeightReader, build_skeleton, prepare_default_model
    from quantize.block_forward import call_block
    from quantize.pipeline import block_linears
    from quantize.rtn import rtn_quantize

    torch.set_num_threads(1)
    model_dir = prepare_default_model()
    model = build_skeleton(model_dir)
    block = WeightReader(model_dir).load_into(model.model.layers[0], "model.layers.0").eval()
    names = block_linears(block, ["self_attn"] if scope == "mlp" else [], "model.layers.0")
    b = float(bits) if "." in bits else int(bits)
    init = {n: rtn_quantize(block.get_submodule(n).weight.data, b, 64) for n in names}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, 256, model.config.hidden_size, generator=g)
    with torch.device("cpu"):
        rotary = type(model.model.rotary_emb)(config=model.config)
    pos_emb = rotary(x[:1], torch.arange(256).unsqueeze(0))
    with torch.no_grad():
        y = call_block(block, x, pos_emb)
    opts = GSQOptions(epochs=1, batch_size=1, micro_batch_size=1, lr_logits=3e-4, keep_best=False)
    t0 = time.perf_counter()
    _, log = refine_block(block, lambda inp: call_block(block, inp, pos_emb), names, init, x, y, opts, seed=0)
    dt = time.perf_counter() - t0
    return {"steps": log["total_steps"], "seconds": dt, "steps_per_s": log["total_steps"] / dt,
            "fused": _CPU_EXT is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    add_common_args(ap, str(RESULTS / "gsq_step_speed.json"), flag="--out")
    ap.add_argument("--one", nargs=2, metavar=("BITS", "SCOPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.steps)))
        return 0
    rows = []
    for bits, scope in CASES:
        row = {"bits": bits, "quantized": scope}
        for variant, env in (("torch", "torch"), ("fused", "auto")):
            p = subprocess.run([sys.executable, "-m", "benchmarks.gsq_step_speed", "--one", bits, scope,
                                "--steps", str(args.steps)],
                               env=dict(os.environ, GSQ_SOFT_KERNEL=env, PYTHONPATH=str(ROOT)),
                               capture_output=True, text=True, check=True, cwd=ROOT)
            row[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        row["speedup"] = row["fused"]["steps_per_s"] / row["torch"]["steps_per_s"]
        rows.append(row)
        print(f"{bits:>5}-bit {scope:<4} torch {row['torch']['steps_per_s']:6.2f} steps/s   fused "
              f"{row['fused']['steps_per_s']:6.2f} steps/s   x{row['speedup']:.2f}", flush=True)
    write_json({"machine": machine_line(), "note": "SmolLM2-135M block 0, 1 x 256 tokens per step, "
                "1 torch thread; timings on a shared machine", "rows": rows}, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
