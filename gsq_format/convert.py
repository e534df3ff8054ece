"""Quantized checkpoints in and out: ``gsq-convert``.

Reads three formats into one in-memory form (:class:`QuantizedCheckpoint`:
signed codes ``[N, K]`` and scales ``[N, K/G]`` per linear, plus every other
tensor) and writes two:

* **in**: our own GSQ format; **compressed-tensors** ``pack-quantized``
  (symmetric int, ``strategy: group``, num_bits 2, 3 or 4); **GPTQ**
  (``quant_method: gptq``, ``sym``, no act-order permutation, bits 2, 3 or 4,
  ``checkpoint_format`` gptq (stored zero point = zero - 1) or gptq_v2);
* **out**: GSQ (the storage width chosen from the codes: a 4-bit container
  holding only 2-bit values becomes a true 2-bit checkpoint), or
  compressed-tensors ``pack-quantized`` for stock vLLM (num_bits = our
  storage bits, or a wider ``container_bits``, e.g. 4 for kernels that only
  take 4-bit).

Every conversion is lossless -- the codes and the scales are carried over
exactly, so every dequantized weight equals the source's -- or it stops with
one error naming the tensor (asymmetric zero points, an act-order
permutation, codes outside the 2/3-bit grid, a group size the format cannot
take, missing or corrupt tensors) and leaves nothing at the output.

    gsq-convert IN OUT                          # compressed-tensors / GPTQ / GSQ -> GSQ
    gsq-convert IN OUT --to compressed-tensors [--container-bits 4]

Imports no vLLM; packing for compressed-tensors goes through the
``compressed-tensors`` library's own helpers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gsq_format.format import (
    QUANT_METHOD,
    SUPPORTED_GROUP_SIZES,
    TOKENIZER_FILES,
    CheckpointWriter,
    FormatError,
    GSQQuantConfig,
    check_group_size,
    grid_range,
    load_tensors,
    read_model_config,
    storage_bits,
    unpack_codes,
    unpack_int3,
)

CT_FORMAT = "pack-quantized"


@dataclass
class QuantizedCheckpoint:
    """A quantized model in memory, whatever format it came from.

    ``linears``: prefix -> (codes int8 ``[N, K]`` signed, scales ``[N, K/G]``
    in ``scale_dtype``); ``tensors``: every other tensor by its name;
    ``config``: config.json without its quantization_config; ``bits``: the
    format's declared width (2, 3, 4 or 1.58).
    """

    source: str
    folder: Path
    config: dict
    bits: float | int
    group_size: int
    scale_dtype: torch.dtype
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def fitting_bits(self) -> float | int:
        """The narrowest of our widths whose grid holds every code (ternary only if declared)."""
        if not self.linears:
            raise FormatError(f"{self.folder}: no quantized linear layers found")
        lo = min(int(c.min()) for c, _ in self.linears.values())
        hi = max(int(c.max()) for c, _ in self.linears.values())
        if self.bits == 1.58 and grid_range(1.58)[0] <= lo and hi <= grid_range(1.58)[1]:
            return 1.58
        for bits in (2, 3):
            qmin, qmax = grid_range(bits)
            if qmin <= lo and hi <= qmax:
                return bits
        worst = max(self.linears, key=lambda p: int(self.linears[p][0].abs().max()))
        raise FormatError(f"{worst}: codes span [{lo}, {hi}], outside the 3-bit grid [-4, 3]; "
                          "only 2- and 3-bit values can be converted losslessly")

    def unquantized_linears(self) -> list[str]:
        """Prefixes of the 2-D weights left in float (lm_head, ignored layers, embeddings)."""
        return sorted(n[: -len(".weight")] for n, t in self.tensors.items() if n.endswith(".weight") and t.dim() == 2)


# ------------------------------------------------------------------ reading


def read_checkpoint(folder: str | Path) -> QuantizedCheckpoint:
    """Read a GSQ, compressed-tensors pack-quantized or GPTQ checkpoint folder (format from its
    config.json). Raises FormatError naming the file or tensor for anything it cannot take."""
    folder = Path(folder)
    cfg = read_model_config(folder)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(f"{folder / 'config.json'}: no quantization_config; not a quantized checkpoint")
    base = {k: v for k, v in cfg.items() if k != "quantization_config"}
    method = qc.get("quant_method")
    tensors = load_tensors(folder)
    if method == QUANT_METHOD:
        return _read_gsq(folder, base, qc, tensors)
    if method == "compressed-tensors":
        return _read_compressed_tensors(folder, base, qc, tensors)
    if method == "gptq":
        return _read_gptq(folder, base, qc, tensors)
    raise FormatError(f"{folder}: quant_method {method!r} is not supported "
                      "(gsq, compressed-tensors pack-quantized, gptq)")


def _take(tensors: dict, name: str, what: str) -> torch.Tensor:
    if name not in tensors:
        raise FormatError(f"{name} is missing ({what})")
    return tensors.pop(name)


def _group_size(g, where: str) -> int:
    if not isinstance(g, int) or g not in SUPPORTED_GROUP_SIZES:
        raise FormatError(f"{where}: group size {g!r} cannot be converted (supported: {SUPPORTED_GROUP_SIZES}; "
                          "per-channel (-1) and other sizes are not)")
    return g


def _read_gsq(folder, base, qc, tensors) -> QuantizedCheckpoint:
    fmt = GSQQuantConfig.from_dict(qc)
    ck = QuantizedCheckpoint("gsq", folder, base, fmt.bits, fmt.group_size, fmt.torch_scale_dtype)
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        qweight = tensors.pop(name)
        scales = _take(tensors, f"{prefix}.scales", "the scales of a quantized linear")
        codes = unpack_codes(qweight, fmt.bits)
        _check_scales(prefix, codes, scales, fmt.group_size)
        ck.linears[prefix] = (codes, scales)
    ck.tensors = tensors
    return ck


def _check_scales(prefix: str, codes: torch.Tensor, scales: torch.Tensor, g: int) -> None:
    n, k = codes.shape
    check_group_size(k, g, prefix)
    if tuple(scales.shape) != (n, k // g):
        raise FormatError(f"{prefix}: scales have shape {tuple(scales.shape)}, expected {(n, k // g)}")
    if not torch.isfinite(scales.float()).all():
        raise FormatError(f"{prefix}: scales contain NaN or Inf")


def _read_compressed_tensors(folder, base, qc, tensors) -> QuantizedCheckpoint:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    where = f"{folder / 'config.json'} quantization_config"
    groups = qc.get("config_groups") or {}
    if not groups:
        raise FormatError(f"{where}: no config_groups")
    schemes = []
    for gname, scheme in groups.items():
        w = scheme.get("weights") or {}
        fmt = scheme.get("format") or qc.get("format")
        if fmt != CT_FORMAT:
            raise FormatError(f"{where}: group {gname} has format {fmt!r}; only {CT_FORMAT!r} can be converted")
        if scheme.get("input_activations") is not None:
            raise FormatError(f"{where}: group {gname} quantizes activations; only weight-only schemes convert")
        if w.get("type", "int") != "int" or not w.get("symmetric", False):
            raise FormatError(f"{where}: group {gname} is not symmetric int "
                              f"(type {w.get('type')!r}, symmetric {w.get('symmetric')!r}); asymmetric weights "
                              "cannot be represented exactly")
        if w.get("strategy") != "group":
            raise FormatError(f"{where}: group {gname} uses strategy {w.get('strategy')!r}; only 'group' converts")
        if w.get("actorder") not in (None, "static"):
            raise FormatError(f"{where}: group {gname} uses actorder {w.get('actorder')!r} (a column permutation)")
        if w.get("num_bits") not in (2, 3, 4):
            raise FormatError(f"{where}: group {gname} has num_bits {w.get('num_bits')!r} (2, 3 or 4 convert)")
        schemes.append((w["num_bits"], _group_size(w.get("group_size"), f"{where} group {gname}")))
    if len(set(schemes)) != 1:
        raise FormatError(f"{where}: config groups differ in bits / group size {sorted(set(schemes))}; "
                          "one scheme per checkpoint converts")
    num_bits, g = schemes[0]
    scale_dtype = None
    ck = QuantizedCheckpoint("compressed-tensors", folder, base, num_bits, g, torch.bfloat16)
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        prefix = name[: -len(".weight_packed")]
        packed = tensors.pop(name)
        for extra, why in (("weight_zero_point", "asymmetric zero points"), ("weight_g_idx", "an act-order permutation")):
            if f"{prefix}.{extra}" in tensors:
                raise FormatError(f"{prefix}.{extra}: {why} cannot be represented exactly in GSQ")
        scales = _take(tensors, f"{prefix}.weight_scale", "the scales of a quantized linear")
        shape = _take(tensors, f"{prefix}.weight_shape", "the unpacked shape of a quantized linear")
        if packed.dtype != torch.int32 or packed.dim() != 2 or shape.numel() != 2:
            raise FormatError(f"{name}: expected a 2-D int32 tensor and a 2-element weight_shape")
        n, k = (int(x) for x in shape.tolist())
        if packed.shape[0] != n or packed.shape[1] != -(-k // (32 // num_bits)):
            raise FormatError(f"{name}: shape {tuple(packed.shape)} does not hold [{n}, {k}] {num_bits}-bit values")
        codes = unpack_from_int32(packed, num_bits, torch.Size([n, k]))
        _check_scales(prefix, codes, scales, g)
        if scale_dtype is not None and scales.dtype != scale_dtype:
            raise FormatError(f"{prefix}.weight_scale: {scales.dtype}, other layers use {scale_dtype}")
        scale_dtype = scales.dtype
        ck.linears[prefix] = (codes.to(torch.int8), scales)
    if scale_dtype not in (None, torch.bfloat16, torch.float16):
        raise FormatError(f"{folder}: scales are {scale_dtype}; GSQ stores bfloat16 or float16 scales")
    ck.scale_dtype = scale_dtype or torch.bfloat16
    ck.tensors = tensors
    return ck


def _unpack_along(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """GPTQ packing along ``dim`` (0: qweight along K, 1: qzeros along N): unsigned codes int64.
    2/4-bit: value j of a word at bits ``bits * j``; 3-bit: runs of 32 values in 3 words as one
    96-bit little-endian stream (AutoGPTQ's layout, the same as GSQ's dense int3)."""
    w = words if dim == 1 else words.t()  # pack along the last dim
    w = w.contiguous()
    if bits == 3:
        u = unpack_int3(w)
    else:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64) * bits
        u = ((w.to(torch.int64).unsqueeze(-1) & 0xFFFFFFFF) >> shifts) & ((1 << bits) - 1)
        u = u.reshape(w.shape[0], -1)
    u = u[:, :count].to(torch.int64)
    return u if dim == 1 else u.t()


def _read_gptq(folder, base, qc, tensors) -> QuantizedCheckpoint:
    where = f"{folder / 'config.json'} quantization_config"
    bits = qc.get("bits")
    if bits not in (2, 3, 4):
        raise FormatError(f"{where}: bits {bits!r} (2, 3 or 4 convert)")
    g = _group_size(qc.get("group_size"), where)
    if qc.get("sym") is False:
        raise FormatError(f"{where}: sym is false; asymmetric GPTQ cannot be represented exactly in GSQ")
    version = qc.get("checkpoint_format", "gptq")
    if version not in ("gptq", "gptq_v2"):
        raise FormatError(f"{where}: checkpoint_format {version!r} (gptq or gptq_v2 convert)")
    desc_act = bool(qc.get("desc_act", False))
    mid = 1 << (bits - 1)
    stored_zero = mid - 1 if version == "gptq" else mid  # v1 stores zero - 1
    ck = QuantizedCheckpoint("gptq", folder, base, bits, g, torch.float16)
    scale_dtype = None
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        qweight = tensors.pop(name)
        scales = _take(tensors, f"{prefix}.scales", "the scales of a quantized linear")
        qzeros = _take(tensors, f"{prefix}.qzeros", "the zero points of a quantized linear")
        g_idx = tensors.pop(f"{prefix}.g_idx", None)
        if qweight.dtype != torch.int32 or qweight.dim() != 2 or scales.dim() != 2:
            raise FormatError(f"{name}: expected 2-D int32 qweight and 2-D scales")
        groups, n = scales.shape
        k = groups * g
        if qweight.shape != (k * bits // 32, n):
            raise FormatError(f"{name}: shape {tuple(qweight.shape)} does not hold [K={k}, N={n}] {bits}-bit codes")
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
            raise FormatError(f"{prefix}.g_idx: columns are permuted (act-order); only g_idx = k // group_size "
                              "converts exactly")
        if g_idx is None and desc_act:
            raise FormatError(f"{where}: desc_act is true but {prefix}.g_idx is missing")
        zeros = _unpack_along(qzeros, bits, n, dim=1)
        if zeros.shape != (groups, n) or not bool((zeros == stored_zero).all()):
            found = sorted(set(zeros.unique().tolist()))[:8]
            raise FormatError(f"{prefix}.qzeros: zero points {found} are not the symmetric midpoint "
                              f"(stored {stored_zero} in {version}); asymmetric GPTQ cannot be represented exactly")
        u = _unpack_along(qweight, bits, k, dim=0)  # [K, N]
        codes = (u - mid).t().contiguous().to(torch.int8)
        s = scales.t().contiguous()
        _check_scales(prefix, codes, s, g)
        scale_dtype = s.dtype
        ck.linears[prefix] = (codes, s)
    if scale_dtype not in (None, torch.bfloat16, torch.float16):
        raise FormatError(f"{folder}: scales are {scale_dtype}; GSQ stores bfloat16 or float16 scales")
    ck.scale_dtype = scale_dtype or torch.float16
    ck.tensors = tensors
    return ck


# ------------------------------------------------------------------ writing


def write_gsq(ck: QuantizedCheckpoint, out: str | Path) -> Path:
    """Write ``ck`` as a GSQ checkpoint at ``out`` (atomically), at the narrowest width that holds
    its codes. Returns the folder."""
    bits = ck.fitting_bits()
    qcfg = GSQQuantConfig(
        bits=bits, group_size=ck.group_size, modules_to_not_convert=ck.unquantized_linears(),
        method=f"import:{ck.source}", scale_dtype=str(ck.scale_dtype).removeprefix("torch."),
        quantizer={"source_format": ck.source, "source_bits": ck.bits, "source": str(ck.folder)},
    )
    writer = CheckpointWriter(out, base_config=ck.config, quant_config=qcfg)
    try:
        for prefix in sorted(ck.linears):
            codes, scales = ck.linears[prefix]
            writer.add_quantized(prefix, codes, scales)
        for name in sorted(ck.tensors):
            writer.add(name, ck.tensors[name])
        return writer.finish(tokenizer_dir=ck.folder)
    except BaseException:
        writer.abort()
        raise


def write_compressed_tensors(ck: QuantizedCheckpoint, out: str | Path, container_bits: int | None = None) -> Path:
    """Write ``ck`` as a compressed-tensors pack-quantized checkpoint (symmetric int, group
    strategy) that stock vLLM loads without this plugin. ``container_bits``: num_bits to store
    (default: the storage width of the codes; 4 for kernels that only take 4-bit)."""
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    bits = ck.fitting_bits()
    nb = container_bits or storage_bits(bits)
    if nb not in (2, 3, 4, 8) or nb < storage_bits(bits):
        raise FormatError(f"container bits {nb} cannot hold {bits}-bit codes (choose {storage_bits(bits)}..8)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        state = {}
        for prefix, (codes, scales) in ck.linears.items():
            state[f"{prefix}.weight_packed"] = pack_to_int32(codes.to(torch.int8), nb)
            state[f"{prefix}.weight_scale"] = scales.contiguous()
            state[f"{prefix}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        state.update({k: v.contiguous() for k, v in ck.tensors.items()})
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        qc = QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(num_bits=nb, type="int", symmetric=True, strategy="group",
                                         group_size=ck.group_size))},
            ignore=ck.unquantized_linears(), format=CT_FORMAT, quantization_status="compressed",
        )
        config = dict(ck.config)
        config["quantization_config"] = {
            "version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude=["quant_method"]),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for fname in TOKENIZER_FILES:
            if (ck.folder / fname).is_file():
                shutil.copy2(ck.folder / fname, tmp / fname)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gsq-convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint folder: GSQ, compressed-tensors pack-quantized or GPTQ")
    p.add_argument("out", help="folder to write (replaced only once the new one is complete)")
    p.add_argument("--to", choices=["gsq", "compressed-tensors"], default="gsq")
    p.add_argument("--container-bits", type=int, default=None,
                   help="compressed-tensors num_bits (default: the codes' storage width; 4 for 4-bit-only kernels)")
    args = p.parse_args(argv)
    try:
        if Path(args.out).resolve() == Path(args.src).resolve():
            raise FormatError("the output folder must differ from the input folder")
        ck = read_checkpoint(args.src)
        if args.to == "gsq":
            out = write_gsq(ck, args.out)
            what = f"GSQ {ck.fitting_bits()}-bit"
        else:
            out = write_compressed_tensors(ck, args.out, args.container_bits)
            what = f"compressed-tensors {CT_FORMAT}"
    except (FormatError, OSError, ValueError) as e:
        print(f"gsq-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"gsq-convert: {ck.source} -> {what} at {out} ({len(ck.linears)} quantized linears, "
          f"G={ck.group_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
