"""The harness the benchmarks share: their common flags, the machine they ran on, and their results
JSON, read back to merge into and written whole (temp file, then rename) so an interrupted run
leaves no half file."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # benchmarks/results/, from any working directory


def add_common_args(p: argparse.ArgumentParser, out: str | None, *, flag: str = "--json",
                    threads: int | None = None) -> None:
    """The results file (``flag``, ``--json`` or ``--out``, default ``out``) and, when ``threads`` is
    given, ``--threads`` with that default."""
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help=f"threads (default {threads})")
    p.add_argument(flag, default=out, help=f"results JSON (default {out})")


def cpu_name() -> str:
    """/proc/cpuinfo's model name (platform.processor() where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    """/proc/cpuinfo's flags of the first CPU (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(**extra) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), **extra}


def machine_line() -> str:
    """The machine as one string: CPU model, the vector extensions the kernels can use, CPU count,
    e.g. 'AMD EPYC 7B13 (avx2, fma), 2 CPUs'."""
    name = cpu_name() or platform.machine()
    ext = [f for f in ("avx512f", "avx2", "fma") if f in cpu_flags()]
    return f"{name} ({', '.join(ext)}), {os.cpu_count()} CPUs" if ext else f"{name}, {os.cpu_count()} CPUs"


def read_json(path) -> dict:
    """The results already in ``path`` (a run adds its own to them), {} when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(obj, path, indent: int = 2) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)
    print(f"wrote {path}")
