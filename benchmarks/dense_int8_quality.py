"""What ``GSQ_CPU_DENSE=int8`` costs in quality: the same model scored with its lm_head in float and
with lm_head through ``gsq::cpu_dense_int8`` (int8 weights per row, int8 activations per block of
32, at every row: the op's bf16 fallback above 2 rows is not taken here, so every scored token
pays the rounding).

Per model folder (bf16, or a GSQ checkpoint loaded as gsq-eval loads it), on gsq-eval's held-out
text: perplexity both ways, and how often the two agree on the top-1 next token:

    python -m benchmarks.dense_int8_quality default runs/ckpt [--nsamples 40] [--json FILE]

Only lm_head is swapped. A checkpoint that keeps attention in bf16 would, under GSQ_CPU_DENSE=int8,
also serve those layers in int8; that is not measured here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.results_io import add_common_args, machine_info, write_json


class Int8Head(torch.nn.Module):
    """lm_head as gsq::cpu_dense_int8 computes it (always the int8 kernel: no bf16 weight passed)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        from gsq_vllm import cpu_gemm

        self.wq, self.ws = cpu_gemm.quantize_dense_int8(weight.to(torch.bfloat16))
        self.op = cpu_gemm.cpu_dense_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.wq, self.ws)


def score(model, ids: torch.Tensor, batch_size: int = 4) -> tuple[float, list[torch.Tensor]]:
    """(perplexity, per-batch argmax ids) over token ids ``[n, S]``."""
    nll, count, top1 = 0.0, 0, []
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b:b + batch_size]
            logits = model(input_ids=x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
            top1.append(logits[:, :-1].argmax(-1))
    return math.exp(nll / count), top1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model folders; 'default' = the embedded SmolLM2 bf16")
    p.add_argument("--corpus", default="wikipedia")
    p.add_argument("--nsamples", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    add_common_args(p, "benchmarks/results/dense_int8_quality.json", threads=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from gsq_vllm import cpu_gemm
    from quantize.data import load_split
    from quantize.data import tokenize_sequences
    from quantize.evaluate import load_model
    from quantize.models import prepare_default_model

    if not cpu_gemm.cpp_kernel_available():
        raise SystemExit("dense_int8_quality: gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    docs = load_split(args.corpus, "eval")
    rows = []
    print(f"{'model':<48}{'kind':>16}{'ppl float':>11}{'ppl int8':>10}{'change':>9}{'top-1 same':>12}")
    for name in args.models:
        folder = prepare_default_model() if name == "default" else Path(name)
        model, kind = load_model(folder)
        ids = tokenize_sequences(docs, AutoTokenizer.from_pretrained(str(folder)), args.seqlen, args.nsamples)
        ppl_f, top_f = score(model, ids)
        model.lm_head = Int8Head(model.lm_head.weight.detach())  # untied from the embedding: lookups unchanged
        ppl_q, top_q = score(model, ids)
        same = sum((a == b).sum().item() for a, b in zip(top_f, top_q)) / sum(a.numel() for a in top_f)
        row = {"model": str(name), "kind": kind, "ppl_float_head": ppl_f, "ppl_int8_head": ppl_q,
               "ppl_change": ppl_q / ppl_f - 1, "top1_agreement": same, "tokens": int(ids[:, 1:].numel()),
               "corpus": args.corpus, "seqlen": args.seqlen}
        rows.append(row)
        print(f"{str(name)[-48:]:<48}{kind:>16}{ppl_f:>11.3f}{ppl_q:>10.3f}{row['ppl_change']:>+9.2%}{same:>12.2%}")
        del model
    write_json({"machine": machine_info(threads=args.threads, isa_in_use=cpu_gemm.cpu_isa()), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
