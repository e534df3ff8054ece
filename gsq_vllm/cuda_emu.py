"""The CUDA GEMM's real source, run on the CPU: ``torch.ops.gsq.gemm_emulated``.

``csrc/gsq_gemm.cu`` -- kernels and host code (launch plan, split-K
workspace) -- is compiled by g++ as C++ together with the emulator runtime
in ``csrc/emu/`` (CUDA threads as fibers, warp-collective PTX instructions
computed from the PTX ISA fragment layouts, cp.async landing only at its
wait; see docs/EMULATOR.md). The result is a plain shared library, built on
first use and cached by source hash, called through ctypes.

``gemm_emulated`` takes exactly what ``torch.ops.gsq.gemm`` takes:

* ``a`` fp16/bf16 ``[M, K]``; ``b`` int32 ``[N/64, (K/64)*128*bits]`` and
  ``s`` ``[K/G, N]`` (dtype of ``a``), both from :func:`gsq_vllm.cuda_gemm.repack`;
* ``bits`` the storage width (2 or 3), ``group_size`` 32, 64 or 128, ``n``, ``k``;

and returns ``c`` ``[M, N]`` in the dtype of ``a``. It is slow (thousands of
fibers per call) and meant for tests and for ``GSQ_KERNEL=cuda-emu`` serving
of tiny models. Emulation options (:class:`EmuOptions`) come from
:func:`set_options` / :func:`options` or the environment: ``GSQ_EMU_SMS``
(SM count the launch plan sees, default 132), ``GSQ_EMU_SMEM_PER_SM`` (its
shared memory per SM, default 228 KiB), ``GSQ_EMU_ORDER``
(forward|reverse|random), ``GSQ_EMU_SEED``, ``GSQ_EMU_RESIDENT`` (blocks
interleaved at a time); ``GSQ_EMU_CSRC`` runs the kernel of another source
tree (a modified copy of csrc/) in place of the repository's.

Needs g++ (C++20) and the source tree (an editable install).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ORDERS = ("forward", "reverse", "random")
CXXFLAGS = [
    "-std=c++20", "-O2", "-g", "-fPIC", "-shared",
    # the kernels type-pun registers like CUDA code does; the runtime changes rounding modes
    "-fno-strict-aliasing", "-frounding-math", "-U_FORTIFY_SOURCE",
    "-Wall", "-Wno-unknown-pragmas",
]


class EmulatorError(RuntimeError):
    """The emulated kernel failed: a fault, a race the emulator caught, a bad launch."""


@dataclasses.dataclass(frozen=True)
class EmuOptions:
    sms: int = 132
    smem_per_sm: int = 228 * 1024  # H100; A100: 164 KiB
    order: str = "forward"
    seed: int = 0
    resident_blocks: int = 1
    dry_run: bool = False  # record the launches (grid, block, shared memory), run no kernel

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.sms < 1 or self.resident_blocks < 1:
            raise ValueError("sms and resident_blocks must be >= 1")

    @classmethod
    def from_env(cls) -> "EmuOptions":
        env = os.environ
        return cls(sms=int(env.get("GSQ_EMU_SMS", 132)), smem_per_sm=int(env.get("GSQ_EMU_SMEM_PER_SM", 228 * 1024)),
                   order=env.get("GSQ_EMU_ORDER", "forward"),
                   seed=int(env.get("GSQ_EMU_SEED", 0)), resident_blocks=int(env.get("GSQ_EMU_RESIDENT", 1)))


class _COptions(ctypes.Structure):
    _fields_ = [("sms", ctypes.c_int), ("smem_per_sm", ctypes.c_int), ("order", ctypes.c_int),
                ("seed", ctypes.c_ulonglong), ("resident_blocks", ctypes.c_int), ("dry_run", ctypes.c_int)]


class _CStats(ctypes.Structure):
    _fields_ = [(f, ctypes.c_longlong) for f in ("blocks", "threads", "switches", "mma", "ldmatrix", "cp_async",
                                                 "barriers")]


# ---------------------------------------------------------------- building


def _runtime_sources(csrc: Path) -> list[Path]:
    return sorted((csrc / "emu").glob("*.cpp"))


def _hashed_inputs(csrc: Path, kernel_source: Path) -> list[Path]:
    headers = sorted(p for p in csrc.rglob("*") if p.suffix in (".cuh", ".h"))
    return _runtime_sources(csrc) + headers + [kernel_source]


def cache_dir() -> Path:
    return Path(os.environ.get("GSQ_EMU_CACHE", Path.home() / ".cache" / "gsq-vllm" / "emu"))


def _compile(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` writing a temporary file beside ``out`` (its last argument), then rename it into
    place, so a concurrent or killed build never leaves a half-written ``out``."""
    fd, tmp = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(fd)
    res = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise EmulatorError(f"building the CUDA emulator failed:\n{res.stderr[-6000:]}")
    os.replace(tmp, out)


