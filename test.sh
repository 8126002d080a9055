#!/usr/bin/env bash
# Run every test. Works on a fresh clone: it sets up whatever the tests need first.
#
#   ./test.sh              # all tests (unit, in-process, services, real vLLM end-to-end)
#   ./test.sh -k relay     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-gateway.sh --test
scripts/setup-test-services.sh
export TEAMGPU_ENGINE_PYTHON="$(scripts/setup-engine.sh | tail -n 1)"
export TEAMGPU_DEMO_MODEL_DIR="$(scripts/prepare-demo-model.sh | tail -n 1)"
exec .venv/bin/python -m pytest "$@"
