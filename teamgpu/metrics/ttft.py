"""A rolling window of time-to-first-token samples, for ``/stats`` and the dashboard.

Prometheus keeps the long history (``teamgpu_time_to_first_token_seconds``); this window
answers the two questions the dashboard asks without a Prometheus server: what are TTFT
p50 and p95 over the last 5 minutes, and what were they in each minute of the last hour.

It is a plain synchronous data structure with no I/O and no clock of its own: every call
takes ``now`` (seconds since the epoch, wall clock, so that minutes line up with the
clock on the wall). Quantiles are nearest-rank, like ``SchedulerStats.wait_quantile_s``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["MinutePoint", "TtftSummary", "TtftWindow", "nearest_rank"]


def nearest_rank(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank quantile of already sorted values.

    Args:
        sorted_values: Values in ascending order.
        q: The quantile in [0, 1] (0.5 for p50, 0.95 for p95).

    Returns:
        The value, or None when there are no values.

    Raises:
        ValueError: ``q`` outside [0, 1].
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q={q!r}: must be in [0, 1]")
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class TtftSummary:
    """TTFT over a recent window.

    Attributes:
        window_s: Length of the window in seconds.
        count: Samples in the window.
        p50_s: Median TTFT in seconds, None without samples.
        p95_s: 95th percentile TTFT in seconds, None without samples.
    """

    window_s: float
    count: int
    p50_s: float | None
    p95_s: float | None


@dataclass(frozen=True, slots=True)
class MinutePoint:
    """TTFT in one wall-clock minute.

    Attributes:
        t: Start of the minute, seconds since the epoch (a multiple of 60).
        count: Samples in that minute.
        p50_s: Median TTFT in seconds, None without samples.
        p95_s: 95th percentile TTFT in seconds, None without samples.
    """

    t: int
    count: int
    p50_s: float | None
    p95_s: float | None


class TtftWindow:
    """TTFT samples of the last ``window_s`` seconds plus a per-minute history.

    Memory is bounded whatever the request rate: at most ``max_samples`` raw samples
    (the oldest are dropped first, so under extreme load the window is shorter than
    ``window_s``), and one summary per minute of history.

    Args:
        window_s: The recent window in seconds (default 300, i.e. 5 minutes).
        history_minutes: Minutes of per-minute history kept (default 60).
        max_samples: Most raw samples kept for the recent window and the current minute.

    Raises:
        ValueError: A non-positive argument.
    """

    def __init__(
        self, *, window_s: float = 300.0, history_minutes: int = 60, max_samples: int = 50_000
    ) -> None:
        if window_s <= 0 or history_minutes < 1 or max_samples < 1:
            raise ValueError(
                f"window_s={window_s!r}, history_minutes={history_minutes!r}, "
                f"max_samples={max_samples!r}: all must be positive"
            )
        self.window_s = window_s
        self.history_minutes = history_minutes
        self.max_samples = max_samples
        self._samples: deque[tuple[float, float]] = deque()  # (at, ttft_s), oldest first
        self._minute: int | None = None  # start of the minute being filled
        self._minute_values: list[float] = []
        self._history: deque[MinutePoint] = deque()  # closed minutes, oldest first

    def add(self, ttft_s: float, now: float) -> None:
        """Record one request's TTFT.

        Args:
            ttft_s: Seconds from the request's arrival to its first token, >= 0.
            now: Wall clock in seconds since the epoch.
        """
        if not ttft_s >= 0 or math.isinf(ttft_s):
            return  # NaN, negative or infinite: not a measurement
        self._roll(now)
        self._samples.append((now, ttft_s))
        if len(self._samples) > self.max_samples:
            self._samples.popleft()
        if len(self._minute_values) < self.max_samples:
            self._minute_values.append(ttft_s)
        self._expire(now)

    def summary(self, now: float) -> TtftSummary:
        """p50 and p95 over the last ``window_s`` seconds.

        Args:
            now: Wall clock in seconds since the epoch.
        """
        self._roll(now)
        self._expire(now)
        values = sorted(v for _, v in self._samples)
        return TtftSummary(self.window_s, len(values), nearest_rank(values, 0.5),
                           nearest_rank(values, 0.95))

    def per_minute(self, now: float) -> list[MinutePoint]:
        """One point per minute of the last ``history_minutes`` minutes, oldest first.

        The last point is the current, still open minute. Minutes without a sample have
        ``count`` 0 and None quantiles, so the list always has ``history_minutes`` points.

        Args:
            now: Wall clock in seconds since the epoch.
        """
        self._roll(now)
        current = _minute_of(now)
        by_t = {p.t: p for p in self._history}
        if self._minute is not None:
            by_t[self._minute] = _point(self._minute, self._minute_values)
        first = current - 60 * (self.history_minutes - 1)
        return [by_t.get(t) or MinutePoint(t, 0, None, None)
                for t in range(first, current + 1, 60)]

    # ------------------------------------------------------------------ internals

    def _roll(self, now: float) -> None:
        """Close the open minute when ``now`` is in a later one."""
        minute = _minute_of(now)
        if self._minute is None:
            self._minute = minute
            return
        if minute <= self._minute:
            return  # same minute (or a clock that stepped back: keep filling it)
        if self._minute_values:
            self._history.append(_point(self._minute, self._minute_values))
        self._minute = minute
        self._minute_values = []
        oldest = minute - 60 * (self.history_minutes - 1)
        while self._history and self._history[0].t < oldest:
            self._history.popleft()

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()


def _minute_of(now: float) -> int:
    return int(now // 60) * 60


def _point(t: int, values: list[float]) -> MinutePoint:
    s = sorted(values)
    return MinutePoint(t, len(s), nearest_rank(s, 0.5), nearest_rank(s, 0.95))
