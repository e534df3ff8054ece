#!/usr/bin/env bash
# The main job in its current form: set up, prepare the embedded default model
# (SmolLM2-135M-Instruct, GGUF -> cached bf16 folder) and text, quantize it,
# evaluate bf16 vs the checkpoint, and print where the checkpoint is.
#
#   METHOD (gptq) BITS (2) GROUP_SIZE (64) OUT (runs/smollm2-$METHOD-${BITS}b-g$GROUP_SIZE)
#   EVAL_NSAMPLES (20) EVAL_SEQLEN (512); extra arguments go to gsq-quantize.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GSQ_VENV:-$ROOT/.venv}"
METHOD="${METHOD:-gptq}"
BITS="${BITS:-2}"
GROUP_SIZE="${GROUP_SIZE:-64}"
OUT="${OUT:-$ROOT/runs/smollm2-$METHOD-${BITS}b-g$GROUP_SIZE}"

bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
echo "[run] preparing the default model and text" >&2
MODEL="$("$VENV/bin/python" -c 'from quantize.models import prepare_default_model; print(prepare_default_model())')"
"$VENV/bin/python" -c 'from quantize.data import load_split; [load_split(c, s) for c in ("wikipedia", "owt") for s in ("calib", "eval")]'
echo "[run] quantizing $MODEL -> $OUT ($METHOD, $BITS-bit, G=$GROUP_SIZE)" >&2
"$VENV/bin/gsq-quantize" --model "$MODEL" --out "$OUT" --method "$METHOD" --bits "$BITS" --group-size "$GROUP_SIZE" "$@"
echo "[run] evaluating" >&2
"$VENV/bin/gsq-eval" "$MODEL" "$OUT" --nsamples "${EVAL_NSAMPLES:-20}" --seqlen "${EVAL_SEQLEN:-512}" --json "$OUT.ppl.json"
echo "[run] checkpoint: $OUT"
