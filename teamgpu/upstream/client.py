"""The HTTP client to the backends (aiohttp), behind a small interface.

Chosen by measurement (``bench/overhead.py`` and a client micro-benchmark in
``docs/performance.md``): per proxied request aiohttp costs about 80 us of CPU here,
httpx about 440 us, which alone would spend the gateway's 1 ms budget.

aiohttp exceptions are converted here, once, to the gateway's own errors; nothing above
this module sees them:

- connect failure or connect timeout -> :class:`ServiceUnavailable` (503, Retry-After)
- read timeout (silence longer than ``read_timeout_s``) -> :class:`BackendTimeout` (504)
- anything else (reset, protocol error, truncated body) -> :class:`BackendError` (502)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from teamgpu.errors import BackendError, BackendTimeout, GatewayError, ServiceUnavailable


def convert_error(exc: BaseException, backend_url: str, retry_after_s: int) -> GatewayError:
    """Map an aiohttp/asyncio failure to the error the client sees."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return ServiceUnavailable(
            f"backend {backend_url} is not reachable; try again shortly",
            retry_after_s=retry_after_s, code="backend_unavailable",
        )
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return BackendTimeout(f"backend {backend_url} did not answer in time")
    return BackendError(f"backend {backend_url} failed: {type(exc).__name__}: {exc}")


KEEPALIVE_S = 4.0

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What ``content`` holds unread, even after a failure (aiohttp has no public way)."""
    try:
        if not getattr(content, "_buffer", None):
            return b""
        return content._read_nowait(-1)
    except (AttributeError, TypeError, *UPSTREAM_ERRORS):
        return b""


class UpstreamResponse:
    """A backend response whose headers have arrived; the body is read on demand."""

    def __init__(self, resp: aiohttp.ClientResponse, backend_url: str, retry_after_s: int) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.backend_url = backend_url
        self._retry_after_s = retry_after_s

    async def read(self) -> bytes:
        """The whole body. Raises BackendError/BackendTimeout (502/504)."""
        try:
            return await self._resp.read()
        except UPSTREAM_ERRORS as exc:
            raise convert_error(exc, self.backend_url, self._retry_after_s) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, unchanged. Raises BackendError/BackendTimeout.

        When the connection fails, the bytes that arrived before the failure are yielded
        first, then the error is raised (aiohttp's readers raise the failure at once and
        would drop them: the last tokens of a stream that breaks, or all of a short one).
        """
        content = self._resp.content
        try:
            async for chunk in content.iter_any():
                yield chunk
        except UPSTREAM_ERRORS as exc:
            rest = _buffered(content)
            if rest:
                yield rest
            raise convert_error(exc, self.backend_url, self._retry_after_s) from exc

    def close(self) -> None:
        """Close the connection at once (the backend sees the disconnect and aborts)."""
        self._resp.close()

    def release(self) -> None:
        """Return a fully read connection to the pool."""
        self._resp.release()


class UpstreamClient:
    """One pooled aiohttp session for all backends. Create inside the event loop."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, ttl_dns_cache=300,
                # below the 5 s after which uvicorn (as vLLM runs it) closes an idle
                # connection: a pooled connection is never reused as the server closes it
                keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                          sock_read=read_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, backend_url: str,
                   retry_after_s: int) -> UpstreamResponse:
        """POST and return once the response headers arrived.

        Raises:
            ServiceUnavailable, BackendTimeout, BackendError: see the module docstring.
        """
        try:
            resp = await self._session.post(url, data=body, headers=headers)
        except UPSTREAM_ERRORS as exc:
            raise convert_error(exc, backend_url, retry_after_s) from exc
        return UpstreamResponse(resp, backend_url, retry_after_s)

    async def get_json(self, url: str, timeout_s: float) -> tuple[int, Any]:
        """GET ``url``; returns ``(status, parsed JSON or None)``.

        Raises:
            aiohttp.ClientError, asyncio.TimeoutError, OSError: for the health poller, which
            turns any failure into "backend down".
        """
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.content_type == "application/json":
                return r.status, await r.json(content_type=None)
            await r.read()
            return r.status, None

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        """GET ``url``; returns ``(status, body text)``. Raises as :meth:`get_json`."""
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            return r.status, await r.text(errors="replace")

    async def post_json(self, url: str, obj: Any, timeout_s: float) -> tuple[int, Any]:
        """POST ``obj`` as JSON; returns ``(status, parsed JSON or None)``.

        Raises:
            aiohttp.ClientError, TimeoutError, OSError: the caller treats any failure as
            "no answer".
        """
        async with self._session.post(url, json=obj,
                                      timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.content_type == "application/json":
                return r.status, await r.json(content_type=None)
            await r.read()
            return r.status, None

    async def request_bytes(self, method: str, url: str, timeout_s: float) -> tuple[int, bytes]:
        """``method url`` without a body; returns ``(status, body)``.

        Raises:
            ServiceUnavailable, BackendTimeout, BackendError: see the module docstring.
        """
        try:
            async with self._session.request(
                    method, url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status, await r.read()
        except UPSTREAM_ERRORS as exc:
            raise convert_error(exc, url, 5) from exc

    async def close(self) -> None:
        await self._session.close()
