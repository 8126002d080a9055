"""API keys: format, hashing, verification, expiry, rotation with grace, revocation."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, update

from teamgpu.auth.keys import KEY_PREFIX, KeyError_, KeyStore, hash_key, new_secret, utcnow
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.store.db import open_store
from teamgpu.store.tables import api_keys


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'keys.db'}")


@pytest.fixture
def ks(engine: Engine) -> KeyStore:
    return KeyStore(engine)


def test_new_secret_has_the_prefix_and_256_bits() -> None:
    seen = set()
    for _ in range(50):
        s = new_secret()
        assert s.startswith(KEY_PREFIX)
        body = s[len(KEY_PREFIX):]
        assert len(body) == 43
        assert len(base64.urlsafe_b64decode(body + "=")) == 32
        seen.add(s)
    assert len(seen) == 50


def test_hash_is_sha256_hex() -> None:
    assert hash_key("tg-abc") == hashlib.sha256(b"tg-abc").hexdigest()
    assert hash_key("tg-\udcff")  # a lone surrogate from a header does not crash hashing


def test_create_stores_only_the_hash(ks: KeyStore, tmp_path: Path) -> None:
    secret, p = ks.create("alice", admin=True)
    assert p.user == "alice" and p.is_admin and p.key_id.startswith("key_")
    assert p.prefix == secret[:len(p.prefix)] and len(p.prefix) < len(secret) // 2
    raw = (tmp_path / "keys.db").read_bytes()
    for f in tmp_path.glob("keys.db*"):
        raw += f.read_bytes()
    assert secret.encode() not in raw
    assert secret[len(KEY_PREFIX):].encode() not in raw
    assert hash_key(secret).encode() in raw


def test_verify(ks: KeyStore) -> None:
    secret, p = ks.create("alice")
    got = ks.verify(secret)
    assert got is not None and got.key_id == p.key_id and not got.is_admin
    assert ks.verify(secret + "x") is None
    assert ks.verify(new_secret()) is None
    assert ks.verify("sk-" + secret[3:]) is None
    assert ks.verify("tg-" + "a" * 300) is None


@pytest.mark.parametrize("bad", ["", " ", "a b", "x" * 129])
def test_invalid_user_names(ks: KeyStore, bad: str) -> None:
    with pytest.raises(KeyError_):
        ks.create(bad)


def test_invalid_priority_and_weight(ks: KeyStore) -> None:
    with pytest.raises(KeyError_):
        ks.create("a", max_priority="urgent")
    with pytest.raises(KeyError_):
        ks.create("a", weight=0)


def test_expiry(ks: KeyStore, engine: Engine) -> None:
    secret, p = ks.create("bob", expires_in_days=1)
    assert p.expires_at is not None
    assert timedelta(hours=23) < p.expires_at - utcnow() <= timedelta(days=1)
    assert ks.verify(secret) is not None
    assert ks.verify(secret, now=utcnow() + timedelta(days=1, seconds=1)) is None
    # expired in the store: refused at once
    with engine.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == p.key_id)
                     .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert ks.verify(secret) is None
    got = ks.lookup(secret)
    assert got is not None and got.status(utcnow()) == "expired"


def test_tiny_expiry(ks: KeyStore) -> None:
    secret, p = ks.create("bob", expires_in_days=1e-9)  # 86 microseconds
    assert ks.verify(secret, now=p.created_at + timedelta(milliseconds=1)) is None


def test_revoke_by_id_and_by_user(ks: KeyStore) -> None:
    s1, p1 = ks.create("carol")
    s2, _ = ks.create("carol")
    s3, p3 = ks.create("dave")
    revoked = ks.revoke(p1.key_id)
    assert [k.key_id for k in revoked] == [p1.key_id] and revoked[0].revoked_at is not None
    assert ks.verify(s1) is None and ks.verify(s2) is not None
    assert ks.lookup(s1).status(utcnow()) == "revoked"  # type: ignore[union-attr]
    ks.revoke("carol")
    assert ks.verify(s2) is None
    assert ks.verify(s3) is not None
    with pytest.raises(KeyError_):
        ks.revoke("carol")  # no active key left
    with pytest.raises(KeyError_):
        ks.revoke("nobody")
    assert p3.key_id in [k.key_id for k in ks.list(include_inactive=False)]


def test_rotate_with_grace_keeps_the_old_key_working(ks: KeyStore) -> None:
    old_secret, old = ks.create("erin", admin=True, max_priority="normal", weight=2.5,
                                limits={"rpm": 7, "tpm": None, "max_concurrent": 2,
                                        "daily_tokens": None})
    new_secret_, new = ks.rotate("erin", grace_hours=1)
    assert new_secret_ != old_secret and new.key_id != old.key_id
    assert new.rotated_from == old.key_id
    assert (new.user, new.is_admin, new.max_priority, new.weight, new.rpm, new.max_concurrent) \
        == ("erin", True, PriorityClass.NORMAL, 2.5, 7, 2)
    assert ks.verify(old_secret) is not None
    assert ks.verify(new_secret_) is not None
    later = utcnow() + timedelta(hours=1, seconds=1)
    assert ks.verify(old_secret, now=later) is None
    assert ks.verify(new_secret_, now=later) is not None


def test_rotate_without_grace_stops_the_old_key_at_once(ks: KeyStore) -> None:
    old_secret, old = ks.create("frank")
    new_secret_, _ = ks.rotate(old.key_id, grace_hours=0)
    assert ks.verify(old_secret) is None
    assert ks.verify(new_secret_) is not None


def test_rotate_keeps_an_earlier_expiry(ks: KeyStore) -> None:
    _, old = ks.create("gina", expires_in_days=0.5)
    _, new = ks.rotate("gina", grace_hours=48)
    assert new.expires_at == old.expires_at
    assert ks.get(old.key_id).expires_at == old.expires_at  # grace does not extend it


def test_rotate_a_user_with_several_keys_needs_the_id(ks: KeyStore) -> None:
    ks.create("hank")
    ks.create("hank")
    with pytest.raises(KeyError_, match="several"):
        ks.rotate("hank")


def test_update(ks: KeyStore) -> None:
    ks.create("ivy")
    (u,) = ks.update("ivy", rpm=10, weight=3.0, default_priority="low", tpm=None)
    assert (u.rpm, u.weight, u.default_priority, u.tpm) == (10, 3.0, PriorityClass.LOW, None)
    with pytest.raises(KeyError_):
        ks.update("ivy", rpm=-1)
    with pytest.raises(KeyError_):
        ks.update("ivy", default_priority="nope")
    with pytest.raises(KeyError_):
        ks.update("ivy", user="mallory")


def test_list_and_public_never_hold_the_secret(ks: KeyStore) -> None:
    secret, _ = ks.create("jack")
    ks.create("kate", admin=True)
    assert ks.has_admin()
    for k in ks.list():
        d = k.public()
        assert "key_hash" not in d and "key" not in d
        assert secret not in str(d)
    assert [k.user for k in ks.list()] == ["jack", "kate"]


def test_the_default_priority_follows_a_lower_ceiling(ks: KeyStore) -> None:
    _, p = ks.create("batchbot", max_priority="low")
    assert (p.default_priority, p.max_priority) == (PriorityClass.LOW, PriorityClass.LOW)
    _, p = ks.create("dev")
    assert (p.default_priority, p.max_priority) == (PriorityClass.NORMAL, PriorityClass.HIGH)


def test_a_default_above_the_ceiling_is_refused(ks: KeyStore) -> None:
    with pytest.raises(KeyError_, match="above the key's ceiling low"):
        ks.create("confused", max_priority="low", default_priority="high")
