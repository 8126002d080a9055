"""Watching for a client that leaves while its request waits (queue, backend).

One watcher task per request reads the ASGI ``receive`` channel for ``http.disconnect``;
see :class:`DisconnectGuard` and docs/architecture.md (client disconnects and shutdown).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

__all__ = ["ClientDisconnected", "DisconnectGuard", "Guard", "NoGuard"]

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready (audit status 499)."""


class DisconnectGuard:
    """Interrupts the request's awaits when the client disconnects, with one watcher task
    per request (not one per await).

    The watcher reads the ASGI ``receive`` channel for ``http.disconnect``. While an await
    runs under :meth:`run`, a disconnect cancels the handler's task and :meth:`run`
    raises :class:`ClientDisconnected`; outside :meth:`run` (writing the audit row,
    settling limits) a disconnect is only noted, and the next :meth:`run` raises at once.
    :meth:`close` stops the watcher; call it before a streaming response (which watches
    for itself) starts.
    """

    __slots__ = ("_armed", "_cancelling", "_owner", "_receive", "_watcher", "disconnected")

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self._owner: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._armed = False
        self._cancelling = False
        self.disconnected = False

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._armed and self._owner is not None:
            self._cancelling = True
            self._owner.cancel()

    async def run(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the client disconnects first; then ``aw`` is cancelled.

        Raises:
            ClientDisconnected: the client closed the connection (audit status 499).
        """
        if self.disconnected:
            if inspect.iscoroutine(aw):
                aw.close()
            raise ClientDisconnected()
        if self._watcher is None:
            self._owner = asyncio.current_task()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        self._armed = True
        try:
            return await aw
        except asyncio.CancelledError:
            if not self._cancelling:
                raise  # cancelled from elsewhere (server shutdown): not ours to swallow
            raise ClientDisconnected() from None
        finally:
            self._armed = False
            if self._cancelling:
                self._cancelling = False
                assert self._owner is not None
                self._owner.uncancel()

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


class Guard(Protocol):
    """What the pipeline needs of a guard: :class:`DisconnectGuard` or :class:`NoGuard`."""

    async def run(self, aw: Awaitable[T]) -> T: ...

    def close(self) -> None: ...


class NoGuard:
    """The guard of a request without a client connection (a batch item): never trips."""

    async def run(self, aw: Awaitable[T]) -> T:
        return await aw

    def close(self) -> None:
        pass
