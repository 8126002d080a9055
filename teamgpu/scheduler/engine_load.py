"""The engine's own load, scraped from vLLM's Prometheus ``/metrics``.

``Admission`` holds back the lower classes while the engine reports waiting requests or
a nearly full KV cache. ``EngineLoadPoller.run`` scrapes every ``interval_ms`` in the
background; ``EngineLoadPoller.latest`` is the cheap synchronous view ``Admission`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["EngineLoad", "EngineLoadPoller", "fetch_engine_load", "parse_engine_load"]

logger = logging.getLogger(__name__)

_WAITING = "vllm:num_requests_waiting"
_KV_USAGE = "vllm:kv_cache_usage_perc"
_KV_USAGE_V0 = "vllm:gpu_cache_usage_perc"  # the name before vLLM 0.10
_WANTED = (_WAITING, _KV_USAGE, _KV_USAGE_V0)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's load at one scrape.

    Attributes:
        num_requests_waiting: Requests waiting inside the engine (summed over the
            ``model_name``/``engine`` label sets of ``vllm:num_requests_waiting``).
        kv_cache_usage_perc: KV-cache usage as a fraction 0..1 (vLLM names it
            ``_perc`` but reports 1.0 for full); the largest over label sets.
    """

    num_requests_waiting: float
    kv_cache_usage_perc: float


def parse_engine_load(text: str) -> EngineLoad | None:
    """Parse vLLM's Prometheus text exposition.

    Only the lines of the two gauges are handed to ``prometheus_client``'s parser (the
    full page carries large histograms and is parsed on the event loop).
    ``vllm:num_requests_waiting`` is summed over its label sets; for
    ``vllm:kv_cache_usage_perc`` (or the older ``vllm:gpu_cache_usage_perc``) the largest
    value is taken, since a sum of fractions over engines would exceed 1 and an engine
    whose cache is full is what matters.

    Args:
        text: The body of ``GET /metrics``.

    Returns:
        The load, or None when neither gauge is present.

    Raises:
        ValueError: The selected lines are not valid exposition text.
    """
    lines = [
        line
        for line in text.splitlines()
        if line.startswith(_WANTED)
        or (line.startswith(("# HELP ", "# TYPE ")) and line[7:].startswith(_WANTED))
    ]
    waiting: float | None = None
    kv: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if not math.isfinite(sample.value):
                continue
            if sample.name == _WAITING:
                waiting = (waiting or 0.0) + sample.value
            elif sample.name in (_KV_USAGE, _KV_USAGE_V0):
                kv[sample.name] = max(kv.get(sample.name, 0.0), sample.value)
    if waiting is None and not kv:
        return None
    usage = kv.get(_KV_USAGE, kv.get(_KV_USAGE_V0, 0.0))
    return EngineLoad(num_requests_waiting=waiting or 0.0, kv_cache_usage_perc=usage)


async def fetch_engine_load(
    client: httpx.AsyncClient, url: str, *, timeout_s: float = 2.0
) -> EngineLoad | None:
    """Scrape one ``/metrics`` page.

    Args:
        client: The HTTP client (its transport is the test seam).
        url: Full URL of the engine's ``/metrics``.
        timeout_s: Request timeout in seconds.

    Returns:
        The load, or None on any failure (connection, timeout, non-2xx status, a page
        without the gauges or one that does not parse). Never raises for those.
    """
    try:
        response = await client.get(url, timeout=timeout_s)
        response.raise_for_status()
        return parse_engine_load(response.text)
    except (httpx.HTTPError, ValueError) as exc:
        logger.debug("engine load scrape of %s failed: %r", url, exc)
        return None


class EngineLoadPoller:
    """Scrapes vLLM's ``/metrics`` every ``interval_ms`` and keeps the latest load.

    Args:
        client: The HTTP client; the poller does not close it.
        url: Full URL of the engine's ``/metrics``.
        interval_ms: Pause between scrapes in milliseconds (> 0).
        stale_after_ms: ``latest`` returns None when the last good scrape is older than
            this (default: three intervals plus the scrape timeout), so stale data never
            holds requests back.
        timeout_ms: Timeout of one scrape in milliseconds.
        clock: Monotonic clock in seconds.

    Raises:
        ValueError: A non-positive interval or timeout.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        interval_ms: float = 250.0,
        stale_after_ms: float | None = None,
        timeout_ms: float = 2000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (interval_ms > 0 and timeout_ms > 0):
            raise ValueError(f"interval_ms={interval_ms!r}, timeout_ms={timeout_ms!r}: must be > 0")
        self._client = client
        self._url = url
        self._interval_s = interval_ms / 1000
        self._timeout_s = timeout_ms / 1000
        self._stale_after_s = (
            stale_after_ms / 1000
            if stale_after_ms is not None
            else 3 * self._interval_s + self._timeout_s
        )
        self._clock = clock
        self._latest: EngineLoad | None = None
        self._latest_at = -math.inf
        self._failing = False

    async def poll_once(self) -> EngineLoad | None:
        """Scrape once and remember the result if it succeeded.

        Returns:
            The load, or None on failure (the previous good value is kept until stale).
        """
        load = await fetch_engine_load(self._client, self._url, timeout_s=self._timeout_s)
        if load is None:
            if not self._failing:
                logger.warning("engine load unavailable from %s", self._url)
            self._failing = True
            return None
        if self._failing:
            logger.info("engine load available again from %s", self._url)
        self._failing = False
        self._latest = load
        self._latest_at = self._clock()
        return load

    async def run(self) -> None:
        """Scrape forever, every ``interval_ms``; cancel the task to stop."""
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval_s)

    def latest(self) -> EngineLoad | None:
        """The latest good load, or None if there is none or it is stale."""
        if self._clock() - self._latest_at > self._stale_after_s:
            return None
        return self._latest
