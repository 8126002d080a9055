"""Admission per served model, over the backends that serve it.

One :class:`~teamgpu.scheduler.admission.Admission` per served model name; its capacity is
``inflight_per_backend`` in-flight slots per up backend serving the model and not draining
(at least one backend's worth), and its engine load is that of those backends, scraped from each
backend's ``/metrics`` by an :class:`~teamgpu.scheduler.engine_load.EngineLoadPoller`.
The controllers share one :class:`~teamgpu.scheduler.fair_queue.VirtualCounters`: a
user's service on any model counts against one fair share (Sheng et al.'s counters, kept
per user across models), while each model is admitted against its own engines' slots.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Protocol

import httpx

from teamgpu.scheduler.admission import Admission
from teamgpu.scheduler.config import FairQueueConfig
from teamgpu.scheduler.engine_load import EngineLoad, EngineLoadPoller
from teamgpu.scheduler.fair_queue import VirtualCounters
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.scheduler.stats import SchedulerStats

__all__ = ["AdmissionRegistry", "BackendView"]


class BackendView(Protocol):
    """What the registry reads of a backend (a :class:`teamgpu.upstream.backends.Backend`)."""

    @property
    def url(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def draining(self) -> bool: ...


class _Backends(Protocol):
    @property
    def backends(self) -> Iterable[BackendView]: ...

    def candidates(self, served: str) -> Iterable[BackendView]: ...


class AdmissionRegistry:
    """The admission controllers of every served model.

    Args:
        config: the scheduler's settings, already fitted to ``inflight_per_backend``
            (see :func:`teamgpu.preflight.scheduler_config`).
        inflight_per_backend: in-flight slots per backend (vLLM's ``--max-num-seqs``).
        pool: the backends (:class:`teamgpu.upstream.backends.BackendPool`).
        scrape_interval_s: how often each backend's ``/metrics`` is read for its load.
        model_capacity: in-flight slots per backend of particular models (their engines'
            ``--max-num-seqs``), instead of ``inflight_per_backend``.

    Attributes:
        admissions: served model name -> its admission controller (made on first use).
    """

    def __init__(self, config: FairQueueConfig, *, inflight_per_backend: int, pool: _Backends,
                 scrape_interval_s: float, model_capacity: dict[str, int] | None = None
                 ) -> None:
        self.model_capacity = dict(model_capacity or {})
        for n in (inflight_per_backend, *self.model_capacity.values()):
            config.check_capacity(n)  # fitted at start-up: never raises here
        self.config = config
        self.inflight_per_backend = inflight_per_backend
        self.admissions: dict[str, Admission] = {}
        # one fair share per user across every model: the queues share the counters
        self.counters = VirtualCounters()
        self._pool = pool
        self._scrape_interval_s = scrape_interval_s
        self._pollers: dict[str, EngineLoadPoller] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._scrape_client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Start scraping every backend's load."""
        self._scrape_client = httpx.AsyncClient(trust_env=False)
        for b in self._pool.backends:
            poller = EngineLoadPoller(self._scrape_client, f"{b.url}/metrics",
                                      interval_ms=self._scrape_interval_s * 1000)
            self._pollers[b.url] = poller
            self._tasks.append(asyncio.create_task(poller.run(), name=f"load:{b.url}"))

    async def close(self) -> None:
        """Stop scraping."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._scrape_client is not None:
            await self._scrape_client.aclose()

    def for_model(self, served: str) -> Admission:
        """The admission controller of ``served``, its capacity brought up to date with
        the number of up backends serving it."""
        # a draining backend takes no new requests: its slots are not the model's capacity
        n_up = max(1, sum(1 for b in self._pool.candidates(served) if b.up and not b.draining))
        capacity = self.model_capacity.get(served, self.inflight_per_backend) * n_up
        adm = self.admissions.get(served)
        if adm is None:
            adm = Admission(self.config, capacity=capacity,
                            engine_load=lambda: self.engine_load(served),
                            counters=self.counters)
            self.admissions[served] = adm
        elif adm.capacity != capacity:
            adm.capacity = capacity
        return adm

    def engine_load(self, served: str) -> EngineLoad | None:
        """Combined load of the up backends serving ``served``: waiting requests summed,
        KV cache usage the largest; None when no backend's load is known."""
        loads = [p.latest() for b in self._pool.candidates(served) if b.up
                 and (p := self._pollers.get(b.url)) is not None]
        known = [x for x in loads if x is not None]
        if not known:
            return None
        return EngineLoad(num_requests_waiting=sum(x.num_requests_waiting for x in known),
                          kv_cache_usage_perc=max(x.kv_cache_usage_perc for x in known))

    def stats(self) -> list[SchedulerStats]:
        """The stats of every admission controller."""
        return [a.stats() for a in self.admissions.values()]

    def queue_depth(self) -> dict[str, int]:
        """Waiting requests per requested class over every model:
        ``{"high": n, "normal": n, "low": n}``."""
        out = dict.fromkeys(PriorityClass.labels(), 0)
        for st in self.stats():
            for cls, n in st.queued.items():
                out[PriorityClass(cls).label] += n
        return out
