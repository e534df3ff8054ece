"""What the table-lookup decode kernels (``GSQ_CPU_TL``) cost in quality, token by token.

A GSQ checkpoint is scored three ways on gsq-eval's held-out text, with every quantized linear
run by ``torch.ops.gsq.cpu_gemm`` on bf16 x as served, fed ``--rows`` rows of x per call (a
decode step's batch: at most 16, where the tables run):

* ``fused``: the fused kernels (tables off), the default serving path;
* ``tables``: the table-lookup kernels (``set_tl("auto")``);
* ``float``: the dequantized float32 model (``quantize.evaluate.load_model``).

Per way: perplexity, and against ``fused``: how often the top-1 next token agrees and the mean
KL divergence of the next-token distributions (nats a token). A decode-time difference a served
chat probe sees only through a handful of answers is visible here on every token:

    python -m benchmarks.tl_quality runs/smollm2-gsq-3b-g32 [--nsamples 16] [--rows 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.results_io import add_common_args, machine_info, write_json


class OpLinear(torch.nn.Module):
    """A quantized linear as the CPU plugin runs it: planes from repack_for_cpu, bf16 x, ``rows`` rows a call."""

    def __init__(self, qweight, scales, bits, group_size: int, rows: int):
        super().__init__()
        from gsq_format.format import storage_bits
        from gsq_vllm import cpu_gemm

        self.lo, self.hi = cpu_gemm.repack_for_cpu(qweight, bits, group_size)
        self.scales = scales.contiguous()
        self.bits = storage_bits(bits)  # ternary is passed as 2: its codes share the 2-bit storage
        self.group_size, self.rows, self.op = group_size, rows, cpu_gemm.cpu_gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.cat([self.op(flat[i:i + self.rows], self.lo, self.hi, self.scales, self.bits, self.group_size)
                       for i in range(0, flat.shape[0], self.rows)])
        return y.float().reshape(*x.shape[:-1], -1)


def swap_in_op_linears(model, folder: Path, rows: int) -> int:
    """Replace every quantized linear of ``model`` (loaded by load_model) by an OpLinear; returns the count."""
    from gsq_format.format import GSQQuantConfig, QWEIGHT_SUFFIX, SCALES_SUFFIX, load_tensors, read_model_config

    qcfg = GSQQuantConfig.from_dict(read_model_config(folder)["quantization_config"])
    tensors = load_tensors(folder)
    count = 0
    for name, t in tensors.items():
        if not name.endswith("." + QWEIGHT_SUFFIX):
            continue
        prefix = name[: -len(QWEIGHT_SUFFIX) - 1]
        parent, _, leaf = prefix.rpartition(".")
        try:
            linear = getattr(model.get_submodule(parent), leaf)
        except AttributeError:  # MoE checkpoints name experts as the disk does, not as the module tree
            raise SystemExit(f"tl_quality: {prefix} is not a module of the model (MoE checkpoints are not handled)")
        if linear.bias is not None:
            raise SystemExit(f"tl_quality: {prefix} has a bias; not handled here")
        op = OpLinear(t, tensors[f"{prefix}.{SCALES_SUFFIX}"], qcfg.bits, qcfg.group_size, rows)
        setattr(model.get_submodule(parent), leaf, op)
        count += 1
    return count


def logprobs(model, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Next-token log-probabilities, float32 ``[b, S-1, V]`` per batch of ``ids`` ``[n, S]``."""
    out = []
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            out.append(torch.log_softmax(model(input_ids=ids[b:b + batch_size]).logits[:, :-1].float(), -1))
    return out


def compare(ids, lp, ref) -> dict:
    """Perplexity of ``lp``; top-1 agreement and mean KL(ref || lp) against ``ref`` (both from logprobs)."""
    starts = [sum(l.shape[0] for l in lp[:i]) for i in range(len(lp))]
    nll = sum(-l.gather(-1, ids[s:s + l.shape[0], 1:, None]).sum().item() for s, l in zip(starts, lp))
    tokens = ids[:, 1:].numel()
    same = sum((a.argmax(-1) == r.argmax(-1)).sum().item() for a, r in zip(lp, ref))
    kl = sum((r.exp() * (r - a)).sum().item() for a, r in zip(lp, ref))
    return {"ppl": math.exp(nll / tokens), "top1_agreement_with_fused": same / tokens, "kl_from_fused": kl / tokens}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a GSQ checkpoint folder")
    p.add_argument("--corpus", default="wikipedia")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--rows", type=int, default=16, help="rows of x per kernel call (a decode step's batch)")
    add_common_args(p, "benchmarks/results/tl_quality.json", threads=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from gsq_vllm import cpu_gemm
    from quantize.data import load_split, tokenize_sequences
    from quantize.evaluate import load_model

    if not cpu_gemm.cpp_kernel_available():
        raise SystemExit("tl_quality: gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    folder = Path(args.model)
    cpp = cpu_gemm._cpp
    if not cpp.supported_tl():
        raise SystemExit("tl_quality: this CPU runs no table-lookup kernel")
    model, kind = load_model(folder)
    if kind == "bf16":
        raise SystemExit(f"tl_quality: {folder} is not a GSQ checkpoint (no quantization_config)")
    ids = tokenize_sequences(load_split(args.corpus, "eval"), AutoTokenizer.from_pretrained(str(folder)),
                             args.seqlen, args.nsamples)
    lp_float = logprobs(model, ids)
    n = swap_in_op_linears(model, folder, args.rows)
    before = cpp.set_tl("off")
    try:
        lp_fused = logprobs(model, ids)
        cpp.set_tl("auto")
        tl = cpp.tl_in_use(min(args.rows, cpp.TL_MAX_ROWS))
        lp_tables = logprobs(model, ids)
    finally:
        cpp.set_tl(before)
    rows = []
    print(f"{kind}: {n} quantized linears on gsq::cpu_gemm ({cpp.isa()}), {args.rows} rows a call, "
          f"{ids[:, 1:].numel()} tokens; tables: {tl or 'none'}")
    print(f"{'way':<8}{'ppl':>10}{'top-1 = fused':>15}{'KL from fused':>15}")
    for way, lp in (("float", lp_float), ("fused", lp_fused), ("tables", lp_tables)):
        row = {"way": way, **compare(ids, lp, lp_fused)}
        rows.append(row)
        print(f"{way:<8}{row['ppl']:>10.3f}{row['top1_agreement_with_fused']:>15.2%}{row['kl_from_fused']:>15.5f}")
    write_json({"machine": machine_info(threads=args.threads, isa_in_use=cpp.isa()), "model": str(folder),
                "kind": kind, "tables": tl, "rows_per_call": args.rows, "corpus": args.corpus,
                "seqlen": args.seqlen, "nsamples": args.nsamples, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
