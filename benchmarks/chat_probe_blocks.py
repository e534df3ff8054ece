"""Which blocks' quantized MLPs cost the chat probe most: each restored to bf16 in turn, scored offline.

The served probe (``chat_probe.py``) takes 10-15 min a model on 2 cores; this
script scores the same 80 questions in-process with transformers (float32,
greedy, batched with left padding, the chat template as vLLM applies it), so
a sweep over every block fits in minutes. Two scores per model:

* ``hits``: exact-match answers, scored as ``chat_probe.scores`` does;
* ``nll``: the mean negative log-likelihood, teacher-forced, of the bf16
  model's own answers to the questions bf16 gets right: a smooth score that
  moves before a greedy answer flips.

It loads the bf16 model and the quantized checkpoint (dequantized), then:

1. restores one block's quantized linears (those under ``--part``, default
   ``mlp``) to bf16 at a time and scores the NLL: a ranking of the blocks;
2. restores the top-k blocks of that ranking together, k = 0..``--max-k``,
   and scores hits and NLL for each k.

The kept blocks are then quantized out with ``gsq-quantize
--modules-to-not-convert model.layers.I.mlp,...`` and served by ``chat_probe.py``,
which has the last word (float32 offline and bf16 served can differ on a
near-tie).

    python -m benchmarks.chat_probe_blocks ~/.cache/gsq-vllm/models/SmolLM2-135M-Instruct-bf16 runs/x \\
        --out benchmarks/results/chat_probe_blocks.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.chat_probe import QUESTIONS, scores
from benchmarks.results_io import RESULTS, add_common_args, machine_line, write_json

MAX_NEW_TOKENS = 24  # as chat_probe.py asks the server


def prompts(tokenizer) -> list[list[int]]:
    """Token ids of each question as chat_probe.py sends it, through the model's chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"{q} Answer with one word."}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for q, _ in QUESTIONS]


def _left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_answers(model, tokenizer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy continuations (at most MAX_NEW_TOKENS tokens, cut after the first end token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_padded(prompt_ids, pad)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
    answers = []
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        answers.append(row)
    return answers


def hits(tokenizer, answers: list[list[int]]) -> list[bool]:
    return [scores(tokenizer.decode(a, skip_special_tokens=True), acc) for a, (_, acc) in zip(answers, QUESTIONS)]


@torch.inference_mode()
def answer_nll(model, prompt_ids: list[list[int]], answers: list[list[int]], pad: int) -> float:
    """Mean NLL per token of ``answers`` given their prompts, teacher-forced, in one batch."""
    seqs = [p + a for p, a in zip(prompt_ids, answers)]
    ids, mask = _left_padded(seqs, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    total, count = 0.0, 0
    width = ids.shape[1]
    for i, a in enumerate(answers):
        start = width - len(a)  # first answer position in the padded row
        lp = torch.log_softmax(logits[i, start - 1:width - 1], dim=-1)
        total -= lp.gather(1, ids[i, start:].unsqueeze(1)).sum().item()
        count += len(a)
    return total / max(count, 1)


def bf16_targets(model, tokenizer, prompt_ids: list[list[int]]):
    """The float model's greedy answers scored: ``(hits, prompts, answers)``, the last two
    only for the questions it gets right (the NLL targets of :func:`answer_nll`)."""
    answers = greedy_answers(model, tokenizer, prompt_ids)
    ok = hits(tokenizer, answers)
    right = [i for i, h in enumerate(ok) if h]
    return ok, [prompt_ids[i] for i in right], [answers[i] for i in right]


def _linears(block, part: str) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(part)}


class BlockSwapper:
    """Restores chosen blocks' linears under ``part`` to the float model's weights, and back."""

    def __init__(self, quantized, reference, part: str):
        self.q_blocks, self.r_blocks, self.part = quantized.model.layers, reference.model.layers, part
        self.saved = {i: {n: m.weight.detach().clone() for n, m in _linears(b, part).items()}
                      for i, b in enumerate(self.q_blocks)}

    def set(self, restored: set[int]) -> None:
        for i, block in enumerate(self.q_blocks):
            ref = _linears(self.r_blocks[i], self.part)
            for n, m in _linears(block, self.part).items():
                m.weight.data.copy_(ref[n].weight if i in restored else self.saved[i][n])


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from quantize.evaluate import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bf16", help="the float model folder")
    ap.add_argument("quantized", help="a quantized checkpoint of it")
    ap.add_argument("--part", default="mlp", help="linears restored per block: names under this (default mlp)")
    ap.add_argument("--max-k", type=int, default=8, help="score the top-k restored blocks for k = 0..max-k")
    add_common_args(ap, str(RESULTS / "chat_probe_blocks.json"), flag="--out")
    args = ap.parse_args(argv)

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.bf16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ref, _ = load_model(args.bf16)
    qmodel, kind = load_model(args.quantized)
    p_ids = prompts(tok)

    ref_hits, r_prompts, r_answers = bf16_targets(ref, tok, p_ids)
    print(f"bf16: {sum(ref_hits)}/{len(QUESTIONS)}; its {len(r_answers)} right answers are the NLL targets")

    swap = BlockSwapper(qmodel, ref, args.part)
    base_nll = answer_nll(qmodel, r_prompts, r_answers, pad)
    print(f"{kind}: NLL {base_nll:.4f} (bf16 {answer_nll(ref, r_prompts, r_answers, pad):.4f})")
    per_block = []
    for i in range(len(qmodel.model.layers)):
        swap.set({i})
        per_block.append({"block": i, "nll": answer_nll(qmodel, r_prompts, r_answers, pad)})
        print(f"  block {i:3d} {args.part} in bf16: NLL {per_block[-1]['nll']:.4f} "
              f"({per_block[-1]['nll'] - base_nll:+.4f})", flush=True)
    ranking = [r["block"] for r in sorted(per_block, key=lambda r: r["nll"])]

    print(f"\n{'k':>3} {'kept in bf16':40} {'hits':>6} {'NLL':>8}")
    curve = []
    for k in range(args.max_k + 1):
        kept = sorted(ranking[:k])
        swap.set(set(kept))
        h = hits(tok, greedy_answers(qmodel, tok, p_ids))
        nll = answer_nll(qmodel, r_prompts, r_answers, pad)
        curve.append({"k": k, "kept": kept, "hits": sum(h), "nll": nll})
        print(f"{k:3d} {','.join(map(str, kept)) or '-':40} {sum(h):3d}/{len(QUESTIONS)} {nll:8.4f}", flush=True)

    res = {"bf16": args.bf16, "quantized": args.quantized, "kind": kind, "part": args.part,
           "bf16_hits": sum(ref_hits), "n": len(QUESTIONS), "per_block": per_block, "ranking": ranking,
           "curve": curve, "machine": machine_line(), "seconds": round(time.time() - t0),
           "date": time.strftime("%Y-%m-%d")}
    write_json(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
