"""How much of each block's output (squared norm) sits on one token: SmolLM2-135M's attention sink.

GSQ's loss is the MSE of a block's output. When one token holds nearly all of the output's squared
norm, that loss, and any choice made on it (``--gsq-held-out``), is about that token alone;
``--gsq-token-norm-cap`` exists for that. This prints, per block, position 0's share of
sum ||h||^2 and the largest token's norm^2 over the median token's, on float calibration text:

    python -m benchmarks.massive_activations [--nsamples 8] [--json FILE]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.results_io import add_common_args, machine_info, write_json


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    add_common_args(p, "benchmarks/results/massive_activations.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.data import load_split, tokenize_sequences
    from quantize.models import prepare_default_model

    folder = prepare_default_model()
    ids = tokenize_sequences(load_split("wikipedia", "calib"), AutoTokenizer.from_pretrained(str(folder)),
                             args.seqlen, args.nsamples)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    rows = []
    print(f"{'block output':>12}{'position 0 share':>18}{'max / median norm^2':>22}")
    for i, h in enumerate(hidden[1:]):  # hidden[i + 1] is block i's output
        n2 = h.pow(2).sum(-1)
        row = {"block": i, "pos0_share": float(n2[:, 0].sum() / n2.sum()), "max_over_median": float(n2.max() / n2.median())}
        rows.append(row)
        print(f"{i:>12}{row['pos0_share']:>18.3f}{row['max_over_median']:>22.1f}")
    write_json({"machine": machine_info(torch=torch.__version__), "args": vars(args), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
