"""The fair queue: headroom by requested class, aging for order, VTC fair share.

A synchronous data structure with no I/O, no asyncio and no clock of its own: every
method where time matters takes ``now`` (seconds, monotonic). The async shell
(``teamgpu.scheduler.admission``) only wakes waiters.

Each request has a **requested** class (``QueuedRequest.priority``, after the key's
ceiling) and an **effective** class: the requested class promoted one step per
``aging_s`` seconds waited, so a ``low`` request competes as ``normal`` after ``aging_s``
and as ``high`` after ``2 * aging_s``. Order of service, decided by
``FairQueue.pop_next``:

1. **Headroom follows the requested class**, never the effective one. With ``capacity``
   in-flight slots, a request may start only while ``in_flight <
   FairQueueConfig.admission_limit(requested class, capacity)`` (``low`` below
   ``capacity - reserved_slots_high - reserved_slots_normal``, ``normal`` below
   ``capacity - reserved_slots_high``, ``high`` below ``capacity``) and its requested
   class is no worse than ``lowest_class`` (the engine hold-back). Aging cannot carry
   a batch request into the slots reserved for interactive work. The limits shrink with
   the class, so the classes that may start are always ``high`` down to some class.
2. **Strict priority between effective classes**, among the requests that may start:
   the best effective class that holds one goes first. Aging orders; it does not admit.
3. **Virtual Token Counter within that effective class** (Sheng et al., "Fairness in
   Serving Large Language Models", OSDI 2024, Algorithm 2), again among the requests
   that may start: one counter per user of weighted service (``input_token_weight`` per
   prompt token, charged when the request is dispatched, ``output_token_weight`` per
   generated token, charged as tokens stream), divided by the user's weight. The next
   request comes from the user with the smallest counter; ties go to the user whose
   oldest such request is older; FIFO within a user. When a user with nothing waiting
   in a class enqueues there, its counter is lifted to ``max(own, min counter of users
   waiting in that effective class)``, or, when nobody waits there, to ``max(own,
   counter of the last user dispatched from that class)`` (the paper's "last client
   that left the queue"), so idleness banks no credit. Promotion does not lift.

The queue is **work-conserving**: ``pop_next`` never returns None while some waiting
request may start under rule 1. An aged ``low`` request at the head of the ``high``
effective class is skipped when only ``high`` may start, not waited for.

Counters are global per user (one counter across classes, compared within a class), so a
user's service in any class counts against its share, aged requests can be compared with
native ones, and switching class gains nothing; the lift is applied per class because
under strict priority a user only competes with users of its own class.

Structure: the waiting requests are kept in one bucket per (effective, requested) class
pair, at most six (an effective class is never worse than the requested one). Each
bucket has, per user, a FIFO heap of that user's requests in the bucket, and a heap of
one VTC key per user, ``(counter, oldest seq)``. ``pop_next`` computes the worst
requested class that may start, walks the effective classes best first, and in the first
one with a non-empty allowed bucket takes the smallest key over its allowed buckets:
that is the user with the smallest counter (then the oldest head) among the users with a
startable request in the class, and the bucket's head is that user's oldest startable
request there. Starvation bound: docs/scheduler.md, "Aging and the starvation bound".

Cost: O(log n) per push and pop (at most six heap peeks per pop; heaps with lazy
invalidation and periodic compaction, amortised); ``position`` is O(users in the class +
the user's requests in the class).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from teamgpu.scheduler.config import FairQueueConfig
from teamgpu.scheduler.errors import (
    InvalidPriority,
    QueueFull,
    SchedulerError,
    UserQueueFull,
)
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.scheduler.stats import SchedulerStats

# The config, class, stats and error types live in their own modules; they are
# re-exported here because they are part of this data structure's interface.
__all__ = [
    "FairQueue",
    "FairQueueConfig",
    "InvalidPriority",
    "PriorityClass",
    "QueueFull",
    "QueuedRequest",
    "SchedulerError",
    "SchedulerStats",
    "UserQueueFull",
    "VirtualCounters",
]

_CLASSES = tuple(PriorityClass)
_N = len(_CLASSES)


def _bucket(eff: int, requested: int) -> int:
    """Index of the (effective class, requested class) bucket; ``eff <= requested``."""
    return eff * _N + requested


# Per effective class, its buckets in requested-class order (best first).
_EFF_BUCKETS = tuple(tuple(_bucket(e, r) for r in range(e, _N)) for e in range(_N))
# Per (effective, requested) class, for ``position``: the buckets of that effective class
# whose requests may start whenever this one may (requested class the same or better),
# and the buckets of the better effective classes that may.
_RIVAL_BUCKETS = tuple(
    tuple(tuple(_bucket(e, x) for x in range(e, r + 1)) for r in range(_N)) for e in range(_N)
)
_AHEAD_BUCKETS = tuple(
    tuple(tuple(_bucket(b, x) for b in range(e) for x in range(b, r + 1)) for r in range(_N))
    for e in range(_N)
)
# Compact lazily invalidated structures when stale items exceed this plus twice the live.
_COMPACT_SLACK = 1024


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """One request waiting for (or holding) an in-flight slot.

    Attributes:
        request_id: Unique among queued requests.
        user: Who is charged for the service (the API key's principal).
        priority: Requested class, after the key's ceiling was applied.
        weight: The key's fair-share weight, > 0: a user of weight 2 gets twice the
            service of a user of weight 1 while both are backlogged.
        enqueued_at: Set by ``FairQueue.push`` to the ``now`` it was given (seconds).
        est_prompt_tokens: Prompt tokens, charged to the user when the request is
            dispatched (the estimate is corrected by later charges, see
            ``teamgpu.scheduler.admission.Lease.charge``); >= 0.
        est_output_tokens: Expected output tokens (e.g. ``max_tokens``); informational,
            never charged (output is charged as it is produced); >= 0.

    Raises:
        ValueError: For a weight that is not > 0 and finite, negative token estimates or
            an unknown priority (``InvalidPriority``, 400).
    """

    request_id: str
    user: str
    priority: PriorityClass
    weight: float = 1.0
    enqueued_at: float = 0.0
    est_prompt_tokens: int = 0
    est_output_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.priority, str):
            self.priority = PriorityClass.parse(self.priority)
        else:
            self.priority = PriorityClass(self.priority)
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight={self.weight!r}: must be a finite number > 0")
        if self.est_prompt_tokens < 0 or self.est_output_tokens < 0:
            raise ValueError(
                f"est_prompt_tokens={self.est_prompt_tokens!r}, "
                f"est_output_tokens={self.est_output_tokens!r}: must be >= 0"
            )


class _Entry:
    """A queued request plus the queue's bookkeeping."""

    __slots__ = ("alive", "eff", "req", "seq")

    def __init__(self, req: QueuedRequest, seq: int) -> None:
        self.req = req
        self.seq = seq  # global arrival order; the tie-breaker everywhere
        self.eff = req.priority  # effective class; only ever improves
        self.alive = True


class VirtualCounters:
    """The users' virtual token counters, shared by the fair queues of several models, so
    that a user's service on any model (tokens of the embeddings model included) counts
    against one fair share. Counters only grow (charges, lifts), which is what the queues'
    lazily fixed heap keys rely on, whichever queue changed them.
    """

    __slots__ = ("_cells",)

    def __init__(self) -> None:
        self._cells: dict[str, list[float]] = {}

    def cell(self, user: str) -> list[float]:
        """The user's counter as a one-element list (shared, mutable)."""
        c = self._cells.get(user)
        if c is None:
            c = self._cells[user] = [0.0]
        return c

    def value(self, user: str) -> float:
        """The user's counter (0.0 for a user never charged)."""
        c = self._cells.get(user)
        return 0.0 if c is None else c[0]


class _User:
    """Per-user state: the virtual counter (a cell shared with the other models' queues)
    and the user's waiting requests per bucket."""

    __slots__ = ("at_bucket", "at_class", "cell", "heaps", "queued", "weight")

    def __init__(self, weight: float, cell: list[float]) -> None:
        self.cell = cell
        self.weight = weight
        self.queued = 0
        self.at_class = [0] * _N  # live requests per effective class
        self.at_bucket = [0] * (_N * _N)  # live requests per (effective, requested) bucket
        # Per bucket, a heap of (seq, entry); items whose entry is dead or has moved to
        # a better effective class are stale and dropped when they surface.
        self.heaps: list[list[tuple[int, _Entry]]] = [[] for _ in range(_N * _N)]

    @property
    def counter(self) -> float:
        return self.cell[0]

    @counter.setter
    def counter(self, value: float) -> None:
        self.cell[0] = value


class FairQueue:
    """Headroom by requested class, strict order by effective class, VTC within a class.

    See the module docstring for the algorithm. Not thread-safe; no I/O.

    Args:
        config: The settings.
        counters: The users' virtual counters, shared with the queues of other models
            (default: this queue's own).
    """

    def __init__(self, config: FairQueueConfig, counters: VirtualCounters | None = None
                 ) -> None:
        self._config = config
        self._counters = counters if counters is not None else VirtualCounters()
        self._aging = config.aging_s < math.inf
        self._entries: dict[str, _Entry] = {}
        self._users: dict[str, _User] = {}
        # Per (effective, requested) bucket: a min-heap of (counter, head seq, user) and
        # the one key per user waiting in the bucket that is current; other heap items
        # are stale (lazy invalidation). A current key is never above the user's true
        # key, because counters only grow and a user's head in a bucket only gets
        # younger, except when an older request is promoted in, and then a fresh key is
        # pushed at once.
        self._class_heaps: list[list[tuple[float, int, str]]] = [[] for _ in range(_N * _N)]
        self._keys: list[dict[str, tuple[float, int]]] = [{} for _ in range(_N * _N)]
        self._queued_bucket = [0] * (_N * _N)
        self._queued_eff = [0] * _N
        self._queued_req = [0] * _N
        # Per requested class, entries in arrival order (expiry, oldest wait).
        self._arrivals: list[deque[_Entry]] = [deque() for _ in _CLASSES]
        # (requested class, levels promoted so far) -> entries in arrival order that
        # await their next promotion.
        self._promo: dict[tuple[int, int], deque[_Entry]] = {
            (k, lvl): deque() for k in _CLASSES for lvl in range(k)
        }
        self._last_served: list[str | None] = [None] * len(_CLASSES)
        self._next_seq = 0
        self._now = -math.inf
        self._stale = 0
        self._recent_waits: list[deque[float]] = [
            deque(maxlen=config.recent_waits_max_count) for _ in _CLASSES
        ]
        self._admitted = 0
        self._expired = 0
        self._removed = 0
        self._rejected_user = 0
        self._rejected_total = 0

    @property
    def config(self) -> FairQueueConfig:
        """The settings."""
        return self._config

    def __len__(self) -> int:
        """Number of waiting requests."""
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    # ------------------------------------------------------------------ public API

    def push(self, req: QueuedRequest, now: float) -> int:
        """Enqueue a request.

        Sets ``req.enqueued_at = now``. If the user had nothing waiting in the request's
        class, the user's counter is lifted first (VTC, see the module docstring).

        Args:
            req: The request; its ``request_id`` must not be queued already.
            now: Current time in seconds (monotonic).

        Returns:
            Its 1-based position, as ``position`` computes it.

        Raises:
            UserQueueFull: The user already has ``max_queued_per_user`` requests waiting
                (the client sees 429 with ``Retry-After``).
            QueueFull: ``max_queued_total`` requests are waiting (503, ``Retry-After``).
            ValueError: ``req.request_id`` is already queued (a caller bug, not a client
                error).
        """
        self._advance(now)
        if req.request_id in self._entries:
            raise ValueError(f"request_id={req.request_id!r} is already queued")
        cfg = self._config
        user = self._users.get(req.user)
        if user is not None and user.queued >= cfg.max_queued_per_user:
            self._rejected_user += 1
            raise UserQueueFull(
                f"user {req.user!r} already has {user.queued} requests queued "
                f"(max_queued_per_user={cfg.max_queued_per_user})",
                retry_after_s=self.retry_after_s(),
            )
        if len(self._entries) >= cfg.max_queued_total:
            self._rejected_total += 1
            raise QueueFull(
                f"the queue is full ({len(self._entries)} requests, "
                f"max_queued_total={cfg.max_queued_total})",
                retry_after_s=self.retry_after_s(),
            )
        if user is None:
            user = self._users[req.user] = _User(req.weight, self._counters.cell(req.user))
        user.weight = req.weight
        req.enqueued_at = self._now
        cls = req.priority
        if user.at_class[cls] == 0:
            floor = self._lift_floor(cls)
            if floor is not None and floor > user.counter:
                user.counter = floor
        entry = _Entry(req, self._next_seq)
        self._next_seq += 1
        self._entries[req.request_id] = entry
        user.queued += 1
        self._queued_req[cls] += 1
        self._arrivals[cls].append(entry)
        if self._aging and cls > PriorityClass.HIGH:
            self._promo[(cls, 0)].append(entry)
        self._add(user, req.user, entry)
        return self._position(entry)

    def remove(self, request_id: str) -> bool:
        """Remove a waiting request (its client disconnected).

        Args:
            request_id: The request.

        Returns:
            True if it was waiting, False if unknown, already dispatched or expired.
        """
        entry = self._entries.get(request_id)
        if entry is None:
            return False
        self._finish(entry)
        self._removed += 1
        self._maybe_compact()
        return True

    def pop_next(
        self,
        now: float,
        in_flight: int,
        capacity: int,
        *,
        lowest_class: PriorityClass = PriorityClass.LOW,
    ) -> QueuedRequest | None:
        """Dispatch the next request that may start now, if any.

        A request may start while ``in_flight`` is below its **requested** class's
        ``admission_limit`` and its requested class is no worse than ``lowest_class``;
        aging never changes that. Among those, the best effective class goes first, and
        within it VTC (smallest counter, then oldest head, FIFO per user). Charges the
        request's ``est_prompt_tokens`` to its user.

        Args:
            now: Current time in seconds (monotonic).
            in_flight: Requests admitted and not yet finished.
            capacity: In-flight slots.
            lowest_class: Worst requested class allowed to start (``Admission`` passes
                HIGH while the engine reports waiting requests or a full KV cache, so an
                aged ``low`` or ``normal`` request is held back too).

        Returns:
            The request, now removed from the queue, or None when nothing may start.
            Never None while a waiting request may start (work-conserving).

        Raises:
            SchedulerConfigError: ``capacity`` leaves no slot for low.
        """
        self._config.check_capacity(capacity)
        self._advance(now)
        worst = self._worst_startable(in_flight, capacity, lowest_class)
        # An effective class is never worse than the requested one, so the effective
        # classes past `worst` hold nothing that may start.
        for eff in range(worst + 1):
            best: tuple[float, int, str] | None = None
            best_bucket = 0
            for requested in range(eff, worst + 1):
                b = eff * _N + requested
                if self._queued_bucket[b] == 0:
                    continue
                top = self._peek(b)
                assert top is not None  # the bucket has waiting requests
                if best is None or top < best:
                    best, best_bucket = top, b
            if best is not None:
                return self._dispatch(best_bucket, best[2])
        return None

    def expire(self, now: float) -> list[QueuedRequest]:
        """Remove and return the requests that waited past their class's queue timeout.

        The timeout is the requested class's ``queue_timeout_s`` (aging does not change
        it). The caller fails them with ``QueueTimeout`` (503).

        Args:
            now: Current time in seconds (monotonic).

        Returns:
            The expired requests, oldest first within each class.
        """
        self._advance(now)
        out: list[QueuedRequest] = []
        for cls in _CLASSES:
            timeout = self._config.queue_timeout_s[cls]
            if timeout == math.inf:
                continue
            arrivals = self._arrivals[cls]
            while arrivals:
                entry = arrivals[0]
                if not entry.alive:
                    arrivals.popleft()
                    continue
                if self._now - entry.req.enqueued_at < timeout:
                    break
                arrivals.popleft()
                self._finish(entry)
                self._expired += 1
                out.append(entry.req)
        if out:
            self._maybe_compact()
        return out

    def charge(self, user: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Add service to a user's virtual counter.

        Adds ``(input_token_weight * prompt_tokens + output_token_weight *
        completion_tokens) / weight`` using the user's weight from its latest request.
        Call incrementally as tokens are produced. An unknown user gets a counter with
        weight 1.

        Args:
            user: Who was served.
            prompt_tokens: Prompt tokens processed since the last call, >= 0.
            completion_tokens: Tokens generated since the last call, >= 0.

        Raises:
            ValueError: A negative token count (counters never decrease).
        """
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(
                f"prompt_tokens={prompt_tokens!r}, completion_tokens={completion_tokens!r}: "
                "must be >= 0"
            )
        state = self._users.get(user)
        if state is None:
            state = self._users[user] = _User(1.0, self._counters.cell(user))
        cfg = self._config
        state.counter += (
            cfg.input_token_weight * prompt_tokens + cfg.output_token_weight * completion_tokens
        ) / state.weight

    def counter(self, user: str) -> float:
        """A user's virtual token counter (0.0 for a user never charged)."""
        return self._counters.value(user)

    def effective_priority(self, request_id: str) -> PriorityClass | None:
        """The class a waiting request currently competes in, or None if not waiting."""
        entry = self._entries.get(request_id)
        return None if entry is None else entry.eff

    def position(self, request_id: str, now: float | None = None) -> int | None:
        """Estimated 1-based position of a waiting request.

        Counted among the requests that may start whenever this one may: those whose
        requested class is the same or better (worse ones may start only when this one
        may too, and then they go first only by order, which this estimate leaves out).
        Of those: the ones in better effective classes, plus an interleaving estimate
        within the effective class: the user's own earlier requests, and from every
        other user as many requests as would be served round-robin before this one
        (``min(their count, k)`` if that user comes first, else ``min(count, k - 1)``,
        where this is the user's k-th request). 1 means it is the next to start once a
        slot its requested class may use is free; ``pop_next`` only ever returns a
        request whose position is 1.

        Args:
            request_id: The request.
            now: Current time in seconds, to apply aging first; None keeps the time of
                the last call that passed one.

        Returns:
            The position, or None if the request is not waiting.
        """
        if now is not None:
            self._advance(now)
        entry = self._entries.get(request_id)
        return None if entry is None else self._position(entry)

    def next_event_at(self) -> float | None:
        """When the queue will change by itself: the next promotion or expiry.

        ``Admission`` sleeps until then: an expiry must fail its waiter, and a promotion
        changes the order of service. A promotion never makes a request admissible that
        was not (headroom follows the requested class), so it needs no decision of its
        own; waking for it costs one call of ``pop_next``.

        Returns:
            The time in seconds (same clock as ``now``), or None when nothing waits.
        """
        best = math.inf
        for cls in _CLASSES:
            timeout = self._config.queue_timeout_s[cls]
            if timeout < math.inf:
                head = self._first_alive(self._arrivals[cls])
                if head is not None:
                    best = min(best, head.req.enqueued_at + timeout)
        if self._aging:
            for (_, lvl), dq in self._promo.items():
                head = self._first_alive(dq)
                if head is not None:
                    best = min(best, head.req.enqueued_at + (lvl + 1) * self._config.aging_s)
        return None if best == math.inf else best

    def stats(self, now: float) -> SchedulerStats:
        """A snapshot for metrics.

        Args:
            now: Current time in seconds (monotonic).

        Returns:
            Depths and oldest wait per class, counters and queue lengths per user, recent
            admission waits and totals; ``in_flight``, ``capacity`` and ``engine_held``
            are left at their defaults for ``Admission`` to fill.
        """
        self._advance(now)
        oldest: dict[PriorityClass, float] = {}
        for cls in _CLASSES:
            head = self._first_alive(self._arrivals[cls])
            oldest[cls] = 0.0 if head is None else max(0.0, self._now - head.req.enqueued_at)
        return SchedulerStats(
            queued={c: self._queued_req[c] for c in _CLASSES},
            queued_effective={c: self._queued_eff[c] for c in _CLASSES},
            oldest_wait_s=oldest,
            queued_by_user={n: u.queued for n, u in self._users.items() if u.queued},
            user_counters={n: u.counter for n, u in self._users.items()},
            recent_waits_s={c: tuple(self._recent_waits[c]) for c in _CLASSES},
            admitted_total=self._admitted,
            expired_total=self._expired,
            removed_total=self._removed,
            rejected_user_queue_full_total=self._rejected_user,
            rejected_queue_full_total=self._rejected_total,
        )

    # ------------------------------------------------------------------ internals

    def _advance(self, now: float) -> None:
        """Move the clock forward (never back) and apply due promotions."""
        self._now = max(self._now, now)
        if not self._aging:
            return
        aging = self._config.aging_s
        for cls in _CLASSES[1:]:
            for lvl in range(cls):  # lower levels first: a request may move twice
                dq = self._promo[(cls, lvl)]
                threshold = (lvl + 1) * aging
                while dq:
                    entry = dq[0]
                    if not entry.alive:
                        dq.popleft()
                        continue
                    # The same test as FairQueueConfig.effective_priority.
                    if self._now - entry.req.enqueued_at < threshold:
                        break
                    dq.popleft()
                    self._promote(entry)
                    if lvl + 1 < cls:
                        self._promo[(cls, lvl + 1)].append(entry)

    def _worst_startable(self, in_flight: int, capacity: int, lowest: PriorityClass) -> int:
        """The worst requested class that may start now, or -1 when none may.

        The limits shrink with the class (``admission_limit``) and ``lowest`` cuts from
        the bottom, so the classes that may start are HIGH down to the one returned.
        """
        worst = -1
        for cls in _CLASSES:
            if cls > lowest or in_flight >= self._config.admission_limit(cls, capacity):
                break
            worst = cls
        return worst

    def _dispatch(self, b: int, name: str) -> QueuedRequest:
        """Take user ``name``'s oldest request in bucket ``b`` out and charge its prompt."""
        user = self._users[name]
        entry = self._head(user, b)
        assert entry is not None
        heapq.heappop(user.heaps[b])
        self._finish(entry)
        req = entry.req
        user.counter += self._config.input_token_weight * req.est_prompt_tokens / user.weight
        self._last_served[entry.eff] = name
        self._admitted += 1
        self._recent_waits[req.priority].append(max(0.0, self._now - req.enqueued_at))
        self._maybe_compact()
        return req

    def _promote(self, entry: _Entry) -> None:
        """Move a waiting request one class up. No counter lift: waiting is not idling."""
        name = entry.req.user
        user = self._users[name]
        old = entry.eff
        b = _bucket(old, entry.req.priority)
        user.at_class[old] -= 1
        user.at_bucket[b] -= 1
        self._queued_eff[old] -= 1
        self._queued_bucket[b] -= 1
        if user.at_bucket[b] == 0:
            del self._keys[b][name]
        self._stale += 1  # its item in user.heaps[b]
        entry.eff = PriorityClass(old - 1)
        self._add(user, name, entry)

    def _add(self, user: _User, name: str, entry: _Entry) -> None:
        """Add a live entry to its (effective, requested) bucket."""
        cls = entry.eff
        b = _bucket(cls, entry.req.priority)
        heapq.heappush(user.heaps[b], (entry.seq, entry))
        user.at_class[cls] += 1
        user.at_bucket[b] += 1
        self._queued_eff[cls] += 1
        self._queued_bucket[b] += 1
        key = self._keys[b].get(name)
        if key is None or entry.seq < key[1]:
            # A new head for this user in this bucket: publish its exact key now, since a
            # lazily fixed key must never be above the true one.
            key = (user.counter, entry.seq)
            self._keys[b][name] = key
            heapq.heappush(self._class_heaps[b], (key[0], key[1], name))

    def _finish(self, entry: _Entry) -> None:
        """Take a live entry out of the queue (dispatched, removed or expired)."""
        entry.alive = False
        req = entry.req
        del self._entries[req.request_id]
        user = self._users[req.user]
        cls = entry.eff
        b = _bucket(cls, req.priority)
        user.queued -= 1
        user.at_class[cls] -= 1
        user.at_bucket[b] -= 1
        self._queued_eff[cls] -= 1
        self._queued_bucket[b] -= 1
        self._queued_req[req.priority] -= 1
        if user.at_bucket[b] == 0:
            del self._keys[b][req.user]
        self._stale += 1

    def _head(self, user: _User, b: int) -> _Entry | None:
        """The user's oldest live request in bucket ``b``."""
        heap = user.heaps[b]
        eff = b // _N
        while heap:
            entry = heap[0][1]
            if entry.alive and entry.eff == eff:
                return entry
            heapq.heappop(heap)
        return None

    def _peek(self, b: int) -> tuple[float, int, str] | None:
        """The smallest (counter, head seq, user) among the users waiting in bucket ``b``."""
        heap = self._class_heaps[b]
        keys = self._keys[b]
        while heap:
            counter, seq, name = top = heap[0]
            key = keys.get(name)
            if key is None or key[0] != counter or key[1] != seq:
                heapq.heappop(heap)  # superseded or the user left the bucket
                continue
            user = self._users[name]
            head = self._head(user, b)
            assert head is not None
            if user.counter != counter or head.seq != seq:
                key = (user.counter, head.seq)  # grew since published: fix and re-sift
                keys[name] = key
                heapq.heapreplace(heap, (key[0], key[1], name))
                continue
            return top
        return None

    def _peek_user(self, cls: int) -> str | None:
        """The waiting user with the smallest (counter, head seq) in effective class ``cls``.

        Over all of the class's buckets, whatever may start now (the lift's "users
        waiting in the class").
        """
        best: tuple[float, int, str] | None = None
        for b in _EFF_BUCKETS[cls]:
            if self._queued_bucket[b]:
                top = self._peek(b)
                if top is not None and (best is None or top < best):
                    best = top
        return None if best is None else best[2]

    def _lift_floor(self, cls: int) -> float | None:
        """The counter a user newly waiting in ``cls`` is lifted to (at least).

        Sheng et al., OSDI 2024, Algorithm 2: the minimum counter of the users waiting
        (here: in the same effective class), or when none waits, the counter of the last
        user that left the queue (here: was dispatched from the class).
        """
        name = self._peek_user(cls)
        if name is None:
            name = self._last_served[cls]
        return None if name is None else self._users[name].counter

    def _position(self, entry: _Entry) -> int:
        """See ``position``: a rank among the requests that may start whenever this may."""
        cls = entry.eff
        requested = entry.req.priority
        name = entry.req.user
        user = self._users[name]
        # Requests of the requested class or better may start whenever this one may;
        # the worse ones only when it may too, and then the order alone decides.
        ahead = sum(self._queued_bucket[b] for b in _AHEAD_BUCKETS[cls][requested])
        buckets = _RIVAL_BUCKETS[cls][requested]
        k = 1
        mine_seq = entry.seq
        for b in buckets:
            for seq, e in user.heaps[b]:
                if e.alive and e.eff == cls and seq < entry.seq:
                    k += 1
                    mine_seq = min(mine_seq, seq)
        mine = (user.counter, mine_seq)
        others: dict[str, None] = {}
        for b in buckets:
            others.update(dict.fromkeys(self._keys[b]))
        for other in others:
            if other == name:
                continue
            o = self._users[other]
            count = 0
            o_seq = -1
            for b in buckets:
                if o.at_bucket[b]:
                    count += o.at_bucket[b]
                    o_head = self._head(o, b)
                    assert o_head is not None
                    o_seq = o_head.seq if o_seq < 0 else min(o_seq, o_head.seq)
            first = (o.counter, o_seq) < mine
            ahead += min(count, k if first else k - 1)
        return ahead + k

    @staticmethod
    def _first_alive(dq: deque[_Entry]) -> _Entry | None:
        while dq and not dq[0].alive:
            dq.popleft()
        return dq[0] if dq else None

    def retry_after_s(self) -> int:
        """A ``Retry-After`` hint in whole seconds.

        The median queue wait of recently admitted requests, rounded up, within
        [1, ``retry_after_max_s``]; 1 before any admission.
        """
        waits = sorted(w for dq in self._recent_waits for w in dq)
        median = waits[len(waits) // 2] if waits else 1.0
        return max(1, min(self._config.retry_after_max_s, math.ceil(median)))

    def _maybe_compact(self) -> None:
        """Drop stale items once they outnumber the live ones (amortised O(1))."""
        if self._stale <= 2 * len(self._entries) + _COMPACT_SLACK:
            return
        for i, dq in enumerate(self._arrivals):
            self._arrivals[i] = deque(e for e in dq if e.alive)
        for key, dq in self._promo.items():
            self._promo[key] = deque(e for e in dq if e.alive)
        for user in self._users.values():
            for b, heap in enumerate(user.heaps):
                if heap:
                    eff = b // _N
                    mine = [(s, e) for s, e in heap if e.alive and e.eff == eff]
                    heapq.heapify(mine)
                    user.heaps[b] = mine
        for b, current in enumerate(self._keys):
            keys = [(c, s, n) for n, (c, s) in current.items()]
            heapq.heapify(keys)
            self._class_heaps[b] = keys
        self._stale = 0
