"""Served decode where the GEMM matters: a random ~1B Llama through vLLM (bf16, gsq 2-bit, gsq 3-bit)
beside llama.cpp on a GGUF of the same weights (F16, Q2_K, Q3_K, Q4_0), one machine, one run.

SmolLM2-135M hides our GEMM (vLLM's per-step work, attention and lm_head are most of its step), so
this benchmark makes a Llama-shaped model whose linears are most of the bytes a step reads:
Llama-3.2-1B's body (hidden 2048, MLP 8192, 16 blocks, 32 query / 8 KV heads, tied embeddings) with
SmolLM2's tokenizer (vocab 49152), ~1.07B parameters, random N(0, 0.02) weights (decode speed does
not depend on the values; the text it writes is noise). Steps, each skipped when its output exists
in ``--work``:

1. ``bf16/``: the model (``quantize.tiny.build_tiny_llama`` at this shape);
2. ``gsq2/``, ``gsq3/``: ``gsq-quantize --method rtn`` of every linear, G = ``--group-size`` (the
   calibration pass is 2 x 64 tokens: RTN uses none, the pipeline only logs each block's error);
3. ``model-F16.gguf``: the same weights written with the ``gguf`` package (:func:`write_gguf`: q/k rows
   permuted to llama.cpp's rotary pairing, tokenizer copied from the embedded SmolLM2 GGUF), then
   ``llama-quantize`` to each ``--gguf-types`` (llama.cpp's own rules: e.g. the tied embedding,
   which is also the output matrix, becomes Q6_K);
4. llama.cpp: ``llama-batched-bench -npp 16 -ntg N -npl 1,8 -t THREADS`` (built by
   ``benchmarks.llama_cpp_bench.build``): decode tokens/s of 1 and 8 parallel sequences (S_TG);
5. vLLM: each checkpoint served by ``gsq-serve`` (``benchmarks.serving``), greedy streamed
   completions of N tokens with ``ignore_eos``: at concurrency 1 the median per-request decode rate,
   at concurrency 8 all output tokens / wall time. The plain rows serve with the defaults (since
   2026-12-07 the table-lookup kernels at M <= 16, ``GSQ_CPU_TL=auto``); ``-fused`` rows (``--served``)
   serve the same checkpoint with ``GSQ_CPU_TL=off`` (the fused kernels alone, the default before);
   ``-optin`` rows with the tables and ``GSQ_CPU_DENSE=int8`` (lm_head, here the tied 49152 x 2048
   embedding, from an int8 copy); ``-tl`` rows force the tables (the default now).

Prints one table (with ratios to llama.cpp Q2_K and to our bf16 serve) and writes JSON.

    python -m benchmarks.served_vs_llama_cpp --json benchmarks/results/served_vs_llama_cpp_avx512_epyc.json

Costs on a 2-core machine (measured once): llama.cpp build ~4 min, model + RTN checkpoints + GGUFs ~25 min
(RTN's scale search: 9 and 12 min; all reused by later runs),
then ~4 min per served checkpoint (vLLM start-up dominates). Use ``--threads`` = the cores vLLM's engine
gets (``gsq-serve`` gives it every core of a machine with at most 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.llama_cpp_bench import _run, build
from benchmarks.results_io import add_common_args, machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]
# Llama-3.2-1B's body; the vocabulary is SmolLM2's (the tokenizer both engines load).
SHAPE = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8)
GGUF_TYPES = ["F16", "Q2_K", "Q3_K", "Q4_0"]
# Served rows: the folder (bf16 / gsq2 / gsq3, before the dash) and the server's extra environment.
_OPTIN = {"GSQ_CPU_TL": "auto", "GSQ_CPU_DENSE": "int8"}
# -onednn-head: lm_head on vLLM's oneDNN GEMM at every row count (GSQ_CPU_DENSE=0; before 2026-12-07
# the default on CPUs with a bf16 dot product), beside the default's gsq::cpu_dense at one row.
SERVED = {"bf16": {}, "gsq2": {}, "gsq2-fused": {"GSQ_CPU_TL": "off"}, "gsq2-onednn-head": {"GSQ_CPU_DENSE": "0"},
          "gsq2-tl": {"GSQ_CPU_TL": "auto"}, "gsq2-optin": _OPTIN, "gsq3": {}, "gsq3-fused": {"GSQ_CPU_TL": "off"},
          "gsq3-tl": {"GSQ_CPU_TL": "auto"}, "gsq3-optin": _OPTIN}
# HF Llama tensor names -> GGUF's (llama.cpp's LLM_TENSOR names).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def rotary_rows_to_interleaved(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k projection rows from HF's rotary layout to llama.cpp's.

    HF's Llama rotates the pair (i, i + d/2) of each head of d dims; llama.cpp's LLAMA rope rotates
    (2i, 2i + 1). Row j = i of the first half goes to 2i and row i + d/2 to 2i + 1, per head, so that
    the same x gives the same rotated query/key up to this fixed permutation of each head's dims
    (which dot products do not see). ``w``: [n_head * d, in]."""
    out, inp = w.shape
    d = out // n_head
    return w.reshape(n_head, 2, d // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(model_dir: Path, dest: Path, tokenizer_gguf: Path) -> Path:
    """The bf16 HF Llama folder ``model_dir`` as an F16 GGUF at ``dest`` (norms F32), with the
    tokenizer keys of ``tokenizer_gguf``; written to a temp file, then renamed."""
    import gguf
    import torch
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"write_gguf: {model_dir} is {cfg.get('model_type')!r}, not a llama model")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    tmp = dest.with_name(dest.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(model_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    reader = gguf.GGUFReader(str(tokenizer_gguf))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    (st,) = sorted(model_dir.glob("*.safetensors"))
    with safe_open(str(st), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name).to(torch.float32).numpy()
            if name == "model.embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "model.norm.weight":
                gname = "output_norm.weight"
            elif name == "lm_head.weight":
                gname = "output.weight"
            else:
                _, _, i, rest = name.split(".", 3)
                gname = f"blk.{i}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"
                if rest.startswith("self_attn.q_proj"):
                    t = rotary_rows_to_interleaved(t, heads)
                elif rest.startswith("self_attn.k_proj"):
                    t = rotary_rows_to_interleaved(t, kv_heads)
            w.add_tensor(gname, t if t.ndim == 1 else t.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(dest)
    return dest


def make_model(work: Path, seed: int) -> Path:
    from quantize.tiny import build_tiny_llama

    dest = work / "bf16"
    if not (dest / "config.json").is_file():
        tmp = work / "bf16.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_llama(tmp, seed=seed, **SHAPE)
        tmp.rename(dest)
    return dest


def make_checkpoint(model: Path, work: Path, bits: int, group_size: int, threads: int) -> Path:
    """``gsq-quantize --method rtn`` of every linear (it writes its folder through a temp name)."""
    dest = work / f"gsq{bits}"
    if not (dest / "config.json").is_file():
        _run([Path(sys.executable).parent / "gsq-quantize", "--model", model, "--out", dest, "--method", "rtn",
              "--bits", bits, "--group-size", group_size, "--nsamples", 2, "--seqlen", 64, "--threads", threads,
              "--log-file", work / f"gsq{bits}.log"])
    return dest


def make_ggufs(model: Path, work: Path, types: list[str], bindir: Path) -> dict[str, Path]:
    """{type: GGUF file} for each of ``types``; the F16 file (every other type's source) is always written."""
    from quantize.models import find_default_gguf

    f16 = work / "model-F16.gguf"
    if not f16.is_file():
        write_gguf(model, f16, find_default_gguf())
    files = {}
    for qtype in types:
        path = work / f"model-{qtype}.gguf"
        if not path.is_file():  # (F16 is there already)
            tmp = path.with_name(path.name + ".partial")
            _run([bindir / "llama-quantize", f16, tmp, qtype], stdout=subprocess.DEVNULL)
            tmp.rename(path)
        files[qtype] = path
    return files


def llama_cpp_decode(bindir: Path, gguf_path: Path, threads: int, n_gen: int) -> dict[int, float]:
    """S_TG (generated tokens / generation time) of ``llama-batched-bench`` for 1 and 8 sequences."""
    out = _run([bindir / "llama-batched-bench", "-m", gguf_path, "-c", 1024, "-b", 512, "-ub", 512, "-npp", 16,
                "-ntg", n_gen, "-npl", "1,8", "-t", threads, "--output-format", "jsonl"],
               capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def served_decode(name: str, folder: Path, env: dict[str, str], n_gen: int, requests: int, log: Path) -> dict:
    from benchmarks.serving import run_level, running_server

    with running_server(str(folder), ["--max-model-len", "512", "--dtype", "bfloat16"], log, 1200, env) as (base, up):
        c1 = asyncio.run(run_level(base, 1, requests, n_gen))
        c8 = asyncio.run(run_level(base, 8, 8, n_gen))
    print(f"served {name}: c=1 {c1['decode_tok_s']:.1f} tok/s, c=8 {c8['output_tok_s']:.1f} tok/s "
          f"(start-up {up:.0f} s)", file=sys.stderr, flush=True)
    return {"startup_s": up, "c1": c1, "c8": c8}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/served_1b",
                   help="model, checkpoints, GGUFs and logs (reused as they are: delete the folder after changing --group-size)")
    p.add_argument("--llama-cpp-work", default="runs/llama_cpp", help="llama.cpp build folder (reused)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--gguf-types", nargs="+", default=GGUF_TYPES)
    p.add_argument("--n", type=int, default=64, help="tokens generated per request / sequence")
    p.add_argument("--requests", type=int, default=4, help="requests at concurrency 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--served", nargs="*", default=["bf16", "gsq2", "gsq2-fused", "gsq2-optin", "gsq3", "gsq3-fused"],
                   choices=list(SERVED),
                   help="served rows (none: llama.cpp only); -fused: GSQ_CPU_TL=off; -tl: GSQ_CPU_TL=auto forced")
    p.add_argument("--note", default="", help="kept in the JSON (e.g. that the machine was shared)")
    add_common_args(p, "benchmarks/results/served_vs_llama_cpp.json", threads=os.cpu_count())
    args = p.parse_args(argv)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bindir = build(Path(args.llama_cpp_work).resolve(), os.cpu_count() or 2)
    model = make_model(work, args.seed)
    ckpts = {bits: make_checkpoint(model, work, bits, args.group_size, args.threads) for bits in (2, 3)}
    ggufs = make_ggufs(model, work, args.gguf_types, bindir)

    rows = []
    for qtype, path in ggufs.items():
        tg = llama_cpp_decode(bindir, path, args.threads, args.n)
        rows.append({"engine": "llama.cpp", "weights": qtype, "bytes": path.stat().st_size, "c1_tok_s": tg[1],
                     "c8_tok_s": tg[8], "threads": args.threads})
        print(f"llama.cpp {qtype}: 1 seq {tg[1]:.1f} tok/s, 8 seq {tg[8]:.1f} tok/s", file=sys.stderr, flush=True)
    if args.served:
        folders = {"bf16": model, "gsq2": ckpts[2], "gsq3": ckpts[3]}
        for name in args.served:
            folder, env = folders[name.split("-")[0]], SERVED[name]
            r = served_decode(name, folder, env, args.n, args.requests, work / f"serve-{name}.log")
            rows.append({"engine": "vllm gsq-serve", "weights": name, "bytes": folder_bytes(folder),
                         "c1_tok_s": r["c1"]["decode_tok_s"], "c8_tok_s": r["c8"]["output_tok_s"], "env": env,
                         "startup_s": r["startup_s"], "detail": r})

    def find(engine, weights):
        return next((r for r in rows if r["engine"] == engine and r["weights"] == weights), None)

    q2k, bf16 = find("llama.cpp", "Q2_K"), find("vllm gsq-serve", "bf16")
    print(f"{'engine':<15}{'weights':<9}{'MB':>7}{'c=1 tok/s':>11}{'c=8 tok/s':>11}"
          f"{'c1/Q2_K':>9}{'c8/Q2_K':>9}{'c1/bf16':>9}{'c8/bf16':>9}")
    for r in rows:
        for ref, key in ((q2k, "q2k"), (bf16, "bf16")):
            for c in ("c1", "c8"):
                r[f"{c}_vs_{key}"] = r[f"{c}_tok_s"] / ref[f"{c}_tok_s"] if ref else None
        ratios = "".join(f"{r[k]:>8.2f}x" if r[k] else f"{'-':>9}"
                         for k in ("c1_vs_q2k", "c8_vs_q2k", "c1_vs_bf16", "c8_vs_bf16"))
        print(f"{r['engine']:<15}{r['weights']:<9}{r['bytes'] / 1e6:>7.0f}{r['c1_tok_s']:>11.1f}"
              f"{r['c8_tok_s']:>11.1f}{ratios}")
    from benchmarks.results_io import cpu_flags
    from gsq_vllm.cpu_gemm import cpu_isa

    machine = machine_info(flags=sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
                           gsq_cpu_kernel=cpu_isa(), threads=args.threads)
    write_json({"machine": machine, "note": args.note, "shape": SHAPE, "group_size": args.group_size,
                "n_gen": args.n, "requests_c1": args.requests, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
