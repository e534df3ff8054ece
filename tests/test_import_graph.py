"""The import graph points one way: gsq_format <- quantize, gsq_format <- gsq_vllm.

The offline quantizer must run where vLLM is not installed (and must not pay for importing it),
so no module of ``quantize`` or ``gsq_format`` may import vLLM or the plugin package, and
``gsq_format`` may not import ``quantize``. Each package is imported whole in a fresh interpreter."""

import subprocess
import sys

import pytest

PROBE = """
import importlib, pkgutil, sys
import torch  # before the C++ extensions, which link against it
pkg = importlib.import_module({pkg!r})
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    importlib.import_module(m.name)
bad = sorted({{n.split(".")[0] for n in sys.modules}} & set({forbidden!r}))
print(",".join(bad))
"""


@pytest.mark.parametrize("pkg,forbidden", [
    ("gsq_format", {"vllm", "gsq_vllm", "quantize"}),
    ("quantize", {"vllm", "gsq_vllm"}),
])
def test_offline_packages_do_not_import_serving_code(pkg, forbidden):
    out = subprocess.run([sys.executable, "-c", PROBE.format(pkg=pkg, forbidden=sorted(forbidden))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"{pkg} imports {out.stdout.strip()}"
