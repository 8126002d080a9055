"""Backends: OpenAI-compatible servers (vLLM) behind the gateway, and their health.

Each backend is polled every ``health_interval_s``: ``GET /health`` (vLLM) and
``GET /v1/models`` for its served model names and ``max_model_len``. A backend that refuses
the connection or answers an error, on a poll or on the request path, is marked down at
once; one that is only slow (a poll times out after ``HEALTH_TIMEOUT_S``) is marked down
after ``SLOW_POLLS_BEFORE_DOWN`` slow polls in a row, because an engine busy on a loaded
machine answers its health check late while it keeps serving. A backend is put back when
a poll succeeds again. The last known model list is kept while it is down, so a
client asking for a known model gets 503 with ``Retry-After`` rather than 404.

Choosing a backend (:meth:`BackendPool.pick`): among the up backends serving the model that
are not draining (:meth:`BackendPool.drain`) and not excluded by the caller, the fewest
requests in flight; or, with ``routing="affinity"`` and a routing key, the backend that
served the prompt's prefix unless it is much busier (:mod:`teamgpu.upstream.routing`). A
backend that goes down is forgotten by the router: a restarted engine's cache is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from teamgpu.upstream.client import UpstreamClient
from teamgpu.upstream.routing import PrefixRouter, RoutingKey

log = logging.getLogger("teamgpu.backends")

HEALTH_TIMEOUT_S = 3.0
"""Seconds a health poll (each of its two requests) may take."""
SLOW_POLLS_BEFORE_DOWN = 3
"""Timed-out polls in a row that mark an up backend down (about 15 s at the defaults)."""


@dataclass
class Backend:
    """One OpenAI-compatible server.

    Attributes:
        url: base URL without ``/v1``.
        up: answered its last health poll.
        models: served model name -> model card (from ``/v1/models``).
        in_flight: requests this gateway has open on it.
        draining: being stopped: :meth:`BackendPool.pick` gives it no new requests while
            those in flight finish.
    """

    url: str
    up: bool = False
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: int = 0
    last_change: float = field(default_factory=time.monotonic)
    last_error: str | None = None
    slow_polls: int = 0
    draining: bool = False

    @property
    def drained(self) -> bool:
        """Draining and nothing in flight any more: safe to stop."""
        return self.draining and self.in_flight == 0

    def mark(self, up: bool, error: str | None = None) -> None:
        if up != self.up:
            log.log(logging.INFO if up else logging.WARNING, "backend %s is %s%s", self.url,
                    "up" if up else "down", f": {error}" if error else "")
            self.last_change = time.monotonic()
        self.up = up
        self.last_error = error
        if up:
            self.slow_polls = 0


class BackendPool:
    """The backends and a health-poll task. Create and start inside the event loop.

    Args:
        urls: base URLs of the backends, without ``/v1``.
        client: the HTTP client for health polls.
        health_interval_s: seconds between two polls of each backend.
        aliases: extra model names -> served model names.
        routing: ``affinity`` (prefix affinity balanced against load, when :meth:`pick`
            gets a routing key) or ``least_loaded`` (keys are ignored).
        router: the prefix router (a fresh :class:`PrefixRouter` with its defaults when
            None).
    """

    def __init__(
        self,
        urls: list[str],
        client: UpstreamClient,
        *,
        health_interval_s: float = 2.0,
        aliases: dict[str, str] | None = None,
        routing: Literal["affinity", "least_loaded"] = "affinity",
        router: PrefixRouter | None = None,
    ) -> None:
        self.backends = [Backend(u) for u in urls]
        self.client = client
        self.health_interval_s = health_interval_s
        self.aliases = dict(aliases or {})
        self.routing = routing
        self.router = router if router is not None else PrefixRouter()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        """Poll every backend once, then keep polling in the background."""
        await self.poll_all()
        self._task = asyncio.create_task(self._run(), name="teamgpu-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Poll every backend now rather than at the next interval."""
        self._wake.set()

    def declare(self, url: str, names: list[str]) -> Backend:
        """The backend at ``url``, known to serve ``names`` before it ever answered (an
        engine of ``teamgpu up`` that starts on demand): the names resolve, so a request
        for one of them is not a 404 while the engine is stopped. Its first successful
        poll replaces them with what it really serves."""
        url = url.rstrip("/")
        b = next((x for x in self.backends if x.url == url), None)
        if b is None:
            b = Backend(url)
            self.backends.append(b)
        for n in names:
            b.models.setdefault(n, {"id": n, "object": "model"})
        return b

    def add(self, url: str) -> Backend:
        b = Backend(url.rstrip("/"))
        self.backends.append(b)
        self._wake.set()
        return b

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.health_interval_s)
            self._wake.clear()
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(b) for b in self.backends))

    async def poll(self, b: Backend) -> None:
        """One health check: ``/health`` (404 tolerated for non-vLLM servers), then models."""
        was_up = b.up
        try:
            await self._poll(b)
        finally:
            if was_up and not b.up:
                self.router.forget(b.url)

    async def _poll(self, b: Backend) -> None:
        try:
            status, _ = await self.client.get_text(f"{b.url}/health", HEALTH_TIMEOUT_S)
            if status >= 500:
                b.mark(False, f"/health answered {status}")
                return
            status, body = await self.client.get_json(f"{b.url}/v1/models", HEALTH_TIMEOUT_S)
            if status != 200 or not isinstance(body, dict):
                b.mark(False, f"/v1/models answered {status}")
                return
            data = body.get("data") or []
            b.models = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}
            b.mark(True)
        except TimeoutError:  # also aiohttp's timeouts: slow, not (yet) gone
            b.slow_polls += 1
            error = f"health poll timed out after {HEALTH_TIMEOUT_S:g} s"
            if not b.up or b.slow_polls >= SLOW_POLLS_BEFORE_DOWN:
                b.mark(False, f"{error} ({b.slow_polls} in a row)")
            else:
                log.info("backend %s is slow: %s (%d in a row; down after %d)", b.url, error,
                         b.slow_polls, SLOW_POLLS_BEFORE_DOWN)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            b.mark(False, f"{type(exc).__name__}: {exc}")

    def report_failure(self, b: Backend, error: str) -> None:
        """The request path could not reach ``b``: mark it down and re-poll soon."""
        if b.up:
            self.router.forget(b.url)
        b.mark(False, error)
        self._wake.set()

    # --- model names ------------------------------------------------------------------
    def served_names(self) -> list[str]:
        """Served model names known from any backend (up or down), in backend order."""
        names: list[str] = []
        for b in self.backends:
            for m in b.models:
                if m not in names:
                    names.append(m)
        return names

    def resolve(self, name: str) -> str | None:
        """Map a requested model name to a served model name, or None if unknown.

        Accepted: a served name; an alias from the settings; the last path component of
        a served name (``org/Model`` answers to ``Model``) or of the model's ``root``.
        """
        served = self.served_names()
        if name in served:
            return name
        target = self.aliases.get(name)
        if target is not None and target in served:
            return target
        for b in self.backends:
            for mid, card in b.models.items():
                root = str(card.get("root") or "")
                if name in (mid.rsplit("/", 1)[-1], root, root.rstrip("/").rsplit("/", 1)[-1]):
                    return mid
        return None

    def names_for_clients(self) -> list[str]:
        """Every name a client may send: served names, then aliases to served names."""
        served = self.served_names()
        return served + [a for a, t in self.aliases.items() if t in served and a not in served]

    def card(self, served: str) -> dict[str, Any]:
        for b in self.backends:
            if served in b.models:
                return b.models[served]
        return {"id": served, "object": "model"}

    def candidates(self, served: str) -> list[Backend]:
        """Backends that serve ``served`` (up or down)."""
        return [b for b in self.backends if served in b.models]

    def pick(self, served: str, route_key: RoutingKey | None = None, *,
             exclude: Collection[str] = ()) -> Backend | None:
        """The backend for a request to ``served``, or None when none can take it (503).

        Candidates are the up backends serving ``served`` that are not draining and whose
        URL is not in ``exclude`` (a failover retry passes the backend that just failed).
        Without ``route_key``, or with ``routing="least_loaded"``: the fewest requests in
        flight, the first in pool order on a tie. With a key: the router's choice
        (:meth:`PrefixRouter.choose`): the backend holding the longest prefix of the
        prompt unless it is much busier, else the least-loaded one.

        Picking records nothing: call :meth:`record` once the request was sent.
        """
        ups = [b for b in self.candidates(served)
               if b.up and not b.draining and b.url not in exclude]
        if not ups:
            return None
        if route_key is None or self.routing != "affinity":
            return min(ups, key=lambda b: b.in_flight)
        url = self.router.choose(served, [b.url for b in ups], route_key,
                                 {b.url: b.in_flight for b in ups})
        return next(b for b in ups if b.url == url)

    def record(self, served: str, route_key: RoutingKey | None, backend: Backend) -> None:
        """``backend`` was sent a request to ``served`` with ``route_key``: it now holds
        that prefix in its cache. Nothing happens without a key or with
        ``routing="least_loaded"``."""
        if route_key is not None and self.routing == "affinity":
            self.router.record(served, route_key, backend.url)

    def backend(self, url: str) -> Backend:
        """The backend with base URL ``url`` (a trailing ``/`` is ignored).

        Raises:
            KeyError: no backend has that URL.
        """
        url = url.rstrip("/")
        for b in self.backends:
            if b.url == url:
                return b
        raise KeyError(url)

    def drain(self, url: str) -> Backend:
        """Give the backend at ``url`` no new requests; those in flight finish. Wait for
        ``Backend.drained`` before stopping it. Its router entries are kept (an
        :meth:`undrain` finds its cache as it was).

        Raises:
            KeyError: no backend has that URL.
        """
        b = self.backend(url)
        if not b.draining:
            log.info("backend %s is draining (%d in flight)", b.url, b.in_flight)
        b.draining = True
        return b

    def undrain(self, url: str) -> Backend:
        """Give the backend at ``url`` new requests again.

        Raises:
            KeyError: no backend has that URL.
        """
        b = self.backend(url)
        if b.draining:
            log.info("backend %s takes requests again", b.url)
        b.draining = False
        return b

    def any_up(self) -> bool:
        return any(b.up for b in self.backends)

    def models_unknown(self) -> bool:
        """Whether some backend never told its models (down since the gateway started):
        an unknown model name may then be one of its models."""
        return any(not b.up and not b.models for b in self.backends)
