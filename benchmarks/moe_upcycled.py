"""Perplexity of a quantized MoE that is a real language model: SmolLM2-135M-Instruct upcycled.

A tiny random MoE has a perplexity near its vocabulary size whatever is done to it, so this
benchmark builds an MoE whose bf16 perplexity means something: a Mixtral with SmolLM2's
attention, norms and embeddings, whose E experts are all copies of SmolLM2's MLP (w1 = gate,
w3 = up, w2 = down) behind a random router. Mixtral renormalises its top-k weights to sum to
one, so in bf16 the MoE computes exactly SmolLM2 (checked: same perplexity). Quantized, the
experts differ: each one's GPTQ Hessian comes from the tokens the router sends it.

Quantizes the experts only (attention stays bf16, as run.sh does for the dense model) with GPTQ
at 2 and 3 bits, G=64, 32 x 256 wikipedia calibration tokens, and reports perplexity on the same
40 x 256 held-out tokens as docs/results/quality.md's tables, beside the dense model quantized the same way.

    python -m benchmarks.moe_upcycled --out benchmarks/results/moe_upcycled.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from benchmarks.results_io import RESULTS, add_common_args, write_json

ROOT = Path(__file__).resolve().parent.parent


def build_upcycled_mixtral(src: Path, out: Path, experts: int = 4, top_k: int = 2, seed: int = 0) -> Path:
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("architectures") != ["LlamaForCausalLM"]:
        raise SystemExit(f"{src}: expected a LlamaForCausalLM folder")
    moe = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                               "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                               "tie_word_embeddings", "bos_token_id", "eos_token_id")}
    moe.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
               num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0, dtype="bfloat16")
    dense = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in dense.items():
        if ".mlp." not in name:
            tensors[name] = t
            continue
        block, _, rest = name.partition(".mlp.")
        which = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}[rest]
        for e in range(experts):
            tensors[f"{block}.block_sparse_moe.experts.{e}.{which}.weight"] = t.clone()
        router = f"{block}.block_sparse_moe.gate.weight"
        if router not in tensors:
            tensors[router] = (torch.randn(experts, cfg["hidden_size"], generator=gen) * 0.05).to(t.dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(moe, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "moe_upcycled"))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--bits", nargs="+", default=["3", "2"])
    add_common_args(ap, str(RESULTS / "moe_upcycled.json"), flag="--out")
    args = ap.parse_args(argv)

    from quantize.cli import main as quantize_main
    from quantize.evaluate import evaluate_folders
    from quantize.models import prepare_default_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dense = prepare_default_model()
    moe = build_upcycled_mixtral(dense, work / f"smollm2-mixtral-{args.experts}x")
    folders, times = [str(dense), str(moe)], {}
    common = ["--method", "gptq", "--group-size", "64", "--nsamples", "32", "--seqlen", "256", "--skip-attention"]
    for bits in args.bits:
        for name, src in ((f"dense-gptq-{bits}", dense), (f"moe-gptq-{bits}", moe)):
            out = work / name
            if not out.is_dir():
                t0 = time.time()
                if quantize_main(["--model", str(src), "--out", str(out), "--bits", bits, *common]) != 0:
                    raise SystemExit(f"quantizing {name} failed")
                times[name] = round(time.time() - t0, 1)
            folders.append(str(out))
    rows = evaluate_folders(folders, "wikipedia", 40, 256, progress=False)
    print(f"\n{'model':<40}{'kind':<16}{'ppl':>10}")
    for r in rows:
        print(f"{Path(r['model']).name:<40}{r['kind']:<16}{r['ppl']:>10.3f}")
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "experts": args.experts, "top_k": 2, "quantize_seconds": times, "rows": rows}
    write_json(result, args.out)


if __name__ == "__main__":
    main()
