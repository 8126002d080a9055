"""Start-up checks: a configuration the gateway cannot work with fails when ``serve`` or
``up`` starts, with the fix in the message, or is adapted with a logged warning. Never
per request.

What is checked here (the engine's own flags are checked by
:func:`teamgpu.engine.supervisor.build_command` and :func:`engine_capacity`):

- the scheduler's settings, against the in-flight slots per backend: reserves that leave
  the ``low`` class no slot are shrunk to fit, with a warning (:func:`scheduler_config`);
- ``redis_url``'s scheme;
- the store: it must open and migrate (:func:`open_store_checked`);
- the gateway's port: it must be free before an engine is started for it
  (:func:`check_port_free`).

Each refusal is a :class:`ConfigError`; the CLI prints its message and exits with
status 1.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
from urllib.parse import urlsplit

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from teamgpu.scheduler import FairQueueConfig, PriorityClass, SchedulerConfigError
from teamgpu.settings import Settings, mask_url
from teamgpu.store.db import open_store

__all__ = [
    "DEFAULT_INFLIGHT",
    "ConfigError",
    "check_port_free",
    "check_settings",
    "engine_capacity",
    "open_store_checked",
    "scheduler_config",
]

log = logging.getLogger("teamgpu.preflight")

DEFAULT_INFLIGHT = 16
"""In-flight slots per backend when neither ``--max-inflight`` nor the engine's
``--max-num-seqs`` says (vLLM's ``--max-num-seqs`` as ``teamgpu up`` sets it on the CPU)."""
REDIS_SCHEMES = ("redis", "rediss", "unix")


class ConfigError(Exception):
    """A configuration the gateway cannot work with. The message names the setting, its
    value and the fix; ``serve`` and ``up`` print it and exit with status 1."""


def scheduler_config(s: Settings, inflight_per_backend: int) -> tuple[FairQueueConfig, list[str]]:
    """The scheduler's configuration, fitted to ``inflight_per_backend`` slots.

    The reserves (``reserved_slots_high``, ``reserved_slots_normal``) must leave the
    ``low`` class at least one slot, or no batch request could ever start. When they do
    not (``--max-inflight 1``, an engine started with ``--max-num-seqs 3``), they are
    shrunk to fit, ``normal``'s first: the high reserve keeps as many slots as it can.

    Returns:
        The configuration, and the warnings to log (one per adaptation).

    Raises:
        ConfigError: a setting the scheduler cannot work with (both token weights 0, ...).
    """
    try:
        cfg = FairQueueConfig(
            input_token_weight=s.input_token_weight,
            output_token_weight=s.output_token_weight,
            aging_s=s.aging_s,
            max_queued_per_user=s.max_queued_per_user,
            max_queued_total=s.max_queued_total,
            queue_timeout_s={PriorityClass.HIGH: s.queue_timeout_high_s,
                             PriorityClass.NORMAL: s.queue_timeout_normal_s,
                             PriorityClass.LOW: s.queue_timeout_low_s},
            reserved_slots_high=s.reserved_slots_high,
            reserved_slots_normal=s.reserved_slots_normal,
            kv_cache_high_watermark=s.kv_cache_high_watermark,
        )
    except SchedulerConfigError as exc:
        raise ConfigError(f"scheduler settings: {exc}") from None
    if inflight_per_backend < 1:
        raise ConfigError(f"max_inflight_per_backend={inflight_per_backend}: must be at least 1")
    warnings: list[str] = []
    if inflight_per_backend - cfg.reserved_slots_total < 1:
        high = min(cfg.reserved_slots_high, inflight_per_backend - 1)
        normal = min(cfg.reserved_slots_normal, inflight_per_backend - 1 - high)
        warnings.append(
            f"{inflight_per_backend} in-flight slot(s) per backend leave no slot for low with "
            f"reserved_slots_high={cfg.reserved_slots_high} and reserved_slots_normal="
            f"{cfg.reserved_slots_normal}; using reserved_slots_high={high} and "
            f"reserved_slots_normal={normal}. To keep the reserves, give the engine more "
            f"sequences (--engine-arg=--max-num-seqs=N, or --max-inflight N) with N > "
            f"{cfg.reserved_slots_total}, or set the reserves lower to silence this.")
        cfg = dataclasses.replace(cfg, reserved_slots_high=high, reserved_slots_normal=normal)
    cfg.check_capacity(inflight_per_backend)
    return cfg, warnings


def check_settings(s: Settings) -> None:
    """Settings that would fail later, refused now.

    Raises:
        ConfigError: ``redis_url`` is not a ``redis://``, ``rediss://`` or ``unix://`` URL.
    """
    if s.redis_url is not None:
        url = s.redis_url.get_secret_value()
        if urlsplit(url).scheme not in REDIS_SCHEMES:
            raise ConfigError(
                f"redis_url={mask_url(url)!r}: must start with redis://, rediss:// or "
                "unix:// (e.g. redis://127.0.0.1:6379/0)")


def open_store_checked(s: Settings) -> Engine:
    """Open the store and bring its schema up to date.

    Raises:
        ConfigError: the database cannot be opened or migrated (message: the masked URL,
            the database's error, and what to check).
    """
    try:
        return open_store(s.db_url)
    except (SQLAlchemyError, OSError) as exc:
        where = mask_url(s.db_url)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("check that the data directory is writable (--data-dir)"
                if where.startswith("sqlite") else
                "check that the database server runs and the URL, user and password are right")
        raise ConfigError(f"cannot open the store at {where}: {first}; {hint}") from None


def check_port_free(host: str, port: int) -> None:
    """Refuse a gateway address that another process listens on, before anything starts.

    Raises:
        ConfigError: the address is in use, or cannot be bound (``host`` not local).
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use by another process (another teamgpu?): "
                    "stop it or pass --port") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host"
                              ) from None


def engine_capacity(max_num_seqs: str | None, default: int) -> int:
    """The in-flight slots an engine's ``--max-num-seqs`` value gives.

    Raises:
        ConfigError: the value is not a positive integer.
    """
    if max_num_seqs is None:
        return default
    try:
        n = int(max_num_seqs)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--max-num-seqs={max_num_seqs!r}: must be a positive integer "
                          "(e.g. --engine-arg=--max-num-seqs=16)")
    return n
