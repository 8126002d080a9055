"""Sending a request to a backend, and relaying its streamed answer event by event.

httpx exceptions are converted here, once, to the gateway's own errors
(:func:`convert_httpx_error`); nothing above this module sees an httpx exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from teamgpu.errors import BackendError, BackendTimeout, GatewayError, ServiceUnavailable, error_json
from teamgpu.upstream.sse import SSEParseError, SSEParser
from teamgpu.upstream.usage import StreamAccount

log = logging.getLogger("teamgpu.relay")

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def convert_httpx_error(exc: httpx.HTTPError, backend_url: str, retry_after_s: int) -> GatewayError:
    """Map an httpx failure to the error the client sees.

    Connect failures -> 503 with Retry-After (the backend is down or restarting);
    timeouts -> 504; anything else (reset, protocol error) -> 502.
    """
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return ServiceUnavailable(
            f"backend {backend_url} is not reachable; try again shortly",
            retry_after_s=retry_after_s,
            code="backend_unavailable",
        )
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"backend {backend_url} did not answer in time ({type(exc).__name__})")
    return BackendError(f"backend {backend_url} failed: {type(exc).__name__}: {exc}")


async def open_stream(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    backend_url: str,
    retry_after_s: int,
) -> httpx.Response:
    """POST ``body`` to ``url`` and return once the response headers arrived.

    The caller owns the returned response and must ``aclose()`` it.

    Raises:
        ServiceUnavailable, BackendTimeout, BackendError: see :func:`convert_httpx_error`.
    """
    req = client.build_request("POST", url, content=body, headers=headers)
    try:
        return await client.send(req, stream=True)
    except httpx.HTTPError as exc:
        raise convert_httpx_error(exc, backend_url, retry_after_s) from exc


def mid_stream_error_event(message: str, code: str = "backend_error") -> bytes:
    """The SSE event that ends a stream that broke after it started (fault F13)."""
    return b"data: " + error_json(message, "server_error", None, code) + b"\n\n"


async def read_first_event(
    resp: httpx.Response, parser: SSEParser, account: StreamAccount
) -> tuple[list[bytes], Any]:
    """Read until the first complete event (or the end of the stream).

    Returns the raw chunks read (to forward), and the iterator to go on reading from.
    The first event decides whether the stream started well: a stream whose first event
    is an error is answered as a non-200 JSON error instead (fault F13).
    """
    it = resp.aiter_raw()
    chunks: list[bytes] = []
    async for chunk in it:
        chunks.append(chunk)
        evs = parser.feed(chunk)
        if evs:
            kept = [ev.raw for ev in evs if account.observe(ev)]
            if account.strip_usage_chunk:
                chunks = kept
            return chunks, it
    return chunks, it


class StreamRelay:
    """ASGI response that relays an SSE stream from a backend to the client.

    Bytes go out as they arrive. When the client did not ask for the usage chunk, events
    are forwarded whole (each as soon as its terminating blank line arrives) so that the
    usage chunk the gateway asked for can be left out; otherwise raw reads are forwarded
    unchanged. A disconnect of the client cancels the relay at once and closes the
    backend connection (vLLM then aborts the request, fault F4). A backend failure after
    the stream started ends it with an SSE error event (fault F13).
    """

    def __init__(
        self,
        upstream: httpx.Response,
        first_chunks: list[bytes],
        rest: Any,
        parser: SSEParser,
        account: StreamAccount,
        *,
        headers: list[tuple[bytes, bytes]],
        on_chunk: Callable[[StreamAccount], None] | None,
        on_end: Callable[[str, str | None], Awaitable[None]],
        backend_url: str,
    ) -> None:
        self.upstream = upstream
        self.first_chunks = first_chunks
        self.rest = rest
        self.parser = parser
        self.account = account
        self.headers = headers
        self.on_chunk = on_chunk
        self.on_end = on_end
        self.backend_url = backend_url
        self.outcome = "ok"
        self.error: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                self.outcome = "client_disconnected"
                pump.cancel()
            watch.cancel()
            for t in (pump, watch):
                try:
                    await t
                except (asyncio.CancelledError, OSError):
                    pass
        except asyncio.CancelledError:
            self.outcome = "client_disconnected"
            pump.cancel()
            watch.cancel()
            raise
        finally:
            await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            await self.on_end(self.outcome, self.error)

    async def _watch(self, receive: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return

    async def _pump(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        for chunk in self.first_chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        account, parser, strip = self.account, self.parser, self.account.strip_usage_chunk
        try:
            async for chunk in self.rest:
                evs = parser.feed(chunk)
                if strip:
                    out = b"".join([ev.raw for ev in evs if account.observe(ev)])
                else:
                    for ev in evs:
                        account.observe(ev)
                    out = chunk
                if evs and self.on_chunk is not None:
                    self.on_chunk(account)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            if not account.done and account.error is None:
                self.outcome = "backend_error"
                self.error = "backend closed the stream before [DONE]"
                await send(self._body(mid_stream_error_event(self.error)))
            elif account.error is not None:
                self.outcome = "backend_error"
                self.error = account.error
        except (httpx.HTTPError, SSEParseError) as exc:
            self.outcome = "backend_timeout" if isinstance(exc, httpx.TimeoutException) else "backend_error"
            self.error = f"backend {self.backend_url} failed mid-stream: {type(exc).__name__}: {exc}"
            log.warning("%s", self.error)
            await send(self._body(mid_stream_error_event(self.error)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _body(b: bytes) -> dict[str, Any]:
        return {"type": "http.response.body", "body": b, "more_body": True}


def error_from_stream_start(body: bytes) -> tuple[int, bytes]:
    """Status and OpenAI-shaped body for a stream whose first event is an error."""
    try:
        obj = orjson.loads(body)
        err = obj.get("error", obj)
        code = err.get("code") if isinstance(err, dict) else None
        status = int(code) if isinstance(code, int) and 400 <= code < 600 else 400
        if isinstance(err, dict) and "message" in err:
            return status, orjson.dumps({"error": {
                "message": err.get("message"),
                "type": err.get("type") or "invalid_request_error",
                "param": err.get("param"),
                "code": err.get("code"),
            }})
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        pass
    return 400, error_json(body.decode("utf-8", "replace")[:2000], "invalid_request_error")
