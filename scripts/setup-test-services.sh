#!/usr/bin/env bash
# Make sure the real services the tests use are installed and running.
# Redis and PostgreSQL run on this project's machines before every session and CI run;
# this starts them if they are not answering, and installs Debian packages the tests drive
# (caddy, nginx, chromium) when missing.
set -euo pipefail
log() { printf '[setup-test-services] %s\n' "$*" >&2; }

need=()
for pkg_bin in caddy:caddy nginx:nginx chromium:chromium chromium-driver:chromedriver redis-server:redis-server; do
    pkg="${pkg_bin%%:*}"; bin="${pkg_bin##*:}"
    command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || need+=("$pkg")
done
if (( ${#need[@]} )); then
    if [[ $(id -u) -eq 0 ]]; then
        log "installing ${need[*]}"
        apt-get update -qq >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2 \
            || log "warning: could not install ${need[*]}"
    else
        log "warning: missing ${need[*]} (run as root or install them)"
    fi
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    log "starting redis-server"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        log "starting postgresql"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >&2 || true
    fi
fi
