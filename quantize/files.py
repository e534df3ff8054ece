"""Work-folder files written so a killed run never leaves half a file (temporary file, then rename),
and handing freed memory back between blocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` to the safetensors file ``path``, atomically."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def atomic_json(obj, path: Path) -> None:
    """``obj`` to the JSON file ``path`` (sorted keys), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def release_host_memory() -> None:
    """Give freed heap back to the OS. Without it glibc keeps each block's freed buffers in
    fragmented arenas and a 30-block SmolLM2 run's RSS creeps from 0.51 to 0.88 GiB (measured);
    with it, it stays flat. No-op where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