def _runtime_objects(csrc: Path, cxxflags: list[str]) -> list[Path]:
    """The emulator runtime (csrc/emu/*.cpp) compiled once per source tree and flags, and cached:
    it is ~40 % of a library's compile time and every kernel built over the same runtime (the
    mutation test's 19 libraries, the probe kernels) links the same objects."""
    inputs = _runtime_sources(csrc) + sorted(p for p in (csrc / "emu").rglob("*.h")) + [csrc / "gsq_gemm.h"]
    h = hashlib.sha256(" ".join(cxxflags).encode())
    for p in inputs:
        h.update(str(p.relative_to(csrc)).encode())
        h.update(p.read_bytes())
    out_dir = cache_dir() / f"runtime-{h.hexdigest()[:16]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = [f for f in cxxflags if f != "-shared"]
    objects = []
    for src in _runtime_sources(csrc):
        obj = out_dir / f"{src.stem}.o"
        if not obj.exists():
            _compile(["g++", *flags, f"-I{csrc}", f"-I{csrc / 'emu' / 'include'}", "-c", str(src)], obj)
        objects.append(obj)
    return objects


def build_library(kernel_source: Path | None = None, out_dir: Path | None = None,
                  csrc: Path | None = None, cxxflags: list[str] | None = None) -> Path:
    """Compile the emulator with ``kernel_source`` (default ``csrc/gsq_gemm.cu``) into a shared
    library and return its path. ``csrc``: the source tree whose headers and emulator runtime
    are used (default the repository's; a mutated copy for the mutation test). ``cxxflags``:
    compiler flags in place of CXXFLAGS (the mutation test builds at -O1 without -g: half the
    compile time, the same verdicts). Cached by a hash of every source and the flags; the file
    appears atomically, so concurrent builds are safe.
    Raises EmulatorError on a compile error."""
    csrc = Path(csrc or CSRC).resolve()
    kernel_source = Path(kernel_source or csrc / "gsq_gemm.cu").resolve()
    if not (csrc / "emu" / "runtime.cpp").exists():
        raise EmulatorError(f"emulator sources not found under {csrc} (needs the source tree)")
    cxxflags = list(CXXFLAGS if cxxflags is None else cxxflags)
    h = hashlib.sha256(" ".join(cxxflags).encode())
    for p in _hashed_inputs(csrc, kernel_source):
        h.update(str(p.relative_to(csrc) if p.is_relative_to(csrc) else p.name).encode())
        h.update(p.read_bytes())
    out_dir = Path(out_dir) if out_dir else cache_dir() / h.hexdigest()[:16]
    lib = out_dir / "libgsq_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = _runtime_objects(csrc, cxxflags)
    _compile(["g++", *cxxflags, f"-I{csrc}", f"-I{csrc / 'emu' / 'include'}",
              "-x", "c++", str(kernel_source), "-x", "none", *map(str, objects)], lib)
    return lib


# ---------------------------------------------------------------- calling


