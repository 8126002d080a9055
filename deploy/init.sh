#!/usr/bin/env bash
# Prepare deploy/ for `docker compose up`: .env from .env.example, and the secret files.
#
#   ./init.sh          # idempotent: never overwrites an existing .env or secret
#
# secrets/hf_token                 the Hugging Face token (empty is fine for public models);
#                                  asked for on a terminal, else left empty
# secrets/grafana_admin_password   32 random characters
# Both mode 600, git-ignored, mounted into the containers as Compose secrets.
set -euo pipefail
cd "$(dirname "$0")"
umask 077
log() { printf '[init] %s\n' "$*" >&2; }

if [[ ! -f .env ]]; then
    cp .env.example .env
    log "wrote .env from .env.example: set MODEL, SERVED_MODEL_NAME and DOMAIN in it"
fi
mkdir -p secrets
if [[ ! -f secrets/hf_token ]]; then
    token=""
    if [[ -t 0 ]]; then
        read -r -s -p "Hugging Face token (Enter for none): " token || true
        echo >&2
    fi
    printf '%s' "$token" > secrets/hf_token
    log "wrote secrets/hf_token"
fi
if [[ ! -f secrets/grafana_admin_password ]]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=' > secrets/grafana_admin_password
    log "wrote secrets/grafana_admin_password (Grafana user: admin)"
fi
chmod 600 secrets/hf_token secrets/grafana_admin_password
log "ready: docker compose up -d   (add --profile monitoring for the dashboards)"
