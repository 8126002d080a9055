"""``teamgpu keys``: secrets shown once, only hashes stored, never listed."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from teamgpu.auth.keys import hash_key
from teamgpu.cli import main


def run(data_dir: Path, *args: str, ok: bool = True) -> Any:
    r = CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def store_bytes(data_dir: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(data_dir.glob("teamgpu.db*")))


@pytest.fixture
def data_dir(clean_env: Path, tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_create_json_shows_a_strong_key_once_and_stores_its_hash(data_dir: Path) -> None:
    out = json.loads(run(data_dir, "keys", "create", "alice", "--json").output)
    assert {"key", "id", "user"} <= set(out)
    assert out["user"] == "alice" and out["is_admin"] is False
    key = out["key"]
    assert key.startswith("tg-")
    body = key[3:]
    assert len(body) >= 43 and set(body) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) * 8 >= 256
    raw = store_bytes(data_dir)
    assert raw, "the store was not created in --data-dir"
    assert key.encode() not in raw and body.encode() not in raw
    assert hash_key(key).encode() in raw


def test_create_admin_with_expiry(data_dir: Path) -> None:
    out = json.loads(run(data_dir, "keys", "create", "root", "--admin", "--expires-in", "2",
                         "--json").output)
    assert out["is_admin"] is True and out["expires_at"]


def test_create_text_output_shows_the_key(data_dir: Path) -> None:
    out = run(data_dir, "keys", "create", "bob").output
    assert "tg-" in out and "shown this once" in out


def test_list_never_shows_a_secret(data_dir: Path) -> None:
    k1 = json.loads(run(data_dir, "keys", "create", "alice", "--json").output)
    k2 = json.loads(run(data_dir, "keys", "create", "bob", "--admin", "--json").output)
    listed = run(data_dir, "keys", "list", "--json").output
    rows = json.loads(listed)
    assert {r["id"] for r in rows} == {k1["id"], k2["id"]}
    assert all(r["status"] == "active" for r in rows)
    text = run(data_dir, "keys", "list").output
    for k in (k1, k2):
        for out in (listed, text):
            assert k["key"] not in out
            assert k["key"][3:] not in out
            assert hash_key(k["key"]) not in out
    assert "key_hash" not in listed


def test_revoke_and_list_all(data_dir: Path) -> None:
    k = json.loads(run(data_dir, "keys", "create", "alice", "--json").output)
    assert "Revoked" in run(data_dir, "keys", "revoke", k["id"]).output
    assert json.loads(run(data_dir, "keys", "list", "--json").output) == []
    rows = json.loads(run(data_dir, "keys", "list", "--json", "--all").output)
    assert [r["status"] for r in rows] == ["revoked"]


def test_unknown_key_is_a_clear_error(data_dir: Path) -> None:
    r = run(data_dir, "keys", "revoke", "nobody", ok=False)
    assert r.exit_code == 1 and "nobody" in r.output
    r = run(data_dir, "keys", "rotate", "nobody", ok=False)
    assert r.exit_code == 1


def test_rotate_json(data_dir: Path) -> None:
    k = json.loads(run(data_dir, "keys", "create", "alice", "--json").output)
    new = json.loads(run(data_dir, "keys", "rotate", "alice", "--grace", "1", "--json").output)
    assert new["key"] != k["key"] and new["rotated_from"] == k["id"]
    assert new["key"].encode() not in store_bytes(data_dir)


def test_update_limits(data_dir: Path) -> None:
    run(data_dir, "keys", "create", "alice")
    (u,) = json.loads(run(data_dir, "keys", "update", "alice", "--rpm", "5",
                          "--default-priority", "batch", "--json").output)
    assert u["rpm"] == 5 and u["default_priority"] == "low"


def test_a_second_key_for_a_user_says_limits_are_per_key(data_dir: Path) -> None:
    first = json.loads(run(data_dir, "keys", "create", "bob", "--rpm", "60", "--json").stdout)
    r = run(data_dir, "keys", "create", "bob", "--json")
    second = json.loads(r.stdout)  # stdout stays one JSON object
    assert first["id"] in r.stderr and second["id"] in r.stderr
    assert "per key" in r.stderr and "keys rotate bob" in r.stderr
    # a first key, or a key of another user, gets no note
    assert run(data_dir, "keys", "create", "carol", "--json").stderr == ""
