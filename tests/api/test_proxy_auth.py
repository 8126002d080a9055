"""Who may call: Bearer and x-api-key, missing, unknown, expired, revoked and rotated keys,
and the admin-only /stats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import update

from teamgpu.auth.keys import utcnow
from teamgpu.cli import main
from teamgpu.store.tables import api_keys
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, assert_openai_error, start_gateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    """This module's own gateway: its tests create, expire, revoke and rotate keys, which
    must not show up in the session gateway's store."""
    with start_gateway(tmp_path_factory.mktemp("auth"), [fake_server.url]) as h:
        yield h


def chat(gateway: Harness, headers: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=gateway.url, timeout=10, trust_env=False) as c:
        return c.post("/v1/chat/completions", json=CHAT, headers=headers)


def cli(gateway: Harness, *args: str) -> Any:
    r = CliRunner().invoke(main, [*args, "--data-dir", str(gateway.data_dir)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def test_bearer_and_x_api_key_are_accepted(gateway: Harness) -> None:
    assert chat(gateway, {"Authorization": f"Bearer {gateway.user_key}"}).status_code == 200
    assert chat(gateway, {"Authorization": f"bearer {gateway.user_key}"}).status_code == 200
    assert chat(gateway, {"x-api-key": gateway.user_key}).status_code == 200
    r = gateway.client(None).get("/v1/models", headers={"x-api-key": gateway.user_key})
    assert r.status_code == 200


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"x-api-key": ""},
])
def test_missing_key_is_401(gateway: Harness, headers: dict[str, str]) -> None:
    r = chat(gateway, headers)
    err = assert_openai_error(r, 401)
    assert err["type"] == "invalid_request_error"
    assert "key" in err["message"].lower()


@pytest.mark.parametrize("secret", ["tg-" + "A" * 43, "sk-not-ours", "tg-\u00e9t\u00e9"])
def test_unknown_key_is_401(gateway: Harness, secret: str) -> None:
    r = chat(gateway, {"x-api-key": secret.encode()})  # raw UTF-8 bytes in the header
    err = assert_openai_error(r, 401, code="invalid_api_key")
    assert "invalid" in err["message"].lower()


def test_unauthorised_requests_never_reach_the_backend(gateway: Harness, fake: Any) -> None:
    r = chat(gateway, {"x-api-key": "tg-nope"})
    assert r.status_code == 401
    rid = r.headers["x-request-id"]
    assert not [q for q in fake.requests if q["request_id"] == rid]
    row = gateway.wait_row(rid)
    assert (row["status"], row["outcome"], row["user"]) == (401, "unauthorized", None)


def test_expired_key_is_401_expired(gateway: Harness) -> None:
    secret, p = gateway.gw.keys.create("expiring", expires_in_days=1)
    assert chat(gateway, {"x-api-key": secret}).status_code == 200
    with gateway.gw.store.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == p.key_id)
                     .values(expires_at=utcnow() - timedelta(seconds=1)))
    err = assert_openai_error(chat(gateway, {"x-api-key": secret}), 401)
    assert "expired" in err["message"]


def test_key_with_a_tiny_expiry_is_refused(gateway: Harness) -> None:
    secret, _ = gateway.gw.keys.create("brief", expires_in_days=1e-9)  # 86 microseconds
    err = assert_openai_error(chat(gateway, {"x-api-key": secret}), 401)
    assert "expired" in err["message"]


def test_revoke_with_the_cli_while_the_server_runs(gateway: Harness, clean_env: Path) -> None:
    secret, p = gateway.gw.keys.create("revokee")
    headers = {"Authorization": f"Bearer {secret}"}
    assert chat(gateway, headers).status_code == 200
    cli(gateway, "keys", "revoke", p.key_id)
    err = assert_openai_error(chat(gateway, headers), 401)
    assert "revoked" in err["message"]


def test_rotate_with_grace_keeps_the_old_key(gateway: Harness, clean_env: Path) -> None:
    old, _ = gateway.gw.keys.create("rotor")
    new = json.loads(cli(gateway, "keys", "rotate", "rotor", "--grace", "1", "--json"))["key"]
    assert chat(gateway, {"x-api-key": old}).status_code == 200
    assert chat(gateway, {"x-api-key": new}).status_code == 200


def test_rotate_without_grace_stops_the_old_key_at_once(gateway: Harness,
                                                        clean_env: Path) -> None:
    old, p = gateway.gw.keys.create("rotor0")
    assert chat(gateway, {"x-api-key": old}).status_code == 200
    new = json.loads(cli(gateway, "keys", "rotate", p.key_id, "--grace", "0", "--json"))["key"]
    assert_openai_error(chat(gateway, {"x-api-key": old}), 401)
    assert chat(gateway, {"x-api-key": new}).status_code == 200


def test_stats_needs_an_admin_key(gateway: Harness) -> None:
    assert_openai_error(gateway.client(None).get("/stats"), 401)
    assert_openai_error(gateway.client("user").get("/stats"), 403, code="permission_denied")
    r = gateway.client("admin").get("/stats")
    assert r.status_code == 200 and r.headers["x-request-id"]


def test_stats_counts_and_tokens_equal_the_sum_of_usage(gateway: Harness) -> None:
    secret, _ = gateway.gw.keys.create("counted")
    c = gateway.client(secret)
    prompt = completion = 0
    for body in (
        {**CHAT, "fake": {"tokens": 3}},
        {**CHAT, "messages": [{"role": "user", "content": "a longer question " * 20}]},
        {"model": MODEL, "prompt": "def f():", "max_tokens": 5},
    ):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        u = c.post(path, json=body).json()["usage"]
        prompt += u["prompt_tokens"]
        completion += u["completion_tokens"]
    with c.stream("POST", "/v1/chat/completions",
                  json={**CHAT, "stream": True, "stream_options": {"include_usage": True},
                        "fake": {"tokens": 6}}) as r:
        raw = r.read()
        rid = r.headers["x-request-id"]
    usage = next(json.loads(line[6:])["usage"] for line in raw.split(b"\n\n")
                 if line.startswith(b"data: {") and b'"choices":[]' in line)
    prompt += usage["prompt_tokens"]
    completion += usage["completion_tokens"]
    gateway.wait_row(rid)  # the stream's row is written after its last byte
    stats = gateway.client("admin").get("/stats").json()
    assert stats["users"]["counted"] == {"requests": 4, "prompt_tokens": prompt,
                                         "completion_tokens": completion}
    # every audited request except model listings (kept for the trail, not usage)
    assert stats["requests_total"] == len([r for r in gateway.rows()
                                           if r["endpoint"] != "models"])
    assert stats["requests_total"] == sum(u["requests"] for u in stats["users"].values())
