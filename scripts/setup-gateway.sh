#!/usr/bin/env bash
# Create (or update) the gateway's virtual environment at .venv/ in the repository root.
#
# Usage: scripts/setup-gateway.sh [--test]
#   --test   also install the test extras (pytest, openai, selenium, ...)
#
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup-gateway] %s\n' "$*" >&2; }

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
PY="${TEAMGPU_PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"' \
    || { log "error: $PY is older than Python 3.11"; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $PY"
    "$PY" -m venv .venv
fi
stamp=".venv/.teamgpu-installed${extras:+-test}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log ".venv is up to date"
    exit 0
fi
log "installing teamgpu${extras} into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip >&2
.venv/bin/python -m pip install --quiet -e ".${extras}" >&2
echo "$want" > "$stamp"
log "done"
