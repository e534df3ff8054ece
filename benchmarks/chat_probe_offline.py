"""The chat probe scored offline for whole checkpoints: hits and the NLL of bf16's right answers.

``chat_probe.py`` serves each model and has the last word; this scores the same 80
questions in-process (transformers, float32, greedy; ``chat_probe_blocks.py``'s helpers),
so two checkpoints can be compared on a smooth score as well as on hits:

* ``hits``: exact-match answers, as the served probe scores them;
* ``nll``: mean negative log-likelihood, teacher-forced, of the bf16 model's own answers
  to the questions it gets right (lower is closer to bf16; it moves before a greedy answer
  flips, so it separates checkpoints whose hit counts differ by noise).

    python -m benchmarks.chat_probe_offline default runs/a runs/b --label a --label b \\
        --out benchmarks/results/chat_probe_offline.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import chat_probe_blocks as cpb
from benchmarks.chat_probe import QUESTIONS
from benchmarks.results_io import RESULTS, add_common_args, machine_line, read_json, write_json


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from quantize.evaluate import load_model
    from quantize.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bf16", help="the float model folder, or 'default' (the embedded SmolLM2)")
    ap.add_argument("quantized", nargs="+", help="quantized checkpoints of it")
    ap.add_argument("--label", action="append", default=[], help="name for each checkpoint in the JSON (in order)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_common_args(ap, str(RESULTS / "chat_probe_offline.json"), flag="--out")
    args = ap.parse_args(argv)
    missing = [q for q in args.quantized if not Path(q).is_dir()]
    if missing:  # before the minutes the bf16 answers take
        ap.error(f"not a checkpoint folder: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.bf16 = str(resolve_model(args.bf16))

    tok = AutoTokenizer.from_pretrained(args.bf16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    p_ids = cpb.prompts(tok)
    ref, _ = load_model(args.bf16)
    ref_hits, r_prompts, r_answers = cpb.bf16_targets(ref, tok, p_ids)
    ref_nll = cpb.answer_nll(ref, r_prompts, r_answers, pad)
    del ref
    print(f"{'bf16':40} {sum(ref_hits):3d}/{len(QUESTIONS)}  NLL {ref_nll:.4f}", flush=True)

    out = Path(args.out)
    results = read_json(out)
    results["bf16"] = {"model": args.bf16, "hits": sum(ref_hits), "nll": ref_nll, "machine": machine_line(),
                       "date": time.strftime("%Y-%m-%d")}
    for i, path in enumerate(args.quantized):
        label = args.label[i] if i < len(args.label) else Path(path).name
        t0 = time.time()
        model, kind = load_model(path)
        h = cpb.hits(tok, cpb.greedy_answers(model, tok, p_ids))
        nll = cpb.answer_nll(model, r_prompts, r_answers, pad)
        del model
        results[label] = {"model": path, "kind": kind, "hits": sum(h), "n": len(QUESTIONS), "nll": nll,
                          "hit_list": h, "bf16_hits": sum(ref_hits), "machine": machine_line(),
                          "seconds": round(time.time() - t0), "date": time.strftime("%Y-%m-%d")}
        print(f"{label:40} {sum(h):3d}/{len(QUESTIONS)}  NLL {nll:.4f}  ({kind})", flush=True)
        write_json(results, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
