#!/usr/bin/env bash
# The project's test command (README's second command; .ci/run calls exactly this).
# Sets up the environment if needed, then runs every test that can run here:
# GPU tests skip cleanly without a GPU. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GSQ_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
