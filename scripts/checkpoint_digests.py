"""SHA-256 of every file of small RTN / GPTQ / GSQ checkpoints, for refactors that must not change them.

Quantizes, with the real CLI (`quantize.cli.main`), a tiny random Llama, a tiny Qwen3-MoE and the
first two blocks of SmolLM2-135M-Instruct, each with RTN, GPTQ and GSQ (a short `fast` run), and
prints/writes one digest per checkpoint file. Run it before and after a change and diff the JSON:

    python scripts/checkpoint_digests.py --json /tmp/before.json
    ... change ...
    python scripts/checkpoint_digests.py --json /tmp/after.json && diff /tmp/before.json /tmp/after.json

Files that record the run (report.json, report.html, the log) are left out: they hold timings and paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

SKIP = {"report.json", "report.html"}  # timings and paths


def smollm2_subset(out: Path, blocks: int) -> Path:
    """The embedded SmolLM2-135M-Instruct cut to its first `blocks` blocks (same tensors, same tokenizer)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantize.models import prepare_default_model

    src = prepare_default_model()
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = blocks
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    keep = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks:
                keep[k] = v
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file() and f.name not in SKIP and not f.name.endswith(".log")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the digests here too")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from quantize.cli import main as quantize_main
    from quantize.tiny import build_tiny_llama, build_tiny_moe

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"tiny_llama": build_tiny_llama(tmp / "tiny_llama", seed=0),
                  "tiny_qwen3_moe": build_tiny_moe(tmp / "tiny_moe", seed=0),
                  "smollm2_2blocks": smollm2_subset(tmp / "smol2", 2)}
        for mname, folder in models.items():
            for method in ("rtn", "gptq", "gsq"):
                for bits in ("2", "3"):
                    out = tmp / f"{mname}_{method}_{bits}"
                    cmd = ["--model", str(folder), "--out", str(out), "--method", method, "--bits", bits,
                           "--nsamples", "8", "--seqlen", "64", "--threads", str(args.threads), "--seed", "0"]
                    if method == "gsq":
                        cmd += ["--preset", "fast", "--gsq-nsamples", "4"]
                    rc = quantize_main(cmd)
                    if rc:
                        print(f"gsq-quantize {' '.join(cmd)} exited {rc}", file=sys.stderr)
                        return rc
                    result[out.name] = digests(out)
                    print(f"{out.name}: " + ", ".join(f"{k} {v[:12]}" for k, v in result[out.name].items()),
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
