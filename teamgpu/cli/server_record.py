"""Where a running ``teamgpu up`` or ``serve`` listens, recorded in its data directory.

``up`` and ``serve`` write ``server.json`` in the data directory once the gateway is
open, and remove it when they stop; ``teamgpu doctor`` (and any other command given the
same ``--data-dir``) reads it to check the server that runs, not the default ports.
A record whose process is gone (a crash, ``kill -9``) is ignored and reported as stale.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["RECORD_NAME", "ServerRecord", "read_record", "remove_record", "write_record"]

RECORD_NAME = "server.json"


@dataclass(frozen=True)
class ServerRecord:
    """A running server as it recorded itself.

    Attributes:
        kind: ``up`` (engine and gateway) or ``serve`` (gateway only).
        pid: the gateway process.
        gateway_url: where clients reach the gateway (``http://HOST:PORT``; a wildcard
            listen address is recorded as 127.0.0.1).
        backends: the backend base URLs the gateway serves from.
        engine_url: ``up``'s private engine URL (loopback), else None.
        served_model_name: the model ``up`` serves, else None.
        model: the model folder or id ``up`` launched, else None.
        engine_args: the flags ``up`` gave vLLM.
        started_at: ISO time the record was written (UTC).
    """

    kind: str
    pid: int
    gateway_url: str
    backends: list[str] = field(default_factory=list)
    engine_url: str | None = None
    served_model_name: str | None = None
    model: str | None = None
    engine_args: list[str] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


def gateway_url(host: str, port: int) -> str:
    """The URL a local client uses for a gateway listening on ``host:port``."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_record(data_dir: Path, record: ServerRecord) -> Path:
    """Write ``record`` atomically as ``data_dir/server.json``; returns the path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / RECORD_NAME
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
    tmp.replace(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_record(data_dir: Path) -> tuple[ServerRecord | None, str | None]:
    """The record of the server running with ``data_dir``.

    Returns:
        ``(record, None)`` for a live server; ``(None, note)`` for a stale or unreadable
        record (the note says why); ``(None, None)`` when there is none.
    """
    path = data_dir / RECORD_NAME
    try:
        data = json.loads(path.read_text())
        record = ServerRecord(**data)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError) as exc:
        return None, f"{path} is unreadable ({exc})"
    if not _alive(record.pid):
        return None, f"{path} names process {record.pid}, which is not running (stale)"
    return record, None


def remove_record(data_dir: Path, pid: int) -> None:
    """Remove ``data_dir/server.json`` if it is this process's (``pid``) record."""
    path = data_dir / RECORD_NAME
    with contextlib.suppress(OSError, ValueError, TypeError):
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