class Emulator:
    """ctypes face of one built emulator library (one kernel source)."""

    def __init__(self, lib_path: Path):
        self.path = Path(lib_path)
        self._lib = ctypes.CDLL(str(self.path))
        f = self._lib.gsq_emu_gemm
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t] * 4 + [ctypes.c_int] * 6 + [
            ctypes.POINTER(_COptions), ctypes.POINTER(_CStats), ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
            ctypes.c_size_t]
        p = self._lib.gsq_emu_plan
        p.restype = None
        p.argtypes = [ctypes.c_int] * 7 + [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_size_t)]
        h = self._lib.gsq_emu_half_op
        h.restype = ctypes.c_uint
        h.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_double, ctypes.c_int]

    def plan(self, m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132,
             smem_per_sm: int = 228 * 1024) -> dict:
        """The launch plan of csrc/gsq_gemm.cu's host code (gsq_gemm.h, GsqGemmPlan)."""
        out = (ctypes.c_int * 5)()
        nbytes = (ctypes.c_size_t * 2)()
        self._lib.gsq_emu_plan(m, n, k, bits, group_size, sms, smem_per_sm, out, nbytes)
        return dict(token_tiles=out[0], grid_x=out[1], grid_y=out[2], splits=out[3], warps=out[4],
                    workspace_bytes=nbytes[0], counter_bytes=nbytes[1])

    def gemm(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, n: int,
             k: int, opts: EmuOptions | None = None) -> tuple[torch.Tensor, dict]:
        """Run the kernel's host code and kernels; returns (c [M, N], counters). Arguments are
        passed as given (checks are the kernel's own); raises EmulatorError on any failure.
        counters["launches"] lists the kernel launches the host code made, each a dict with
        kernel (demangled name), grid, block and smem (dynamic shared memory bytes)."""
        opts = opts or EmuOptions()
        a, b, s = (t.detach().contiguous().cpu() for t in (a, b, s))
        m = a.shape[0]
        c = torch.empty(m, n, dtype=a.dtype)
        err = ctypes.create_string_buffer(8192)
        launches = ctypes.create_string_buffer(16384)
        stats = _CStats()
        copts = _COptions(opts.sms, opts.smem_per_sm, ORDERS.index(opts.order), opts.seed, opts.resident_blocks,
                          int(opts.dry_run))
        rc = self._lib.gsq_emu_gemm(
            a.data_ptr(), a.numel() * a.element_size(), b.data_ptr(), b.numel() * b.element_size(),
            s.data_ptr(), s.numel() * s.element_size(), c.data_ptr(), c.numel() * c.element_size(),
            m, n, k, bits, group_size, int(a.dtype == torch.bfloat16), ctypes.byref(copts), ctypes.byref(stats),
            launches, len(launches), err, len(err))
        if rc != 0:
            raise EmulatorError(err.value.decode(errors="replace"))
        counters = {f: getattr(stats, f) for f, _ in _CStats._fields_}
        counters["launches"] = []
        for line in launches.value.decode().splitlines():
            name, grid, block, smem = line.split("|")
            counters["launches"].append(dict(kernel=name, grid=tuple(map(int, grid.split(","))),
                                             block=tuple(map(int, block.split(","))), smem=int(smem)))
        return c, counters

    def half_op(self, op: str, a: int = 0, b: int = 0, c: int = 0, x: float = 0.0, bf16: bool = False) -> int:
        """The emulator's own 16-bit arithmetic on bit patterns (for its tests): op in
        float2half (x as float32), mul, add, sub, fma, round (x as double)."""
        ops = ("float2half", "mul", "add", "sub", "fma", "round")
        return self._lib.gsq_emu_half_op(ops.index(op), a, b, c, x, int(bf16))


_default: Emulator | None = None
_options: EmuOptions | None = None
calls = 0  # gemm_emulated calls in this process (lets tests see which path served)


def default_emulator() -> Emulator:
    """The emulator of the kernel in the repository's csrc/, or in the source tree named by
    ``GSQ_EMU_CSRC`` (a copy of csrc/ holding an experimental variant); built on first use."""
    global _default
    if _default is None:
        _default = Emulator(build_library(csrc=os.environ.get("GSQ_EMU_CSRC") or None))
    return _default


def current_options() -> EmuOptions:
    return _options if _options is not None else EmuOptions.from_env()


def set_options(opts: EmuOptions | None) -> None:
    """Options for gemm_emulated calls in this process (None: back to the environment's)."""
    global _options
    _options = opts


@contextlib.contextmanager
def options(**kw):
    """``with options(sms=8, order="random", seed=3): ...``"""
    global _options
    old = _options
    _options = dataclasses.replace(current_options(), **kw)
    try:
        yield _options
    finally:
        _options = old


@torch.library.custom_op("gsq::gemm_emulated", mutates_args=())
def gemm_emulated(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, n: int,
                  k: int) -> torch.Tensor:
    """``torch.ops.gsq.gemm`` run by the emulator on CPU tensors (same arguments, same result)."""
    from gsq_vllm.cuda_gemm import check_gemm_args

    global calls
    check_gemm_args(a, b, s, bits, group_size, n, k)
    c, _ = default_emulator().gemm(a, b, s, bits, group_size, n, k, current_options())
    calls += 1
    return c


@gemm_emulated.register_fake
def _(a, b, s, bits, group_size, n, k):
    return a.new_empty(a.shape[0], n)
