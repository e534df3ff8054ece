"""The GSQ checkpoint format: packing, tensor names, config schema, version.

This module is the single owner of the on-disk format (see docs/FORMAT.md).
The offline quantizer (``quantize/``) writes through it and the vLLM plugin
(``gsq_vllm/``) reads through it. It depends on torch, safetensors and the
standard library only -- never on vLLM -- so the quantizer can import it.

Conventions used by every function here:

* A linear layer computes ``y = x @ W.T`` with ``W`` of shape ``[N, K]``
  (N = output features, K = input features), as ``torch.nn.Linear`` does.
* Codes ``q`` are *signed* integers on the symmetric grid of the bit-width
  (2-bit: -2..1, 3-bit: -4..3, ternary: -1..1), dtype int8, shape ``[N, K]``.
* Scales ``s`` have shape ``[N, K // G]``: one scale per output row and per
  group of ``G`` consecutive input features. ``W[n, k] = s[n, k // G] * q[n, k]``.
* On disk codes are stored *offset* (unsigned): ``u = q + 2**(b-1)`` with
  ``b`` the storage bit-width (2 for ternary), packed little-endian along K
  into int32 words (``qweight``, shape ``[N, K * b // 32]``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

FORMAT_VERSION = 1
QUANT_METHOD = "gsq"
SUPPORTED_BITS = (1.58, 2, 3)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
QWEIGHT_SUFFIX = "qweight"
SCALES_SUFFIX = "scales"
# Codes are packed in runs of PACK_BLOCK along K: 32 codes -> `b` int32 words.
PACK_BLOCK = 32
DEFAULT_SHARD_BYTES = 2 * 1024**3


class FormatError(ValueError):
    """A checkpoint, a config or a tensor does not follow the GSQ format."""


# --------------------------------------------------------------------------
# bit-widths and grids
# --------------------------------------------------------------------------


def normalize_bits(bits: float | int | str) -> float | int:
    """Return 2, 3 or 1.58 for any accepted spelling ("2", 2.0, "ternary"...)."""
    if isinstance(bits, str):
        b = bits.strip().lower()
        if b in ("ternary", "1.58", "1.5"):
            return 1.58
        try:
            bits = float(b)
        except ValueError:
            raise FormatError(f"bits must be one of 2, 3, 1.58 (ternary); got {bits!r}") from None
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        raise FormatError(f"bits must be one of 2, 3, 1.58 (ternary); got {bits!r}")
    if math.isclose(float(bits), 1.58, abs_tol=0.05):
        return 1.58
    if float(bits) in (2.0, 3.0):
        return int(bits)
    raise FormatError(f"bits must be one of 2, 3, 1.58 (ternary); got {bits!r}")


def storage_bits(bits: float | int) -> int:
    """Bits each code occupies on disk: ternary lives in 2-bit fields."""
    b = normalize_bits(bits)
    return 2 if b == 1.58 else int(b)


def grid_range(bits: float | int) -> tuple[int, int]:
    """Inclusive (qmin, qmax) of the symmetric signed grid.

    2-bit: (-2, 1); 3-bit: (-4, 3); ternary: (-1, 1).
    """
    b = normalize_bits(bits)
    if b == 1.58:
        return -1, 1
    return -(2 ** (b - 1)), 2 ** (b - 1) - 1


def code_offset(bits: float | int) -> int:
    """Offset added to signed codes before packing (2**(storage_bits-1))."""
    return 2 ** (storage_bits(bits) - 1)


def check_group_size(k: int, group_size: int, name: str = "layer") -> None:
    """Raise FormatError unless ``group_size`` is supported and divides ``k``."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise FormatError(
            f"group size {group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
        )
    if k % group_size != 0:
        raise FormatError(
            f"{name}: group size {group_size} does not divide its {k} input features; "
            f"choose a group size that divides {k} "
            f"(supported: {[g for g in SUPPORTED_GROUP_SIZES if k % g == 0] or 'none'})"
        )


