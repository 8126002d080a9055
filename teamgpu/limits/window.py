"""The limit algorithm as a pure, synchronous data structure (no I/O, ``now`` passed in).

A *sliding window log*: every admission is an entry ``(ts_us, amount)``; an entry counts
while ``now - window < ts``, i.e. the window is the half-open interval
``(now - 60 s, now]``. A request is admitted only if the entries in the window plus the
request stay within the limit. Consequence (exact, no burst allowance): in *any*
60-second interval at most ``limit`` requests (or tokens, counted at their reservation)
are admitted. Proof: take the last admission in an interval ``[a, a + 60 s)``; every
earlier admission in the interval is less than 60 s older, so it was still in the window
then, and the check bounded their sum.

The Retry-After of a refusal is when enough of the oldest entries have left the window:
``ts_of_entry + window - now`` for the entry whose departure frees enough. The sliding
log and its trade-off against fixed windows and token buckets are described in Figma's
engineering post "An alternative approach to rate limiting" (N. Mahdi, 2017). Unlike a
token bucket of capacity N refilling N/60 per second (a burst of N, then up to 2N in a
60-second interval), the log never admits more than N in any 60-second interval.

The Redis backend runs the same algorithm in Lua (:mod:`teamgpu.limits.lua`); the tests
run one suite against both.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from teamgpu.limits.models import CONCURRENCY_RETRY_US, DAY_US, WINDOW_US, KeyLimits


class _Entry:
    __slots__ = ("amount", "entry_id", "ts_us")

    def __init__(self, ts_us: int, amount: int, entry_id: str | None) -> None:
        self.ts_us = ts_us
        self.amount = amount
        self.entry_id = entry_id


class WindowLog:
    """Entries ``(ts_us, amount)`` in time order, and their running total.

    Args:
        window_us: window length in microseconds.
    """

    __slots__ = ("_by_id", "_entries", "total", "window_us")

    def __init__(self, window_us: int = WINDOW_US) -> None:
        self.window_us = window_us
        self.total = 0
        self._entries: deque[_Entry] = deque()
        self._by_id: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def prune(self, now_us: int) -> None:
        """Drop entries that have left the window (``ts_us <= now_us - window_us``)."""
        cutoff = now_us - self.window_us
        entries = self._entries
        while entries and entries[0].ts_us <= cutoff:
            e = entries.popleft()
            self.total -= e.amount
            if e.entry_id is not None:
                self._by_id.pop(e.entry_id, None)

    def add(self, ts_us: int, amount: int, entry_id: str | None = None) -> None:
        """Add an entry at ``ts_us``, kept in time order."""
        e = _Entry(ts_us, amount, entry_id)
        entries = self._entries
        if not entries or entries[-1].ts_us <= ts_us:
            entries.append(e)
        else:  # a clock that went back, or tests passing times out of order
            i = len(entries)
            while i > 0 and entries[i - 1].ts_us > ts_us:
                i -= 1
            entries.insert(i, e)
        self.total += amount
        if entry_id is not None:
            self._by_id[entry_id] = e

    def set_amount(self, entry_id: str, amount: int) -> int | None:
        """Change an entry's amount (0 removes it).

        Returns:
            The entry's timestamp (microseconds), or None when it has left the window.
        """
        e = self._by_id.get(entry_id)
        if e is None:
            return None
        self.total += amount - e.amount
        if amount == 0:
            self._entries.remove(e)
            del self._by_id[entry_id]
        else:
            e.amount = amount
        return e.ts_us

    def newest_us(self) -> int | None:
        """Timestamp of the newest entry, or None when the window is empty."""
        return self._entries[-1].ts_us if self._entries else None

    def wait_to_free_us(self, now_us: int, need: int) -> int:
        """Microseconds until entries worth at least ``need`` have left the window.

        Assumes :meth:`prune` ran at ``now_us``. Returns 0 when ``need <= 0``.
        """
        if need <= 0:
            return 0
        freed = 0
        for e in self._entries:
            freed += e.amount
            if freed >= need:
                return e.ts_us + self.window_us - now_us
        return self.window_us  # unreachable while need <= total


@dataclass(frozen=True)
class Usage:
    """One key's use at ``now_us`` (after the reservation, if one was just admitted).

    Attributes:
        now_us: the clock reading the numbers belong to (microseconds since the epoch).
        requests: requests in the window.
        requests_newest_us: newest request entry, or None.
        tokens: tokens in the window (reservations at their estimate).
        tokens_newest_us: newest token entry, or None.
        in_flight: requests holding a concurrency slot.
        day: UTC day number of ``now_us``.
        day_used: tokens charged today (UTC).
    """

    now_us: int
    requests: int
    requests_newest_us: int | None
    tokens: int
    tokens_newest_us: int | None
    in_flight: int
    day: int
    day_used: int


@dataclass(frozen=True)
class Waits:
    """For each limit that refuses, microseconds until it would admit; None = admits."""

    requests: int | None = None
    tokens: int | None = None
    concurrent: int | None = None
    daily_tokens: int | None = None

    @property
    def admitted(self) -> bool:
        return (
            self.requests is None
            and self.tokens is None
            and self.concurrent is None
            and self.daily_tokens is None
        )


class KeyState:
    """All limit state of one key, in process: the request and token windows, the
    requests in flight and today's token count."""

    __slots__ = ("day", "day_used", "in_flight", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = WindowLog()
        self.tokens = WindowLog()
        self.in_flight: set[str] = set()
        self.day = -1
        self.day_used = 0

    def prune(self, now_us: int) -> None:
        """Drop window entries that have left, and roll the daily count at 00:00 UTC."""
        self.requests.prune(now_us)
        self.tokens.prune(now_us)
        today = now_us // DAY_US
        if today != self.day:
            self.day = today
            self.day_used = 0

    def usage(self, now_us: int) -> Usage:
        """The key's use now (call :meth:`prune` first)."""
        return Usage(
            now_us=now_us,
            requests=len(self.requests),
            requests_newest_us=self.requests.newest_us(),
            tokens=self.tokens.total,
            tokens_newest_us=self.tokens.newest_us(),
            in_flight=len(self.in_flight),
            day=self.day,
            day_used=self.day_used,
        )

    def waits(self, now_us: int, limits: KeyLimits, est_tokens: int) -> Waits:
        """Which limits refuse a request estimated at ``est_tokens``, and for how long.

        Call :meth:`prune` first. The estimate must fit the limits themselves (checked by
        the caller), so every wait is finite.
        """
        w_req = w_tok = w_conc = w_day = None
        n = len(self.requests)
        if limits.rpm and n + 1 > limits.rpm:
            w_req = self.requests.wait_to_free_us(now_us, n + 1 - limits.rpm)
        if limits.tpm and self.tokens.total + est_tokens > limits.tpm:
            w_tok = self.tokens.wait_to_free_us(now_us, self.tokens.total + est_tokens - limits.tpm)
        if limits.max_concurrent and len(self.in_flight) + 1 > limits.max_concurrent:
            w_conc = CONCURRENCY_RETRY_US
        if limits.daily_tokens and self.day_used + est_tokens > limits.daily_tokens:
            w_day = (self.day + 1) * DAY_US - now_us
        return Waits(w_req, w_tok, w_conc, w_day)

    def admit(self, now_us: int, reservation_id: str, est_tokens: int) -> None:
        """Record an admission in every window (after :meth:`waits` found none refusing)."""
        self.requests.add(now_us, 1)
        if est_tokens > 0:
            self.tokens.add(now_us, est_tokens, reservation_id)
        self.in_flight.add(reservation_id)
        self.day_used += est_tokens

    def settle(
        self, now_us: int, reservation_id: str, est_tokens: int, actual_tokens: int, day: int
    ) -> bool:
        """Replace a reservation's estimate by the actual count and free its slot.

        The part of the estimate not used is refunded where it was charged (if that
        entry is still in the window, and the day is still today). Tokens beyond the
        estimate are charged now, as a new entry, so they count for a full window even
        when the request ran longer than one.

        Returns:
            False when the reservation was already settled (nothing changed).
        """
        if reservation_id not in self.in_flight:
            return False
        self.in_flight.discard(reservation_id)
        self.prune(now_us)
        kept = min(actual_tokens, est_tokens)
        if est_tokens > 0:
            self.tokens.set_amount(reservation_id, kept)
        if day == self.day:
            self.day_used = max(0, self.day_used - (est_tokens - kept))
        excess = actual_tokens - est_tokens
        if excess > 0:
            self.tokens.add(now_us, excess)
            self.day_used += excess
        return True
