"""Relaying a backend's streamed answer to the client, event by event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from teamgpu.errors import GatewayError, error_json
from teamgpu.upstream.client import UpstreamResponse
from teamgpu.upstream.sse import SSEParseError, SSEParser
from teamgpu.upstream.usage import EventAccount

log = logging.getLogger("teamgpu.relay")

STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def mid_stream_error_event(message: str, code: str = "backend_error") -> bytes:
    """The SSE event that ends a stream that broke after it started (fault F13)."""
    return b"data: " + error_json(message, "server_error", None, code) + b"\n\n"


async def read_first_event(
    resp: UpstreamResponse, parser: SSEParser, account: EventAccount
) -> tuple[list[bytes], Any]:
    """Read until the first complete data event (or the end of the stream).

    Returns what to forward first (raw reads; or, when the usage chunk is to be left out,
    the complete events' bytes) and the iterator to go on reading from. Comment-only
    events before it (keep-alives) do not count. The first data event decides whether the
    stream started well: a stream whose first event is an error is answered as a non-200
    JSON error instead (fault F13).
    """
    it = resp.chunks()
    out: list[bytes] = []
    strip = account.strip_usage_chunk
    async for chunk in it:  # the same iterator goes on in the relay
        evs = parser.feed(chunk)
        kept = [ev.raw for ev in evs if account.observe(ev)]
        if strip:
            out += kept  # an incomplete event stays in the parser, which keeps its bytes
        else:
            out.append(chunk)
        if any(ev.data is not None for ev in evs):
            return out, it
    return out, it


class StreamRelay:
    """ASGI response that relays an SSE stream from a backend to the client.

    Bytes go out as they arrive. When the client did not ask for the usage chunk, events
    are forwarded whole (each as soon as its terminating blank line arrives) so that the
    usage chunk the gateway asked for can be left out; otherwise raw reads are forwarded
    unchanged. A disconnect of the client cancels the relay at once and closes the
    backend connection (vLLM then aborts the request, fault F4). A backend failure after
    the stream started ends it with an SSE error event in the client API's shape
    (``error_event(message, code)``; fault F13). ``on_finishing`` is
    awaited just before the client can see the stream end, ``on_end`` after it ended.
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        first_chunks: list[bytes],
        rest: Any,
        parser: SSEParser,
        account: EventAccount,
        *,
        headers: list[tuple[bytes, bytes]],
        on_chunk: Callable[[EventAccount], None] | None,
        on_end: Callable[[str, str | None], Awaitable[None]],
        backend_url: str,
        on_finishing: Callable[[], Awaitable[None]] | None = None,
        error_event: Callable[[str, str], bytes] = mid_stream_error_event,
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
        self.on_finishing = on_finishing
        self.error_event = error_event
        self.outcome = "ok"
        self.error: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                # A client that stops reading after [DONE] got the whole answer.
                self.outcome = "ok" if self.account.done else "client_disconnected"
                pump.cancel()
            watch.cancel()
            for t in (pump, watch):
                try:
                    await t
                except asyncio.CancelledError:
                    pass
                except OSError:  # a server that raises on sending to a closed connection
                    self.outcome = "client_disconnected"
                except Exception as exc:  # a bug: recorded as such, then rendered by Starlette
                    self.outcome = "gateway_error"
                    self.error = f"relay failed: {type(exc).__name__}: {exc}"
                    raise
        except asyncio.CancelledError:
            # the handler task itself was cancelled: the server stopping past its grace
            # period (a client that leaves is seen by ``watch`` above, not as a cancel)
            self.outcome = "gateway_stopped"
            self.error = "the gateway stopped before the stream was complete"
            pump.cancel()
            watch.cancel()
            raise
        finally:
            await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        try:
            self.upstream.close()
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
                await self._send_body(send, chunk)
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
                    await self._send_body(send, out)
            if not account.done and account.error is None:
                self.outcome = "backend_error"
                self.error = "backend closed the stream before [DONE]"
                await self._send_error(send, self.error, "backend_error")
            elif account.error is not None:
                self.outcome = "backend_error"
                self.error = account.error
        except (GatewayError, SSEParseError) as exc:
            self.outcome = getattr(exc, "outcome", "backend_error")
            self.error = f"failed mid-stream: {exc}"
            log.warning("%s", self.error)
            await self._send_error(send, self.error, getattr(exc, "code", None) or "backend_error")
        await self._send_body(send, b"", more_body=False)

    async def _send_body(self, send: Any, body: bytes, *, more_body: bool = True) -> None:
        """Send body bytes; before the ones that end the stream for the client (those
        carrying ``[DONE]``, or the final message), await ``on_finishing`` once.

        ``on_end`` runs only after the last byte went out, so a client that waits for the
        end of a stream and sends its next request at once could otherwise find what
        ``on_finishing`` frees (the limits reservation) still held.
        """
        if self.on_finishing is not None and (self.account.done or not more_body):
            finishing, self.on_finishing = self.on_finishing, None
            await asyncio.shield(finishing())
        await send({"type": "http.response.body", "body": body, "more_body": more_body})

    async def _send_error(self, send: Any, message: str, code: str) -> None:
        """End the stream with an SSE error event (fault F13). When raw reads were
        forwarded and the backend stopped inside an event, that event is terminated first,
        so the error event is not glued to its half."""
        if self.parser.pending and not self.account.strip_usage_chunk:
            await send(self._body(b"\n\n"))
        await send(self._body(self.error_event(message, code)))

    @staticmethod
    def _body(b: bytes) -> dict[str, Any]:
        return {"type": "http.response.body", "body": b, "more_body": True}


def error_from_stream_start(body: bytes) -> tuple[int, bytes]:
    """Status and OpenAI-shaped body for a stream whose first event is an error.

    vLLM puts the HTTP status it means in ``error.code`` (an int): a 4xx keeps it, a 5xx
    becomes 502 (the backend failed, not the gateway), anything else is 400. The body has
    exactly OpenAI's four keys, ``code`` a string or null.
    """
    message: Any = None
    param: Any = None
    code: Any = None
    try:
        obj = orjson.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else None
        if isinstance(err, dict):
            message = err.get("message")
            param, code = err.get("param"), err.get("code")
        elif isinstance(err, str):
            message = err
    except orjson.JSONDecodeError:
        pass
    status = 400
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        status = code if code < 500 else 502
    if not isinstance(message, str) or not message:
        message = body.decode("utf-8", "replace")[:2000]
    if status >= 500:
        return status, error_json(f"backend failed: {message}", "server_error", None,
                                  "backend_error")
    # vLLM names its errors after exceptions ("BadRequestError"); clients expect OpenAI's
    # types, as on the non-streaming path
    return status, error_json(
        message,
        "invalid_request_error",
        param if isinstance(param, str) else None,
        code if isinstance(code, str) else "invalid_request",
    )
