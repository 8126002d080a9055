"""A real gateway on loopback for tests, and helpers to check what it answers.

:func:`start_gateway` serves ``teamgpu.app.create_app`` with uvicorn in a
:class:`~tests.support.fake_backend.ServerThread`, so requests cross real sockets and
streams are really streamed. Audit rows are written off the request path;
:meth:`Harness.wait_row` polls the store until the row of a request id appears, and
:meth:`Harness.flush` waits, in the server's own event loop, until everything queued so
far is written.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from teamgpu.api.pipeline import ModelHost
from teamgpu.app import create_app
from teamgpu.auth.keys import KeyStore
from teamgpu.gateway import Gateway
from teamgpu.metrics.prometheus import GpuSource
from teamgpu.settings import Settings
from teamgpu.store.db import open_store
from tests.support.fake_backend import FakeBackend, ServerThread

__all__ = [
    "ANTHROPIC_ERROR_TYPES", "ERROR_KEYS", "HTTPAnswer", "Harness", "assert_anthropic_error",
    "assert_openai_error", "disconnect_mid_stream", "event_data", "sse_events", "start_gateway",
    "wait_until",
]

ERROR_KEYS = {"message", "type", "param", "code"}
# Anthropic's error types (its API reference, "Errors"); 503 is the gateway's "no backend
# can serve now", which Anthropic's API itself calls overloaded (529)
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         405: "invalid_request_error", 413: "request_too_large",
                         415: "invalid_request_error",
                         429: "rate_limit_error", 500: "api_error", 502: "api_error",
                         503: "overloaded_error", 504: "api_error"}


def wait_until(cond: Callable[[], Any], timeout_s: float = 5.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def sse_events(raw: bytes) -> list[bytes]:
    """Split a stream of ``\\n\\n``-terminated events (as the fake writes them) into the
    events' bytes, terminators included. Independent of the gateway's own SSE parser."""
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", f"stream does not end with a complete event: {raw[-80:]!r}"
    return [p + b"\n\n" for p in parts[:-1]]


def event_data(ev: bytes) -> bytes:
    assert ev.startswith(b"data: "), ev
    return ev[len(b"data: "):].rstrip(b"\n")


class _HasClose(Protocol):
    def close(self) -> object: ...


_Closable = TypeVar("_Closable", bound=_HasClose)


class HTTPAnswer(Protocol):
    """An HTTP response as httpx and the SDKs' own httpx builds have it."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def assert_openai_error(r: HTTPAnswer, status: int, *, param: Any = ...,
                        code: Any = ...) -> dict[str, Any]:
    """``r`` is an error in OpenAI's shape with exactly the four keys; returns ``error``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] is None or isinstance(err["code"], str), err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    assert r.headers.get("x-request-id"), r.headers
    return err  # type: ignore[no-any-return]


def assert_anthropic_error(r: HTTPAnswer, status: int) -> dict[str, Any]:
    """``r`` is an error in Anthropic's shape, ``{"type": "error", "error": {"type",
    "message"}}`` and nothing else, with the type Anthropic uses for ``status``; returns
    ``error``."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    err = body["error"]
    assert set(err) == {"type", "message"}, err
    assert err["type"] == ANTHROPIC_ERROR_TYPES[status], err
    assert isinstance(err["message"], str) and err["message"]
    assert r.headers.get("x-request-id"), r.headers
    return err  # type: ignore[no-any-return]


