"""API keys: create, hash, verify, list, rotate, revoke, update.

A key is ``tg-`` followed by 43 URL-safe base64 characters (32 random bytes, 256 bits,
from :mod:`secrets`). Only its SHA-256 is stored: a key with 256 bits of entropy needs no
slow password hash, and a look-up by hash is one indexed read. The first characters are
kept as ``prefix`` so a person can tell keys apart in ``keys list``.
"""

from __future__ import annotations

import builtins  # KeyStore.list shadows the built-in in the class's annotations
import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, insert, or_, select, update

from teamgpu.scheduler.errors import InvalidPriority
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.store.tables import api_keys

KEY_PREFIX = "tg-"
ALL_MODELS = "all"  # KeyStore.update(models=ALL_MODELS): the key may use every model again


class KeyError_(Exception):
    """A key operation failed (unknown id or user, invalid argument). CLI exit status 1."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def hash_key(key: str) -> str:
    """SHA-256 hex digest of a full key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    """A new key: ``tg-`` + 32 random bytes, URL-safe base64 (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key record without its secret."""

    key_id: str
    user: str
    is_admin: bool
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    max_priority: PriorityClass = PriorityClass.HIGH
    default_priority: PriorityClass = PriorityClass.NORMAL
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    rotated_from: str | None = None
    models: tuple[str, ...] | None = None  # served names or aliases this key may use; None: all

    def status(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["id"] = d.pop("key_id")
        d["max_priority"] = self.max_priority.label
        d["default_priority"] = self.default_priority.label
        d["models"] = list(self.models) if self.models is not None else None
        for k in ("created_at", "expires_at", "revoked_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


def _principal(row: Any) -> Principal:
    return _principal_from_mapping(row._mapping)


def _parse_dt(v: Any) -> datetime | None:
    if v is None or isinstance(v, datetime):
        return _aware(v)
    return _aware(datetime.fromisoformat(str(v)))


def _principal_from_mapping(m: Any) -> Principal:
    return Principal(
        key_id=m["id"],
        user=m["user"],
        is_admin=bool(m["is_admin"]),
        prefix=m["prefix"],
        created_at=_parse_dt(m["created_at"]),  # type: ignore[arg-type]
        expires_at=_parse_dt(m["expires_at"]),
        revoked_at=_parse_dt(m["revoked_at"]),
        max_priority=PriorityClass.parse(m["max_priority"]),
        default_priority=PriorityClass.parse(m["default_priority"]),
        weight=float(m["weight"]),
        rpm=m["rpm"],
        tpm=m["tpm"],
        max_concurrent=m["max_concurrent"],
        daily_tokens=m["daily_tokens"],
        rotated_from=m["rotated_from"],
        models=_models_from_db(m["models"]),
    )


def _models_from_db(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return tuple(str(n) for n in names) if isinstance(names, list) else None


def _models_to_db(models: Iterable[str] | None) -> str | None:
    """A key's model list as stored: a JSON list, or None (every model).

    Raises:
        KeyError_: an empty list, or a name that is empty or over 256 characters.
    """
    if models is None:
        return None
    names = [m.strip() for m in models]
    if not names or any(not n or len(n) > 256 for n in names):
        raise KeyError_("--models needs one or more model names (served names or aliases)")
    return json.dumps(list(dict.fromkeys(names)))


LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "daily_tokens")


class KeyStore:
    """Keys in the store. Every method is synchronous and safe to call from any thread.

    Changes are visible to a running gateway at once: it reads the key on every request.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        self._sqlite_path = db if db and db != ":memory:" else None
        self._local = threading.local()

    def _raw_row(self, key_hash: str) -> Any:
        """The key row by hash through a plain sqlite3 connection per thread.

        The gateway verifies a key on every request; through SQLAlchemy that costs about
        80 us, through sqlite3 about 10 us. Reads never wait for writers (WAL mode).
        """
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self._sqlite_path}?mode=ro", uri=True,
                                   check_same_thread=False, timeout=5.0)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()

    def create(
        self,
        user: str,
        *,
        admin: bool = False,
        expires_in_days: float | None = None,
        max_priority: str | PriorityClass = PriorityClass.HIGH,
        default_priority: str | PriorityClass | None = None,
        weight: float = 1.0,
        rotated_from: str | None = None,
        limits: dict[str, int | None] | None = None,
        models: Iterable[str] | None = None,
    ) -> tuple[str, Principal]:
        """Create a key for ``user``.

        ``default_priority`` None means ``normal``, or ``max_priority`` if that is lower.

        Returns:
            ``(secret, principal)``; the secret is shown once and never stored.

        Raises:
            KeyError_: invalid user name, priority (or a default above the ceiling) or
                weight.
        """
        user = user.strip()
        if not user or len(user) > 128 or any(c.isspace() for c in user):
            raise KeyError_("user name must be 1-128 characters without spaces")
        ceiling = _priority(max_priority)
        default = (PriorityClass.NORMAL.capped(ceiling) if default_priority is None
                   else _priority(default_priority))
        if default.capped(ceiling) != default:
            raise KeyError_(f"default priority {default.label} is above the key's ceiling "
                            f"{ceiling.label}: give --default-priority {ceiling.label} or "
                            "lower, or a higher --max-priority")
        if not weight > 0:
            raise KeyError_("weight must be > 0")
        secret = new_secret()
        now = utcnow()
        key_id = "key_" + secrets.token_hex(6)
        row = {
            "id": key_id,
            "user": user,
            "key_hash": hash_key(secret),
            "prefix": secret[:10],
            "is_admin": admin,
            "created_at": now,
            "expires_at": now + timedelta(days=expires_in_days) if expires_in_days else None,
            "revoked_at": None,
            "rotated_from": rotated_from,
            "max_priority": ceiling.label,
            "default_priority": default.label,
            "weight": weight,
            "models": _models_to_db(models),
        }
        for f in LIMIT_FIELDS:
            row[f] = (limits or {}).get(f)
        with self.engine.begin() as conn:
            conn.execute(insert(api_keys).values(**row))
        return secret, self.get(key_id)

    def verify(self, secret: str, now: datetime | None = None) -> Principal | None:
        """The active key matching ``secret``, or None (unknown, expired or revoked)."""
        p = self.lookup(secret)
        return p if p is not None and p.status(now or utcnow()) == "active" else None

    def lookup(self, secret: str) -> Principal | None:
        """The key matching ``secret`` whatever its status, or None."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 200:
            return None
        h = hash_key(secret)
        if self._sqlite_path is not None:
            raw = self._raw_row(h)
            return None if raw is None else _principal_from_mapping(dict(raw))
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_hash == h)).first()
        return None if row is None else _principal(row)

    def get(self, key_id: str) -> Principal:
        """The key with id ``key_id``. Raises KeyError_ if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None:
            raise KeyError_(f"no key with id {key_id!r}")
        return _principal(row)

    def list(self, *, include_inactive: bool = True) -> builtins.list[Principal]:
        """All keys, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at)).all()
        keys = [_principal(r) for r in rows]
        if not include_inactive:
            now = utcnow()
            keys = [k for k in keys if k.status(now) == "active"]
        return keys

    def resolve(self, id_or_user: str) -> builtins.list[Principal]:
        """Active keys whose id or user is ``id_or_user``. Raises KeyError_ if none."""
        now = utcnow()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(api_keys).where(
                    or_(api_keys.c.id == id_or_user, api_keys.c.user == id_or_user)
                )
            ).all()
        keys = [k for k in map(_principal, rows) if k.status(now) == "active"]
        if not keys:
            raise KeyError_(f"no active key with id or user {id_or_user!r}")
        return keys

    def revoke(self, id_or_user: str) -> builtins.list[Principal]:
        """Revoke every active key of that id or user, at once. Returns them."""
        keys = self.resolve(id_or_user)
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id.in_([k.key_id for k in keys]))
                .values(revoked_at=now)
            )
        return [self.get(k.key_id) for k in keys]

    def rotate(self, id_or_user: str, *, grace_hours: float = 0.0) -> tuple[str, Principal]:
        """Replace a key by a new one with the same user, role, priorities and limits.

        The old key keeps working for ``grace_hours`` (0: it stops at once).

        Raises:
            KeyError_: no active key, or a user with several active keys (give the id).
        """
        keys = self.resolve(id_or_user)
        if len(keys) > 1:
            ids = ", ".join(k.key_id for k in keys)
            raise KeyError_(f"user {id_or_user!r} has several active keys ({ids}); give the id")
        old = keys[0]
        secret, new = self.create(
            old.user,
            admin=old.is_admin,
            max_priority=old.max_priority,
            default_priority=old.default_priority.capped(old.max_priority),
            weight=old.weight,
            rotated_from=old.key_id,
            limits={f: getattr(old, f) for f in LIMIT_FIELDS},
            models=old.models,
        )
        if old.expires_at is not None:
            with self.engine.begin() as conn:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == new.key_id)
                    .values(expires_at=old.expires_at)
                )
            new = self.get(new.key_id)
        end = utcnow() + timedelta(hours=grace_hours)
        with self.engine.begin() as conn:
            if old.expires_at is None or old.expires_at > end:
                conn.execute(
                    update(api_keys).where(api_keys.c.id == old.key_id).values(expires_at=end)
                )
        return secret, new

    def update(self, id_or_user: str, **changes: Any) -> builtins.list[Principal]:
        """Change priorities, weight or limits of every active key of that id or user.

        ``changes`` keys: ``max_priority``, ``default_priority``, ``weight``, ``rpm``,
        ``tpm``, ``max_concurrent``, ``daily_tokens``, ``models`` (a list of names, or
        ``ALL_MODELS`` for every model); a None value is left unchanged.

        Raises:
            KeyError_: unknown key or invalid value.
        """
        values = {k: v for k, v in changes.items() if v is not None}
        allowed = {"max_priority", "default_priority", "weight", "models", *LIMIT_FIELDS}
        bad = set(values) - allowed
        if bad:
            raise KeyError_(f"cannot update {sorted(bad)}")
        keys = self.resolve(id_or_user)
        for name in ("max_priority", "default_priority"):
            if name in values:
                values[name] = _priority(values[name]).label
        if "models" in values:
            values["models"] = None if values["models"] == ALL_MODELS \
                else _models_to_db(values["models"])
        if "weight" in values and not values["weight"] > 0:
            raise KeyError_("weight must be > 0")
        for f in LIMIT_FIELDS:
            if f in values and values[f] < 0:
                raise KeyError_(f"{f} must be >= 0 (0 = unlimited)")
        if values:
            with self.engine.begin() as conn:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id.in_([k.key_id for k in keys]))
                    .values(**values)
                )
        return [self.get(k.key_id) for k in keys]

    def has_admin(self) -> bool:
        """Whether any active admin key exists."""
        return any(k.is_admin for k in self.list(include_inactive=False))


def _priority(value: str | PriorityClass) -> PriorityClass:
    """``value`` as a class (a name, an alias or a class).

    Raises:
        KeyError_: not a priority class.
    """
    if isinstance(value, PriorityClass):
        return value
    try:
        return PriorityClass.parse(value)
    except InvalidPriority:
        raise KeyError_(f"priority must be one of {', '.join(PriorityClass.labels())}: "
                        f"{value!r}") from None
