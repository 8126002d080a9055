"""deploy/compose.yaml, checked statically (no Docker engine on these machines).

- It matches the Compose specification's JSON schema (the copy vendored in the
  ``check-jsonschema`` package), as written and after interpolation with .env.example.
- Every ``${VAR}`` is set and explained in .env.example; nothing secret is in the file.
- Every file it mounts exists; secret files are git-ignored.
- The shape the issue asks for: vLLM pinned, GPU reserved, priority scheduling, reachable
  only on an internal network; the gateway built from the repository's Dockerfile; Caddy
  the only published entry; a health check on every service; monitoring in a profile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from .compose_file import (
    COMPOSE,
    DEPLOY,
    ENV_EXAMPLE,
    MissingVariable,
    command_words,
    documented_variables,
    interpolate,
    load,
    load_raw,
    parse_env_file,
    variables,
)

REPO = DEPLOY.parent
MONITORING = {"prometheus", "grafana", "dcgm-exporter"}
CORE = {"vllm", "gateway", "caddy"}
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|tg-[A-Za-z0-9_-]{20,}|\$2[aby]\$\d\d\$")


def compose_schema() -> dict[str, Any]:
    ref = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(ref.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("interpolated", [False, True], ids=["as-written", "interpolated"])
def test_matches_the_compose_spec_schema(interpolated: bool) -> None:
    doc = load() if interpolated else load_raw()
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_has_teeth() -> None:
    """The schema rejects a mistake the engine would reject (a misspelt key)."""
    doc = load_raw()
    doc["services"]["gateway"]["helthcheck"] = doc["services"]["gateway"].pop("healthcheck")
    schema = compose_schema()
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))


def test_interpolation_rules() -> None:
    env = {"A": "1", "E": ""}
    assert interpolate("${A} $A ${B:-x} ${E:-y} ${E-z} $$A", env) == "1 1 x y  $A"
    with pytest.raises(MissingVariable):
        interpolate("${B:?set B}", env)


def test_every_variable_is_documented_in_env_example() -> None:
    used = set().union(*(variables(s) for s in _strings(load_raw())))
    documented = documented_variables(ENV_EXAMPLE)
    assert used, "no variables found"
    missing = sorted(used - set(documented))
    assert not missing, f"not in .env.example: {missing}"
    unexplained = sorted(v for v in used if not documented[v])
    assert not unexplained, f"no comment above them in .env.example: {unexplained}"
    unused = sorted(set(documented) - used)
    assert not unused, f"in .env.example but unused by compose.yaml: {unused}"


def _strings(node: Any) -> list[str]:
    """Every string value of a parsed YAML tree (what Compose interpolates; not comments)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_required_variables_are_set_in_env_example() -> None:
    load()  # raises MissingVariable for a ${VAR:?} left empty
    with pytest.raises(MissingVariable):
        load({})  # and without a .env the file refuses to start: MODEL is required


def test_no_secret_in_compose_or_env_example() -> None:
    for path in (COMPOSE, ENV_EXAMPLE):
        assert not SECRET_VALUE.search(path.read_text()), path
    for name, svc in load_raw()["services"].items():
        for key in (svc.get("environment") or {}):
            if re.search(r"TOKEN|PASSWORD|SECRET|API_KEY", key):
                # secrets are passed as files (Compose secrets), never as values
                assert key.endswith(("__FILE", "_PATH")), (name, key)
    assert not (DEPLOY / ".env").exists() or _git_ignored(DEPLOY / ".env")


def _git_ignored(path: Path) -> bool:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("no git checkout")
    r = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(path)], check=False)
    return r.returncode == 0


def test_secret_files_are_git_ignored() -> None:
    secrets = load_raw()["secrets"]
    assert set(secrets) == {"hf_token", "grafana_admin_password"}
    for s in secrets.values():
        path = (DEPLOY / s["file"]).resolve()
        assert path.parent == DEPLOY / "secrets"
        assert _git_ignored(path), path
    assert _git_ignored(DEPLOY / ".env")
    assert not _git_ignored(ENV_EXAMPLE)


