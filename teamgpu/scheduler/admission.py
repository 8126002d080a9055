"""Admission control: the async shell around ``FairQueue``.

Every decision is the fair queue's; this module only counts in-flight slots, wakes the
waiter a decision picked, fails the ones that timed out, and re-runs the decision when
something changed: a push, a release, a removal, a capacity change, a due promotion or
expiry (one timer at ``FairQueue.next_event_at``), or, while the engine's own load holds
requests back, every ``engine_load_recheck_ms``. Single event loop, no threads.

Whether a request may start depends on its requested class only (after the key's
ceiling): the reserve (``FairQueueConfig.admission_limit``) and the engine hold-back
(only requests requested ``high`` while vLLM reports waiting requests or a full KV cache)
both apply to it, aged or not. Aging orders the requests that may start. So a promotion
never admits anything by itself; the timer wakes for it only to keep the order current.

Work-conserving: a request is admitted in the same call that made it admissible; the
queue never returns None while a waiting request may start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from teamgpu.scheduler.config import FairQueueConfig
from teamgpu.scheduler.engine_load import EngineLoad
from teamgpu.scheduler.errors import QueueTimeout
from teamgpu.scheduler.fair_queue import FairQueue, QueuedRequest, VirtualCounters
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.scheduler.stats import SchedulerStats

__all__ = ["Admission", "EngineLoad", "Lease"]


class Lease:
    """One admitted request's in-flight slot. Created by ``Admission.acquire``.

    Attributes:
        request_id: The request.
        user: Who is charged.
        wait_s: Seconds the request waited in the queue.
        priority: The effective class it was admitted in (its requested class, or better
            if it aged; the slot it took was one its requested class may use); send
            ``int(priority)`` as vLLM's ``priority`` so the engine agrees with the
            gateway's order.
        requested_priority: The class it asked for (after the key's ceiling), e.g. for
            the ``X-Priority`` response header.
    """

    __slots__ = (
        "_admission",
        "_est_prompt_tokens",
        "_prompt_reported",
        "_released",
        "priority",
        "request_id",
        "requested_priority",
        "user",
        "wait_s",
    )

    def __init__(
        self,
        admission: Admission,
        request: QueuedRequest,
        *,
        wait_s: float,
        priority: PriorityClass,
    ) -> None:
        self._admission = admission
        self._est_prompt_tokens = request.est_prompt_tokens
        self._prompt_reported = 0
        self._released = False
        self.request_id = request.request_id
        self.user = request.user
        self.wait_s = wait_s
        self.priority = priority
        self.requested_priority = request.priority

    @property
    def released(self) -> bool:
        """True once ``release`` was called."""
        return self._released

    def charge(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Report tokens actually processed, incrementally, to the user's fair share.

        The queue already charged ``est_prompt_tokens`` at admission, so prompt tokens
        reported here are charged only where their running total exceeds that estimate
        (an over-estimate is not refunded: counters never decrease). Completion tokens
        are charged in full: call as they stream. Allowed after ``release`` too (usage
        often arrives with the last chunk).

        Args:
            prompt_tokens: Prompt tokens processed since the last call, >= 0.
            completion_tokens: Tokens generated since the last call, >= 0.

        Raises:
            ValueError: A negative count.
        """
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(
                f"prompt_tokens={prompt_tokens!r}, completion_tokens={completion_tokens!r}: "
                "must be >= 0"
            )
        before = max(self._est_prompt_tokens, self._prompt_reported)
        self._prompt_reported += prompt_tokens
        extra_prompt = max(self._est_prompt_tokens, self._prompt_reported) - before
        if extra_prompt or completion_tokens:
            self._admission._charge(self.user, extra_prompt, completion_tokens)

    def release(self) -> None:
        """Free the slot and admit the next waiter at once. Idempotent."""
        if self._released:
            return
        self._released = True
        self._admission._on_release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    """Admits requests to the engine in the fair queue's order.

    A request takes a slot only while its requested class's headroom allows
    (``FairQueueConfig.admission_limit``), and while the engine is saturated only if it was
    requested ``high``; aging changes which of the admissible requests goes first, never
    whether one is admissible (see ``teamgpu.scheduler.fair_queue`` and the starvation
    bound in docs/scheduler.md).

    Args:
        config: The scheduler settings.
        capacity: In-flight slots (``max_inflight_per_backend``; vLLM's
            ``--max-num-seqs`` where known). Settable later.
        clock: Monotonic clock in seconds; it must advance in real time, because the
            timers sleep on the event loop.
        engine_load: Returns the engine's latest load, or None when unknown (then nothing
            is held back); typically ``EngineLoadPoller.latest``. Called on every
            decision, so it must be cheap and must not block. While it reports waiting
            requests or a KV cache at ``kv_cache_high_watermark``, only requests
            requested ``high`` are admitted, aged ones held back too.
        counters: The users' virtual counters, shared with the admission controllers of
            the other models (one fair share per user across models); default: its own.

    Raises:
        SchedulerConfigError: ``capacity`` leaves no slot for low.
    """

    def __init__(
        self,
        config: FairQueueConfig,
        *,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
        engine_load: Callable[[], EngineLoad | None] | None = None,
        counters: VirtualCounters | None = None,
    ) -> None:
        self._config = config
        self._queue = FairQueue(config, counters)
        self._clock = clock
        self._engine_load = engine_load
        self._in_flight = 0
        self._waiters: dict[str, asyncio.Future[Lease]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._engine_held = False
        config.check_capacity(capacity)
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        """In-flight slots. Setting it admits waiters at once if it grew.

        Raises:
            SchedulerConfigError: On set, a capacity that leaves no slot for low.
        """
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._config.check_capacity(value)
        self._capacity = value
        if self._waiters:
            self._dispatch()

    @property
    def in_flight(self) -> int:
        """Admitted requests not yet released."""
        return self._in_flight

    async def acquire(
        self,
        req: QueuedRequest,
        *,
        on_position: Callable[[int], Awaitable[None]] | None = None,
    ) -> Lease:
        """Wait until the request is admitted.

        Args:
            req: The request; ``enqueued_at`` is set to ``clock()``.
            on_position: Awaited with the 1-based queue position when the request has to
                wait, and again when it changes, at most once per
                ``position_report_interval_s`` (e.g. to send an SSE comment line).

        Returns:
            The lease; call ``release`` when the response is done.

        Raises:
            UserQueueFull: At once, the user has too many queued (429, ``Retry-After``).
            QueueFull: At once, the queue is full (503, ``Retry-After``).
            QueueTimeout: The request waited past its class's queue timeout (503,
                ``Retry-After``).
            asyncio.CancelledError: The awaiting task was cancelled (client
                disconnected): the request has left the queue (or, if it had just been
                admitted, its slot is released) before this propagates. Any exception
                from ``on_position`` propagates the same way.
        """
        loop = asyncio.get_running_loop()
        position = self._queue.push(req, self._clock())
        rid = req.request_id
        fut: asyncio.Future[Lease] = loop.create_future()
        self._waiters[rid] = fut
        try:
            self._dispatch()
            if not fut.done() and on_position is not None:
                await on_position(position)
                reported, reported_at = position, self._clock()
                interval = self._config.position_report_interval_s
                while not fut.done():
                    await asyncio.wait(
                        (fut,), timeout=max(0.0, reported_at + interval - self._clock()))
                    if fut.done():
                        break
                    current = self._queue.position(rid, self._clock())
                    if current is not None and current != reported:
                        await on_position(current)
                        reported = current
                    reported_at = self._clock()
            # Awaiting the future directly would cancel it with the task; asyncio.wait
            # leaves it alone so the handler below can tell "admitted" from "waiting".
            while not fut.done():
                await asyncio.wait((fut,))
            return fut.result()
        except BaseException:
            self._abandon(rid, fut)
            raise

    def stats(self) -> SchedulerStats:
        """The fair queue's stats plus ``in_flight``, ``capacity`` and ``engine_held``."""
        snapshot = self._queue.stats(self._clock())
        return SchedulerStats(
            queued=snapshot.queued,
            queued_effective=snapshot.queued_effective,
            oldest_wait_s=snapshot.oldest_wait_s,
            queued_by_user=snapshot.queued_by_user,
            user_counters=snapshot.user_counters,
            recent_waits_s=snapshot.recent_waits_s,
            admitted_total=snapshot.admitted_total,
            expired_total=snapshot.expired_total,
            removed_total=snapshot.removed_total,
            rejected_user_queue_full_total=snapshot.rejected_user_queue_full_total,
            rejected_queue_full_total=snapshot.rejected_queue_full_total,
            in_flight=self._in_flight,
            capacity=self._capacity,
            engine_held=self._engine_held,
        )

    # ------------------------------------------------------------------ internals

    def _abandon(self, rid: str, fut: asyncio.Future[Lease]) -> None:
        """Clean up after a waiter that stopped waiting (cancelled, timed out, failed)."""
        self._waiters.pop(rid, None)
        if fut.done():
            if not fut.cancelled() and fut.exception() is None:
                fut.result().release()  # admitted just before the cancellation landed
            return
        fut.cancel()
        if self._queue.remove(rid):
            self._dispatch()

    def _charge(self, user: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._queue.charge(user, prompt_tokens, completion_tokens)

    def _on_release(self) -> None:
        self._in_flight -= 1
        self._dispatch()

    def _lowest_class(self) -> PriorityClass:
        """LOW normally; HIGH while the engine reports waiting requests or a full cache.

        The queue compares it with each request's requested class, so an aged ``low`` or
        ``normal`` request is held back too.
        """
        load = self._engine_load() if self._engine_load is not None else None
        self._engine_held = load is not None and (
            load.num_requests_waiting > 0
            or load.kv_cache_usage_perc >= self._config.kv_cache_high_watermark
        )
        return PriorityClass.HIGH if self._engine_held else PriorityClass.LOW

    def _dispatch(self) -> None:
        """Fail expired waiters, admit all that may start, re-arm the timer."""
        now = self._clock()
        for expired in self._queue.expire(now):
            fut = self._waiters.pop(expired.request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(
                    QueueTimeout(
                        f"request {expired.request_id!r} waited "
                        f"{now - expired.enqueued_at:.1f} s in class "
                        f"{expired.priority.name.lower()} (queue_timeout_s="
                        f"{self._config.queue_timeout_s[expired.priority]})",
                        retry_after_s=self._queue.retry_after_s(),
                    )
                )
        lowest = self._lowest_class() if len(self._queue) else PriorityClass.LOW
        while True:
            req = self._queue.pop_next(
                now, self._in_flight, self._capacity, lowest_class=lowest
            )
            if req is None:
                break
            fut = self._waiters.pop(req.request_id, None)
            if fut is None or fut.done():
                continue  # no one waits for it any more; it never took a slot
            self._in_flight += 1
            wait_s = max(0.0, now - req.enqueued_at)
            priority = self._config.effective_priority(req.priority, wait_s)
            fut.set_result(Lease(self, req, wait_s=wait_s, priority=priority))
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """Sleep until the queue changes by itself, or poll the engine load while held."""
        due = math.inf
        if len(self._queue):
            next_event = self._queue.next_event_at()
            if next_event is not None:
                due = next_event
            if self._engine_held:
                due = min(due, now + self._config.engine_load_recheck_ms / 1000)
        if due == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due < math.inf:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, due - now), self._on_timer
            )

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._dispatch()
