"""Per-block GSQ loss curves from a checkpoint's gsq_logs.json (written by the block pipeline).

Soft MSE per optimisation step (solid) and hard (argmax) MSE per epoch (markers, epoch 0 = the
GPTQ init), one colour per block, log scale.

    python -m benchmarks.plot_gsq_loss CKPT/gsq_logs.json -o gsq_loss.png [--blocks 0 5 29]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", help="gsq_logs.json: {block prefix: refine_block log}")
    p.add_argument("-o", "--output", default="gsq_loss.png")
    p.add_argument("--blocks", type=int, nargs="*", help="block indices to draw (default: all)")
    args = p.parse_args(argv)
    try:
        logs = json.loads(Path(args.logs).read_text())
        # A sparse (MoE) block's experts are trained one by one: {"experts": ..., "attention": ...}, not drawn.
        items = sorted(((k, v) for k, v in logs.items() if "experts" not in v),
                       key=lambda kv: int(kv[0].rsplit(".", 1)[-1]))
        for _, log in items:
            log["steps"], log["hard_mse"], log["total_steps"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"plot_gsq_loss: {args.logs} is not a GSQ log file ({e!r})")
    if args.blocks:
        items = [kv for kv in items if int(kv[0].rsplit(".", 1)[-1]) in set(args.blocks)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for c, (prefix, log) in enumerate(items):
        color = plt.cm.viridis(c / max(len(items) - 1, 1))
        ax.plot([s["step"] for s in log["steps"]], [s["soft_mse"] for s in log["steps"]],
                color=color, lw=1, label=f"{prefix} soft")
        scored = log.get("scored_epochs", range(len(log["hard_mse"])))  # older logs: every epoch
        per_epoch = log["total_steps"] / max(scored[-1], 1)
        ax.plot([e * per_epoch for e in scored], log["hard_mse"], "o--", color=color,
                ms=4, lw=0.8)
    ax.set_xlabel("optimisation step (within the block)")
    ax.set_ylabel("block output MSE (solid: soft, dashed o: hard/argmax)")
    ax.set_yscale("log")
    if len(items) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(args.output).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