def _bind_sources(doc: dict[str, Any]) -> list[str]:
    out = []
    for svc in doc["services"].values():
        for v in svc.get("volumes") or []:
            src = v.split(":", 1)[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith((".", "/")):
                out.append(src)
    return out


def test_every_referenced_file_exists() -> None:
    doc = load()
    for src in _bind_sources(doc):
        assert (DEPLOY / src).exists(), f"{src} (mounted by compose.yaml) does not exist"
    build = doc["services"]["gateway"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).is_file()
    assert (context / ".dockerignore").is_file()
    for s in doc["secrets"].values():
        assert (DEPLOY / s["file"]).parent.is_dir()  # the files themselves are made by init.sh


def test_services_and_profiles() -> None:
    services = load()["services"]
    assert set(services) == CORE | MONITORING
    for name, svc in services.items():
        assert svc.get("profiles") == (["monitoring"] if name in MONITORING else None), name
        assert svc.get("restart") == "unless-stopped", name


def test_every_service_has_a_health_check() -> None:
    for name, svc in load()["services"].items():
        hc = svc.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert hc.get("interval") and hc.get("retries"), name


def test_vllm_pinned_gpu_priority_internal_only() -> None:
    doc = load()
    vllm = doc["services"]["vllm"]
    image = vllm["image"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+(-cu\d+)?", image), image
    words = command_words(vllm)
    assert words[words.index("--scheduling-policy") + 1] == "priority"
    assert words[words.index("--served-model-name") + 1]
    assert words[words.index("--port") + 1] == "8000"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "ports" not in vllm and "expose" not in vllm
    assert "backend" in vllm["networks"] and doc["networks"]["backend"]["internal"] is True
    # the model cache is a volume that outlives the container
    assert any(v.startswith("hf-cache:/root/.cache/huggingface") for v in vllm["volumes"])
    assert vllm["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token"
    # no other service with published ports shares a network with vllm except via backend
    for name, svc in doc["services"].items():
        if svc.get("ports"):
            assert "backend" not in (svc.get("networks") or []), name


def test_gateway_from_the_repo_dockerfile() -> None:
    gw = load()["services"]["gateway"]
    words = command_words(gw)
    assert words[:3] == ["serve", "--backend", "http://vllm:8000"]
    assert "ports" not in gw
    assert gw["read_only"] is True and gw["cap_drop"] == ["ALL"]
    assert any(v.endswith(":/var/lib/teamgpu") for v in gw["volumes"])
    assert set(gw["networks"]) == {"backend", "frontend"}


def test_caddy_is_the_only_way_in() -> None:
    doc = load()
    published = {n for n, s in doc["services"].items() if s.get("ports")}
    assert published == {"caddy", "grafana"}
    assert all(p.startswith("127.0.0.1:") for p in doc["services"]["grafana"]["ports"])
    caddy = doc["services"]["caddy"]
    assert {"80:80", "443:443"} <= set(caddy["ports"])
    assert caddy["environment"]["CADDY_TLS"] == "internal"
    assert caddy["environment"]["CADDY_UPSTREAM"] == "gateway:8080"
    assert "./caddy/Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]


def test_caddyfile_streams_unbuffered() -> None:
    text = (DEPLOY / "caddy" / "Caddyfile").read_text()
    assert "flush_interval -1" in text
    assert "tls {$CADDY_TLS:internal}" in text
    assert not re.search(r"^\s*encode\b", text, re.MULTILINE)  # compression would buffer SSE


def test_init_script_makes_env_and_secrets(tmp_path: Path) -> None:
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("monitoring", ".env", "hf_token",
                                                                  "grafana_admin_password"))
    subprocess.run(["bash", str(copy / "init.sh")], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    assert parse_env_file(copy / ".env") == parse_env_file(ENV_EXAMPLE)
    for name in ("hf_token", "grafana_admin_password"):
        f = copy / "secrets" / name
        assert f.stat().st_mode & 0o777 == 0o600
    assert (copy / "secrets" / "hf_token").read_text() == ""
    assert len((copy / "secrets" / "grafana_admin_password").read_text().strip()) >= 20
    # idempotent: a second run keeps what the first one made
    before = (copy / "secrets" / "grafana_admin_password").read_text()
    subprocess.run(["bash", str(copy / "init.sh")], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    assert (copy / "secrets" / "grafana_admin_password").read_text() == before


def test_prometheus_targets_are_compose_services() -> None:
    import yaml

    services = set(load()["services"])
    prom = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert targets
    assert all(t.rsplit(":", 1)[0] in services for t in targets), targets
