"""Plot GSQ's scaling curve from benchmarks/gsq_block_sweep.py JSON files: held-out block-output
MSE relative to the GPTQ init (y, < 1: GSQ wins) against the tokens GSQ processed
(epochs x training tokens, x, log scale), one marker per setting and block; the marker's shape is
the sequences per Lion step, filled when the init kept its N(0,1) term.

    python -m benchmarks.plot_gsq_sweep benchmarks/results/gsq_sweep_*.json --out docs/results/gsq_sweep.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MARKERS = {1: "o", 4: "s", 16: "^", 64: "D"}


def points(paths):
    """(block, bits, setting, token passes, held-out rel, batch, init_noise, steps) per setting run."""
    from benchmarks.gsq_block_sweep import parse_setting

    for path in paths:
        data = json.loads(Path(path).read_text())
        bits = data["args"]["bits"]
        for row in data["blocks"]:
            for text, r in row["settings"].items():
                opts, _ = parse_setting(text)
                if r["steps"] == 0:
                    continue
                yield (row["block"], bits, text, r["token_passes"], r["rel"]["held"], opts.batch_size,
                       opts.init_noise, r["steps"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+")
    p.add_argument("--out", default="runs/gsq_sweep.png")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {}
    for block, bits, text, passes, rel, batch, noise, steps in points(args.json):
        key = f"block {block}, {bits}-bit"
        colour = colours.setdefault(key, f"C{len(colours)}")
        ax.scatter(passes, rel, marker=MARKERS.get(batch, "x"), s=50, color=colour,
                   facecolors=colour if noise else "none", label=key)
        ax.annotate(f"{steps}", (passes, rel), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("tokens GSQ processed (epochs x training tokens); number = Lion steps")
    ax.set_ylabel("held-out block MSE / GPTQ init's")
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    extra = [plt.Line2D([], [], marker=m, ls="", color="k", label=f"{b} seq/step") for b, m in MARKERS.items()]
    ax.legend(list(seen.values()) + extra, list(seen) + [h.get_label() for h in extra], fontsize=7,
              loc="upper right")
    ax.set_title("GSQ vs its GPTQ init, SmolLM2-135M MLP (hollow: init without its noise term)", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