@dataclass
class Harness:
    """A running gateway and what tests need to reach into it."""

    app: Any
    thread: ServerThread
    settings: Settings
    admin_key: str
    user_key: str
    user: str = "alice"
    _clients: list[httpx.Client] = field(default_factory=list)
    _closers: list[Callable[[], object]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def gw(self) -> Gateway:
        """The running gateway's services (set by the app's lifespan)."""
        return self.app.state.gw  # type: ignore[no-any-return]

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def db_path(self) -> Path:
        return self.settings.data_dir / "teamgpu.db"

    def client(self, key: str | None = "user", *, timeout_s: float = 10.0,
               **kw: Any) -> httpx.Client:
        """An HTTP client to the gateway; ``key`` is ``"user"``, ``"admin"``, a secret or
        None (no key)."""
        secret = {"user": self.user_key, "admin": self.admin_key}.get(key or "", key)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                         trust_env=False, **kw)
        self._clients.append(c)
        return c

    def flush(self) -> None:
        """Wait until every audit row queued so far is written."""
        self.thread.call(self.gw.audit.flush())

    def rows(self, request_id: str | None = None) -> list[dict[str, Any]]:
        """Audit rows (of one request id, or all), oldest first."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            if request_id is None:
                cur = conn.execute("SELECT * FROM usage ORDER BY id")
            else:
                cur = conn.execute("SELECT * FROM usage WHERE request_id = ? ORDER BY id",
                                   (request_id,))
            return [dict(r) for r in cur.fetchall()]

    def wait_row(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        """The one audit row of ``request_id``: waits until it is written, then checks that
        there is exactly one."""
        wait_until(lambda: self.rows(request_id), timeout_s, f"audit row of {request_id}")
        self.flush()
        rows = self.rows(request_id)
        assert len(rows) == 1, rows
        return rows[0]

    def keep(self, client: _Closable) -> _Closable:
        """``client`` (an SDK client), closed with the harness's own clients."""
        self._closers.append(client.close)
        return client

    def close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        for close in self._closers:
            close()
        self._closers.clear()


@contextlib.contextmanager
def start_gateway(data_dir: Path, backends: list[str], *, gpu: GpuSource | None = None,
                  host: ModelHost | None = None, declared: dict[str, list[str]] | None = None,
                  **settings: Any) -> Iterator[Harness]:
    """Serve a gateway on loopback in front of ``backends`` with ``settings`` overrides
    (and ``gpu`` as the metrics' GPU source; ``host`` and ``declared`` as ``teamgpu up``
    passes them, see :meth:`teamgpu.gateway.Gateway.open`).

    Creates an admin key (user ``root``) and a user key (user ``alice``) in its store
    before it starts, as ``teamgpu up`` does with its first-run key.
    """
    s = Settings(data_dir=data_dir, backends=backends, **settings)
    store = open_store(s.db_url)
    keys = KeyStore(store)
    admin_key, _ = keys.create("root", admin=True)
    user_key, _ = keys.create("alice")
    app = create_app(s, store=store, gpu=gpu, host=host, declared=declared)
    with ServerThread(app) as thread:
        h = Harness(app=app, thread=thread, settings=s, admin_key=admin_key, user_key=user_key)
        try:
            yield h
        finally:
            h.close_clients()


def disconnect_mid_stream(h: Harness, fake: FakeBackend, path: str, body: dict[str, Any],
                          until: bytes) -> tuple[dict[str, Any], bytes]:
    """From an idle ``fake``, stream ``body`` to ``path`` through ``h``, read until ``until``
    arrives and close the connection there. Checks that ``fake`` aborts the generation, the
    backend slot is freed and the audit row is a 499 ``client_disconnected`` stream with 1 to
    20 completion tokens; returns that row and the bytes read."""
    wait_until(lambda: fake.active == 0, what="an idle backend")
    aborted = fake.aborted
    with h.client().stream("POST", path, json=body) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        chunks = r.iter_raw()
        buf = b""
        while until not in buf:
            buf += next(chunks)
        assert fake.active == 1
    wait_until(lambda: fake.aborted == aborted + 1 and fake.active == 0, 1.0,
               "the backend to abort the generation")
    wait_until(lambda: h.gw.pool.backends[0].in_flight == 0, 1.0, "the backend slot")
    row = h.wait_row(rid)
    assert (row["status"], row["outcome"], row["stream"]) == (499, "client_disconnected", 1)
    assert 1 <= row["completion_tokens"] <= 20
    return row, buf
