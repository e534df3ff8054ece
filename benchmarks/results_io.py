"""What every benchmark that writes ``benchmarks/results/*.json`` shares: the machine it ran on,
and writing the JSON whole (temp file, then rename) so an interrupted run leaves no half file."""

from __future__ import annotations

import json
import os
import platform


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


def machine_info(**extra) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), **extra}


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")
