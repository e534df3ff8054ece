"""Calibration activations ``[n, S, H]`` float32: on the run's device, or in a file on disk.

Per block the pipeline holds three of them at once: the block's inputs, its float outputs (the
targets), and the next block's inputs while they are computed. At the reference's defaults on
Llama-3.1-8B (4096 x 2048 tokens x 4096 features) each is 128 GiB, so above a byte budget they
live in raw float32 files in the work folder, mapped with ``numpy.memmap``; the page cache holds
what fits and every read copies the requested sequences to the device.

The block's inputs double as the resume state (``inputs-<block>.f32``): a finished block's
outputs are written to a temporary file and renamed to the next block's name; the state file
names the block to resume at, and the older inputs are deleted only after it is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch



class Activations:
    """float32 ``[n, S, H]`` on ``device`` (``path`` None) or in the raw file ``path``.

    Indexing (an int, a slice or a CPU int64 index tensor over the first dimension) returns a
    tensor on ``device``; assignment takes a tensor on any device.
    """

    def __init__(self, shape: tuple[int, int, int], device: torch.device, path: Path | None = None,
                 mode: str = "w+"):
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.path = Path(path) if path is not None else None
        if self.path is None:
            self.data = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        else:
            self._map = np.memmap(self.path, dtype=np.float32, mode=mode, shape=tuple(self.shape))
            self.data = torch.from_numpy(self._map)

    def first(self, n: int) -> "Activations":
        """A view of the first ``n`` sequences (same storage; do not close or save it)."""
        return self.rows(0, n)

    def rows(self, start: int, stop: int) -> "Activations":
        """A view of sequences ``start:stop`` (same storage; do not close or save it)."""
        view = object.__new__(Activations)
        view.data = self.data[start:stop]
        view.shape = torch.Size((view.data.shape[0], *self.shape[1:]))
        view.device, view.path = self.device, self.path
        return view

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.data.device)
        return self.data[idx].to(self.device)

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.data[idx] = value.to(self.data.device, torch.float32)

    def batches(self, batch_size: int):
        """(slice, device tensor) pairs covering the first dimension in order."""
        for b in range(0, len(self), batch_size):
            sl = slice(b, min(b + batch_size, len(self)))
            yield sl, self[sl]

    def save(self, path: Path) -> None:
        """Write the data as raw float32 to ``path`` (temporary file, then rename)."""
        tmp = path.with_name(f".{path.name}.tmp")
        if self.on_disk:
            self._map.flush()
            if self.path.resolve() != path.resolve():
                with open(tmp, "wb") as f:
                    for b in range(len(self)):
                        f.write(self._map[b].tobytes())
                os.replace(tmp, path)
            return
        self.data.cpu().numpy().tofile(tmp)
        os.replace(tmp, path)

    def close(self) -> None:
        """Drop the mapping (the file stays) or the device memory."""
        if self.on_disk:
            self._map.flush()
            del self._map
        self.data = None


class ActivationSpace:
    """Makes the pipeline's activation tensors: in device memory while ``held`` of them (three;
    four for a model with sparse blocks, quantize/moe_block.py) fit in ``budget_bytes``, else as
    files in ``folder`` (see the module docstring)."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device, folder: Path,
                 budget_bytes: int | None, held: int = 3):
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.folder = Path(folder)
        self.bytes_each = 4 * int(np.prod(self.shape))
        self.on_disk = budget_bytes is not None and held * self.bytes_each > budget_bytes

    def new(self, name: str, shape: tuple[int, int, int] | None = None) -> Activations:
        """An uninitialised tensor (the calibration shape unless ``shape`` is given: an MoE expert's
        routed rows); on disk as ``<folder>/.<name>.tmp``."""
        shape = tuple(shape) if shape is not None else self.shape
        if not self.on_disk:
            return Activations(shape, self.device)
        return Activations(shape, self.device, self.folder / f".{name}.tmp")

    def inputs_path(self, block: int) -> Path:
        return self.folder / f"inputs-{block:05d}.f32"

    def load_inputs(self, block: int) -> Activations:
        """Block ``block``'s saved inputs (ValueError if the file's size does not match)."""
        path = self.inputs_path(block)
        if path.stat().st_size != self.bytes_each:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {self.bytes_each}")
        if self.on_disk:
            return Activations(self.shape, self.device, path, mode="r+")
        a = Activations(self.shape, self.device)
        a[:] = torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(self.shape))
        return a

    def commit_inputs(self, x: Activations, block: int) -> Activations:
        """Save ``x`` as block ``block``'s inputs; returns it (re-mapped at its new name when
        on disk)."""
        dest = self.inputs_path(block)
        if not x.on_disk:
            x.save(dest)
            return x
        x._map.flush()
        src = x.path
        x.close()
        os.replace(src, dest)
        return Activations(self.shape, self.device, dest, mode="r+")

    def discard(self, a: Activations) -> None:
        """Free ``a`` and delete its file if it is a temporary one."""
        path = a.path
        a.close()
        if path is not None and path.name.startswith("."):
            path.unlink(missing_ok=True)


def default_budget(device: torch.device) -> int:
    """Half of what is free now: device memory for CUDA, MemAvailable for the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30
