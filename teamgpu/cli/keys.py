"""``teamgpu keys``: create, list, revoke, rotate and update API keys.

Every command works while a gateway runs on the same data directory; the gateway reads
the key on every request, so changes take effect at once.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from teamgpu.auth.keys import ALL_MODELS, KeyError_, KeyStore, Principal
from teamgpu.cli.common import load_settings, print_json, settings_options
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.store.db import open_store

PRIORITY = click.Choice(PriorityClass.accepted_names(), case_sensitive=False)


def _store(overrides: dict[str, Any]) -> KeyStore:
    s = load_settings(**overrides)
    return KeyStore(open_store(s.db_url))




def limit_options(fn: Any) -> Any:
    for name, help_ in reversed([
        ("rpm", "Requests per minute (0 = unlimited; default: the team default)."),
        ("tpm", "Tokens per minute, prompt + completion (0 = unlimited)."),
        ("max-concurrent", "Requests at once (0 = unlimited)."),
        ("daily-tokens", "Tokens per UTC day (0 = unlimited)."),
    ]):
        fn = click.option(f"--{name}", type=click.IntRange(min=0), default=None, help=help_)(fn)
    fn = click.option("--weight", type=click.FloatRange(min=0, min_open=True), default=None,
                      help="Fair-share weight (default 1).")(fn)
    fn = click.option("--default-priority", type=PRIORITY, default=None,
                      help="Class used when a request sends no X-Priority.")(fn)
    fn = click.option("--max-priority", type=PRIORITY, default=None,
                      help="Highest class this key may use (ceiling).")(fn)
    return click.option("--models", default=None, metavar="A,B",
                        help="Models this key may use: served names or aliases, comma-separated "
                             "(default: all; `keys update --models all` lifts a list).")(fn)


def _models(value: str | None) -> list[str] | None:
    """``--models A,B`` as a list (None when not given)."""
    if value is None:
        return None
    return [m.strip() for m in value.split(",") if m.strip()] or [""]


def _show_secret(secret: str, p: Principal, as_json: bool, verb: str) -> None:
    if as_json:
        print_json({"key": secret, **p.public()})
        return
    click.echo(f"{verb} key {p.key_id} for user {p.user}{' (admin)' if p.is_admin else ''}.")
    if p.expires_at:
        click.echo(f"Expires: {p.expires_at.isoformat()}")
    click.echo("\nThe key is shown this once; store it now:\n")
    click.echo(f"  {secret}\n")


def _fail(exc: KeyError_) -> None:
    raise click.ClickException(str(exc))


@click.group("keys")
def keys_group() -> None:
    """Manage API keys (stored hashed; a key is shown once, when made)."""


@keys_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Admin role: /stats, dashboard, key management.")
@click.option("--expires-in", "expires_in", type=click.FloatRange(min=0, min_open=True),
              default=None, help="Days until the key expires (default: never).")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@settings_options
def create(_settings_overrides: dict[str, Any], name: str, admin: bool, expires_in: float | None,
           models: str | None, max_priority: str | None, default_priority: str | None,
           weight: float | None, rpm: int | None, tpm: int | None, max_concurrent: int | None,
           daily_tokens: int | None, as_json: bool) -> None:
    """Create a key for user NAME and show it once."""
    ks = _store(_settings_overrides)
    try:
        secret, p = ks.create(
            name, admin=admin, expires_in_days=expires_in,
            max_priority=max_priority or PriorityClass.HIGH,
            default_priority=default_priority,  # None: normal, or the ceiling if lower
            weight=weight or 1.0,
            limits={"rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent,
                    "daily_tokens": daily_tokens},
            models=_models(models),
        )
    except KeyError_ as exc:
        _fail(exc)
        return
    _show_secret(secret, p, as_json, "Created")
    others = [k.key_id for k in ks.list(include_inactive=False)
              if k.user == p.user and k.key_id != p.key_id]
    if others:
        # stderr: the --json document on stdout stays one object
        click.echo(f"Note: {p.user} now has {len(others) + 1} active keys ({', '.join(others)} "
                   f"and {p.key_id}). Rate limits and quotas apply per key, fair share per "
                   f"user. To replace a key instead, use `teamgpu keys rotate {p.user}`.",
                   err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Include revoked and expired keys.")
@settings_options
def list_(_settings_overrides: dict[str, Any], as_json: bool, show_all: bool) -> None:
    """List keys (never their secrets)."""
    ks = _store(_settings_overrides)
    now = datetime.now(UTC)
    keys = [k for k in ks.list() if show_all or k.status(now) == "active"]
    if as_json:
        print_json([{**k.public(), "status": k.status(now)} for k in keys])
        return
    t = Table("id", "user", "prefix", "role", "status", "models", "priority", "weight", "rpm",
              "tpm", "created", "expires")
    for k in keys:
        t.add_row(k.key_id, k.user, k.prefix + "…", "admin" if k.is_admin else "user",
                  k.status(now), "all" if k.models is None else ",".join(k.models),
                  f"{k.default_priority.label}≤{k.max_priority.label}", f"{k.weight:g}",
                  _lim(k.rpm), _lim(k.tpm), k.created_at.strftime("%Y-%m-%d %H:%M"),
                  k.expires_at.strftime("%Y-%m-%d %H:%M") if k.expires_at else "never")
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def _lim(v: int | None) -> str:
    return "default" if v is None else ("unlimited" if v == 0 else str(v))


@keys_group.command("revoke")
@click.argument("id_or_user")
@settings_options
def revoke(_settings_overrides: dict[str, Any], id_or_user: str) -> None:
    """Revoke a key by id, or every active key of a user. Takes effect at once."""
    ks = _store(_settings_overrides)
    try:
        keys = ks.revoke(id_or_user)
    except KeyError_ as exc:
        _fail(exc)
        return
    for k in keys:
        click.echo(f"Revoked {k.key_id} ({k.user}).")


@keys_group.command("rotate")
@click.argument("id_or_user")
@click.option("--grace", type=click.FloatRange(min=0), default=0.0,
              help="Hours the old key keeps working (default 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@settings_options
def rotate(_settings_overrides: dict[str, Any], id_or_user: str, grace: float,
           as_json: bool) -> None:
    """Replace a key by a new one; the old one works for --grace hours more."""
    ks = _store(_settings_overrides)
    try:
        secret, p = ks.rotate(id_or_user, grace_hours=grace)
    except KeyError_ as exc:
        _fail(exc)
        return
    _show_secret(secret, p, as_json, "Rotated; new")
    if not as_json:
        click.echo(f"The old key {p.rotated_from} works for {grace:g} more hour(s).")


@keys_group.command("update")
@click.argument("id_or_user")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@settings_options
def update_(_settings_overrides: dict[str, Any], id_or_user: str, models: str | None,
            max_priority: str | None, default_priority: str | None, weight: float | None,
            rpm: int | None, tpm: int | None, max_concurrent: int | None,
            daily_tokens: int | None, as_json: bool) -> None:
    """Change the models, priorities, weight or limits of a key (or of every key of a
    user)."""
    ks = _store(_settings_overrides)
    try:
        keys = ks.update(id_or_user, models=ALL_MODELS if models == ALL_MODELS
                         else _models(models), max_priority=max_priority,
                         default_priority=default_priority, weight=weight, rpm=rpm,
                         tpm=tpm, max_concurrent=max_concurrent, daily_tokens=daily_tokens)
    except KeyError_ as exc:
        _fail(exc)
        return
    if as_json:
        print_json([k.public() for k in keys])
        return
    for k in keys:
        click.echo(f"Updated {k.key_id} ({k.user}).")
