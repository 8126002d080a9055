#!/usr/bin/env bash
# Run the checks, then every test. Works on a fresh clone: it sets up whatever the tests
# need first.
#
#   ./test.sh              # ruff, mypy, then all tests (unit, in-process, services, real vLLM)
#   ./test.sh -k relay     # extra arguments go to pytest (the checks always run)
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-gateway.sh --test

# The checks, configured in pyproject.toml; before the slow set-up, so a finding stops
# the run within a minute.
check() {
    local name="$1"
    shift
    printf '[test.sh] %s\n' "$name" >&2
    if ! "$@"; then
        printf '[test.sh] %s failed: fix the findings above (run alone: %s)\n' "$name" "$*" >&2
        exit 1
    fi
}
check "ruff check" .venv/bin/ruff check
check "mypy" .venv/bin/mypy

scripts/setup-test-services.sh
export TEAMGPU_ENGINE_PYTHON="$(scripts/setup-engine.sh | tail -n 1)"
export TEAMGPU_DEMO_MODEL_DIR="$(scripts/prepare-demo-model.sh | tail -n 1)"
export TEAMGPU_DEMO_EMBED_MODEL_DIR="$(scripts/prepare-demo-embed-model.sh | tail -n 1)"
exec .venv/bin/python -m pytest "$@"