# --------------------------------------------------------------------------
# packing (unsigned codes <-> int32 words, along the last dimension)
# --------------------------------------------------------------------------


def _check_unsigned(u: torch.Tensor, nbits: int) -> None:
    if u.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise FormatError(f"codes must be an integer tensor, got {u.dtype}")
    if u.shape[-1] % PACK_BLOCK != 0:
        raise FormatError(f"last dimension ({u.shape[-1]}) must be a multiple of {PACK_BLOCK}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**nbits):
        raise FormatError(f"unsigned {nbits}-bit codes must lie in [0, {2**nbits - 1}]")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Reinterpret uint32 values held in int64 as int32 bit patterns.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int2(u: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 2-bit codes ``[..., K]`` into int32 ``[..., K // 16]``.

    Code ``j`` of a word sits at bits ``[2j, 2j+2)``: word ``w`` holds codes
    ``16w .. 16w+15`` of the row.
    """
    _check_unsigned(u, 2)
    u = u.to(torch.int64).reshape(*u.shape[:-1], -1, 16)
    shifts = torch.arange(0, 32, 2, dtype=torch.int64, device=u.device)
    return _to_int32((u << shifts).sum(-1))


def unpack_int2(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: int32 ``[..., W]`` -> uint8 ``[..., 16 W]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 2, dtype=torch.int64, device=w.device)
    u = (w.unsqueeze(-1) >> shifts) & 0x3
    return u.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_int3(u: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 3-bit codes ``[..., K]`` densely into int32 ``[..., 3 K // 32]``.

    Every run of 32 codes forms a 96-bit little-endian bit stream (code ``i``
    at stream bits ``[3i, 3i+3)``) stored as 3 words: word ``t`` holds stream
    bits ``[32t, 32t+32)``. Codes 10 and 21 straddle two words.
    """
    _check_unsigned(u, 3)
    u = u.to(torch.int64).reshape(*u.shape[:-1], -1, PACK_BLOCK)
    pos = torch.arange(PACK_BLOCK, dtype=torch.int64, device=u.device) * 3
    words = []
    for t in range(3):
        lo = 32 * t
        # Bits of each code that fall inside word t, shifted into place
        # (left for codes starting inside the word, right for the one
        # straddling in from the previous word); clamps keep shifts < 64.
        left = (pos - lo).clamp(0, 40)
        right = (lo - pos).clamp(0, 40)
        part = (u << left) >> right
        inside = (pos + 3 > lo) & (pos < lo + 32)
        words.append(((part * inside) & 0xFFFFFFFF).sum(-1) & 0xFFFFFFFF)
    packed = torch.stack(words, dim=-1).reshape(*u.shape[:-2], -1)
    return _to_int32(packed)


def unpack_int3(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int3`: int32 ``[..., 3 B]`` -> uint8 ``[..., 32 B]``."""
    if words.shape[-1] % 3 != 0:
        raise FormatError(f"3-bit packed rows must have a multiple of 3 words, got {words.shape[-1]}")
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(*words.shape[:-1], -1, 3)
    # Assemble the 96-bit stream as low 64 bits + high 32 bits.
    lo64 = w[..., 0] | (w[..., 1] << 32)  # may overflow sign bit; masking below is exact
    hi32 = w[..., 2]
    pos = torch.arange(PACK_BLOCK, dtype=torch.int64, device=w.device) * 3
    from_lo = (lo64.unsqueeze(-1) >> pos.clamp(max=63)) & 0x7
    from_hi = (hi32.unsqueeze(-1) >> (pos - 64).clamp(min=0)) & 0x7
    # Code 21 spans bits 63..65: bit 63 from lo64, bits 64,65 from hi32.
    straddle = ((lo64 >> 63) & 0x1) | ((hi32 & 0x3) << 1)
    u = torch.where(pos < 61, from_lo, from_hi)
    u = torch.where(pos == 63, straddle.unsqueeze(-1), u)
    return u.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_codes(q: torch.Tensor, bits: float | int) -> torch.Tensor:
    """Signed codes ``[N, K]`` on the grid of ``bits`` -> int32 ``qweight``."""
    qmin, qmax = grid_range(bits)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise FormatError(f"codes for bits={bits} must lie in [{qmin}, {qmax}]")
    u = q.to(torch.int64) + code_offset(bits)
    return pack_int2(u) if storage_bits(bits) == 2 else pack_int3(u)


def unpack_codes(qweight: torch.Tensor, bits: float | int) -> torch.Tensor:
    """int32 ``qweight`` -> signed int8 codes ``[N, K]``."""
    if qweight.dtype != torch.int32:
        raise FormatError(f"qweight must be int32, got {qweight.dtype}")
    u = unpack_int2(qweight) if storage_bits(bits) == 2 else unpack_int3(qweight)
    return (u.to(torch.int16) - code_offset(bits)).to(torch.int8)


def packed_shape(n: int, k: int, bits: float | int) -> tuple[int, int]:
    """Shape of ``qweight`` for a ``[N, K]`` weight."""
    if k % PACK_BLOCK:
        raise FormatError(f"K={k} must be a multiple of {PACK_BLOCK}")
    return n, k * storage_bits(bits) // 32


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Signed codes ``[N, K]`` and scales ``[N, K//G]`` -> weight ``[N, K]``."""
    n, k = codes.shape
    if scales.shape != (n, k // group_size):
        raise FormatError(
            f"scales shape {tuple(scales.shape)} does not match codes {tuple(codes.shape)} "
            f"with group size {group_size}"
        )
    w = codes.to(torch.float32).reshape(n, k // group_size, group_size)
    w = w * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: float | int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``qweight`` + ``scales`` straight from a checkpoint -> weight ``[N, K]``."""
    return dequantize(unpack_codes(qweight, bits), scales, group_size, dtype)


# --------------------------------------------------------------------------
# names and config schema
# --------------------------------------------------------------------------


def qweight_name(prefix: str) -> str:
    """Tensor name of the packed codes of linear ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""
    return f"{prefix}.{QWEIGHT_SUFFIX}"


def scales_name(prefix: str) -> str:
    """Tensor name of the group scales of linear ``prefix``."""
    return f"{prefix}.{SCALES_SUFFIX}"


def is_excluded(prefix: str, modules_to_not_convert: Iterable[str]) -> bool:
    """True when ``prefix`` matches an entry of ``modules_to_not_convert``.

    An entry matches a module when it equals the full name, or equals one of
    its dotted components or dotted suffixes (``"lm_head"``, ``"self_attn"``,
    ``"mlp.gate"``), which is how HF and vLLM configs spell them.
    """
    parts = prefix.split(".")
    suffixes = {".".join(parts[i:]) for i in range(len(parts))}
    for entry in modules_to_not_convert:
        if entry == prefix or entry in parts or entry in suffixes:
            return True
        # Entries spanning several components ("self_attn.q_proj") anywhere in the name.
        if "." in entry and f".{entry}." in f".{prefix}.":
            return True
    return False


@dataclass
class GSQQuantConfig:
    """The ``quantization_config`` entry of a GSQ checkpoint's ``config.json``.

    ``bits``: 2, 3 or 1.58 (ternary, stored in 2-bit fields).
    ``group_size``: input features sharing one scale (32, 64, 128).
    ``modules_to_not_convert``: module names (or name components) kept in
    the model dtype; everything else that is a linear inside a transformer
    block is quantized.
    ``method``: which quantizer produced the codes (rtn, gptq, gsq): metadata.
    ``scale_dtype``: dtype of the stored scales ("bfloat16" or "float16").
    ``quantizer``: free-form metadata of the run (hyper-parameters, seed...).
    """

    bits: float | int
    group_size: int
    modules_to_not_convert: list[str] = field(default_factory=list)
    method: str = "gsq"
    scale_dtype: str = "bfloat16"
    format_version: int = FORMAT_VERSION
    quantizer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = normalize_bits(self.bits)
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise FormatError(
                f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}"
            )
        if self.format_version != FORMAT_VERSION:
            raise FormatError(
                f"format_version {self.format_version!r} is not supported by this gsq-vllm "
                f"(supports {FORMAT_VERSION}); re-quantize or upgrade gsq-vllm"
            )
        if self.scale_dtype not in ("bfloat16", "float16"):
            raise FormatError(f"scale_dtype must be bfloat16 or float16, got {self.scale_dtype!r}")
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise FormatError("modules_to_not_convert must be a list of module names")

    @property
    def storage_bits(self) -> int:
        return storage_bits(self.bits)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "storage_bits": self.storage_bits,
            "group_size": self.group_size,
            "sym": True,
            "pack": "int32-le-along-k",
            "scale_dtype": self.scale_dtype,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "method": self.method,
            "quantizer": dict(self.quantizer),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GSQQuantConfig":
        if not isinstance(d, Mapping):
            raise FormatError("quantization_config must be a JSON object")
        if d.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"quant_method must be {QUANT_METHOD!r}, got {d.get('quant_method')!r}")
        missing = [key for key in ("bits", "group_size", "format_version") if key not in d]
        if missing:
            raise FormatError(f"quantization_config is missing {missing}")
        if "storage_bits" in d and d["storage_bits"] != storage_bits(d["bits"]):
            raise FormatError(f"storage_bits {d['storage_bits']} does not match bits {d['bits']}")
        return cls(
            bits=d["bits"],
            group_size=d["group_size"],
            modules_to_not_convert=list(d.get("modules_to_not_convert") or []),
            method=d.get("method", "gsq"),
            scale_dtype=d.get("scale_dtype", "bfloat16"),
            format_version=d["format_version"],
            quantizer=dict(d.get("quantizer") or {}),
        )


# --------------------------------------------------------------------------
# reading and writing checkpoint folders
# --------------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
INDEX_FILE = "model.safetensors.index.json"


def read_model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict, with clear errors."""
    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise FormatError(f"{folder}: model folder does not exist")
    if not path.is_file():
        raise FormatError(f"{folder}: no config.json; not a HF model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def read_quant_config(folder: str | os.PathLike) -> GSQQuantConfig:
    """Read and validate ``quantization_config`` of a GSQ checkpoint folder."""
    cfg = read_model_config(folder)
    if "quantization_config" not in cfg:
        raise FormatError(f"{Path(folder) / 'config.json'}: no quantization_config; not a GSQ checkpoint")
    return GSQQuantConfig.from_dict(cfg["quantization_config"])


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a folder, following the index when there is one."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{index}: corrupt index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no .safetensors weight files")
    for f in files:
        if not f.is_file():
            raise FormatError(f"{folder}: weight file {f.name} listed in the index is missing")
    return files


def load_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a folder's safetensors files (no pickle), with clear errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return out


def check_quantized_tensors(
    prefix: str, qweight: torch.Tensor, scales: torch.Tensor, qcfg: GSQQuantConfig, k: int | None = None
) -> int:
    """Validate one quantized linear's tensors; return its K (input features)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise FormatError(f"{qweight_name(prefix)} must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, words = qweight.shape
    if (words * 32) % qcfg.storage_bits:
        raise FormatError(f"{qweight_name(prefix)}: {words} words is not a whole number of {qcfg.storage_bits}-bit codes")
    k_packed = words * 32 // qcfg.storage_bits
    if k is not None and k != k_packed:
        raise FormatError(f"{qweight_name(prefix)} holds K={k_packed}, expected {k}")
    check_group_size(k_packed, qcfg.group_size, prefix)
    if scales.dim() != 2 or tuple(scales.shape) != (n, k_packed // qcfg.group_size):
        raise FormatError(
            f"{scales_name(prefix)} has shape {tuple(scales.shape)}, expected {(n, k_packed // qcfg.group_size)}"
        )
    if not torch.isfinite(scales.float()).all():
        raise FormatError(f"{scales_name(prefix)} contains NaN or Inf")
    return k_packed


class CheckpointWriter:
    """Writes a HF-style GSQ checkpoint folder atomically.

    Tensors are written into a hidden temporary folder next to ``out_dir``;
    :meth:`finish` writes the index and config and renames the temporary
    folder onto ``out_dir`` (replacing an older checkpoint there only then).
    A run that dies before :meth:`finish` leaves no folder at ``out_dir``.

    >>> w = CheckpointWriter(out, base_config=hf_config_dict, quant_config=qcfg)
    >>> w.add_quantized("model.layers.0.mlp.up_proj", codes, scales)
    >>> w.add("model.embed_tokens.weight", emb)
    >>> w.finish(tokenizer_dir=src)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        base_config: Mapping[str, Any],
        quant_config: GSQQuantConfig,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.base_config = dict(base_config)
        self.quant_config = quant_config
        self.shard_bytes = shard_bytes
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add a tensor stored as-is (embeddings, norms, lm_head, ...)."""
        if name in self._names:
            raise FormatError(f"tensor {name} added twice")
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t
        nbytes = t.numel() * t.element_size()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def add_quantized(self, prefix: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Add linear ``prefix`` from signed codes ``[N, K]`` and scales ``[N, K//G]``."""
        qcfg = self.quant_config
        n, k = codes.shape
        check_group_size(k, qcfg.group_size, prefix)
        if not torch.isfinite(scales).all():
            raise FormatError(f"{prefix}: scales contain NaN or Inf")
        qweight = pack_codes(codes, qcfg.bits)
        s = scales.to(qcfg.torch_scale_dtype)
        check_quantized_tensors(prefix, qweight, s, qcfg, k)
        self.add(qweight_name(prefix), qweight)
        self.add(scales_name(prefix), s)

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        fname = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / fname), metadata={"format": "pt"})
        self._shards.append((fname, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self, tokenizer_dir: str | os.PathLike | None = None) -> Path:
        """Write shards, index and config; atomically move the folder into place."""
        try:
            self._flush()
            n = len(self._shards)
            weight_map = {}
            for i, (fname, names) in enumerate(self._shards):
                final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.rename(self.tmp_dir / fname, self.tmp_dir / final)
                weight_map.update({name: final for name in names})
            if n > 1:
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
            config = dict(self.base_config)
            config["quantization_config"] = self.quant_config.to_dict()
            (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            if tokenizer_dir is not None:
                for fname in TOKENIZER_FILES:
                    src = Path(tokenizer_dir) / fname
                    if src.is_file():
                        shutil.copy2(src, self.tmp_dir / fname)
            old = None
            if self.out_dir.exists():
                old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
                os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return self.out_dir
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary folder (idempotent)."""
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def checkpoint_bits_per_weight(folder: str | os.PathLike) -> tuple[float, int]:
    """(bytes*8 / weights) over all quantized linears of a checkpoint, and their weight count.

    Counts the bytes of every ``qweight`` and ``scales`` tensor as stored on
    disk; expected to be ``bits + 16 / G`` (``storage_bits`` for ternary).
    """
    from safetensors import safe_open

    qcfg = read_quant_config(folder)
    total_bits = 0
    weights = 0
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                if name.endswith("." + QWEIGHT_SUFFIX):
                    t = h.get_slice(name)
                    n, words = t.get_shape()
                    weights += n * words * 32 // qcfg.storage_bits
                    total_bits += n * words * 32
                elif name.endswith("." + SCALES_SUFFIX):
                    n, g = h.get_slice(name).get_shape()
                    total_bits += n * g * 16
    if weights == 0:
        raise FormatError(f"{folder}: no quantized tensors found")
    return total_bits / weights, weights
