"""What the Redis backends do when Redis fails: count, log (at most one line per 30 s),
stop trying for a moment, and either fail open or raise :class:`LimiterUnavailable`."""

from __future__ import annotations

import logging
import time
from typing import Literal

from teamgpu.limits.errors import LimiterUnavailable

OnRedisError = Literal["open", "closed"]

logger = logging.getLogger("teamgpu.limits")


class RedisOutagePolicy:
    """Shared by the Redis limiter and the Redis auth-failure throttle.

    Args:
        mode: ``"open"``: admit without limits while Redis fails (logged, counted);
            ``"closed"``: refuse with :class:`LimiterUnavailable` (503).
        retry_interval_s: after an error, Redis is not tried again for this long (seconds);
            calls meanwhile take the outage path at once instead of each waiting for a
            connect timeout.
        unavailable_retry_after_s: ``Retry-After`` of the 503 when failing closed (seconds).
        log_interval_s: at most one warning per this many seconds (seconds).
        what: what fails, for the log line and the 503 message.

    Attributes:
        errors_total: Redis errors met so far (read by the metrics layer).
    """

    def __init__(
        self,
        mode: OnRedisError = "open",
        *,
        retry_interval_s: float = 1.0,
        unavailable_retry_after_s: int = 5,
        log_interval_s: float = 30.0,
        what: str = "rate limits",
    ) -> None:
        if mode not in ("open", "closed"):
            raise ValueError(f"on_redis_error must be 'open' or 'closed', got {mode!r}")
        self.mode: OnRedisError = mode
        self.retry_interval_s = retry_interval_s
        self.unavailable_retry_after_s = unavailable_retry_after_s
        self.log_interval_s = log_interval_s
        self.what = what
        self.errors_total = 0
        self._down_until = 0.0
        self._last_log = -float("inf")
        self._suppressed = 0

    def available(self) -> bool:
        """False while Redis is being left alone after an error."""
        return time.monotonic() >= self._down_until

    def record(self, exc: BaseException) -> None:
        """Count and (rate-limited) log one Redis error, and pause Redis use briefly."""
        self.errors_total += 1
        now = time.monotonic()
        self._down_until = now + self.retry_interval_s
        if now - self._last_log < self.log_interval_s:
            self._suppressed += 1
            return
        action = (
            "admitting requests without limits (fail open)"
            if self.mode == "open"
            else "refusing requests with 503 (fail closed)"
        )
        logger.warning(
            "Redis unavailable for %s: %s: %s; %s. %d similar errors suppressed since the "
            "last warning; %d errors in total.",
            self.what,
            type(exc).__name__,
            exc,
            action,
            self._suppressed,
            self.errors_total,
        )
        self._last_log = now
        self._suppressed = 0

    def unavailable(self) -> LimiterUnavailable:
        """The 503 raised when failing closed."""
        return LimiterUnavailable(
            f"The {self.what} store is unavailable; please retry.",
            retry_after_s=self.unavailable_retry_after_s,
        )
