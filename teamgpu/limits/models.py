"""Value types of the limits layer: a key's limits, a reservation, the status headers.

Times inside the limits layer are integers in microseconds since the Unix epoch
(``*_us``), so window boundaries are exact; the public API takes and returns seconds
(``*_s``, floats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

#: Length of the sliding windows behind "per minute", in microseconds.
WINDOW_US = 60_000_000
#: One UTC day in microseconds (Unix time has no leap seconds, so every day is this long).
DAY_US = 86_400_000_000
#: Retry-After used when only the concurrency limit refuses: when a slot frees depends
#: on requests still running, which nobody can know in advance (microseconds).
CONCURRENCY_RETRY_US = 1_000_000

LimitName = Literal["requests", "tokens", "concurrent", "daily_tokens", "auth_failures"]


def seconds_to_us(seconds: float) -> int:
    """Seconds (float) to whole microseconds, rounded to nearest."""
    return round(seconds * 1_000_000)


def ceil_seconds(us: int) -> int:
    """A wait in microseconds as whole seconds for ``Retry-After``: rounded up, at least 1."""
    return max(1, math.ceil(us / 1_000_000))


@dataclass(frozen=True)
class KeyLimits:
    """The limits of one API key, defaults already resolved by the caller.

    ``0`` means unlimited; ``None`` never appears here.

    Attributes:
        rpm: requests admitted in any 60-second window.
        tpm: tokens (prompt + completion) in any 60-second window.
        max_concurrent: requests in flight at once.
        daily_tokens: tokens per calendar day in UTC (resets at 00:00 UTC).

    Raises:
        ValueError: a limit is negative (a server bug, never a client error).
    """

    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    daily_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent", "daily_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"KeyLimits.{name} must be an int >= 0 (0 = unlimited), got {value!r}"
                )


@dataclass
class Reservation:
    """What :meth:`Limiter.reserve` took for one request; hand it to :meth:`Limiter.settle`.

    Attributes:
        key_id: the API key charged.
        tokens: the estimate reserved at admission (tokens).
        reservation_id: unique id of this reservation (its entry in every window).
        admitted_at_us: admission time, microseconds since the epoch (the limiter's clock).
        day: UTC day number of the admission (days since 1970-01-01).
        recorded: False when a Redis outage made the limiter fail open: nothing was
            reserved, and settle then charges the whole actual count.
        settled: set by the first settle; later settles do nothing.
    """

    key_id: str
    tokens: int
    reservation_id: str
    admitted_at_us: int
    day: int
    recorded: bool = True
    settled: bool = field(default=False, compare=False)

    @property
    def admitted_at_s(self) -> float:
        """Admission time in seconds since the epoch."""
        return self.admitted_at_us / 1_000_000


def format_duration(seconds: float) -> str:
    """Format a duration the way OpenAI's ``x-ratelimit-reset-*`` headers do (Go style).

    Rounded up to the millisecond: ``0s``, ``250ms``, ``1s``, ``1.5s``, ``6m0s``,
    ``1h0m0s``.

    Args:
        seconds: the duration in seconds; negative values count as 0.
    """
    ms = math.ceil(round(seconds * 1000, 6)) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = (str(rest // 1000) if rest % 1000 == 0
            else f"{rest / 1000:.3f}".rstrip("0").rstrip("."))
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class LimitStatus:
    """One key's standing against its limits, for OpenAI's headers on every response.

    A limit of ``0`` is unlimited; its header family is then left out. Reset times are
    how long until the window is back to its initial state (every entry in it has left),
    as OpenAI defines ``x-ratelimit-reset-*``.

    Attributes:
        limit_requests: the key's RPM (0 = unlimited).
        remaining_requests: requests still admissible in the current window.
        reset_requests_s: seconds until the request window is empty.
        limit_tokens: the key's TPM (0 = unlimited).
        remaining_tokens: tokens still admissible in the current window (reservations of
            requests in flight count at their estimate).
        reset_tokens_s: seconds until the token window is empty.
        limit_daily_tokens: the key's daily quota (0 = unlimited); not sent as a header.
        remaining_daily_tokens: tokens left today (UTC).
        reset_daily_tokens_s: seconds until 00:00 UTC.
        max_concurrent: the key's concurrency limit (0 = unlimited); not sent as a header.
        in_flight: requests of the key in flight now.
    """

    limit_requests: int = 0
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int = 0
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0
    limit_daily_tokens: int = 0
    remaining_daily_tokens: int = 0
    reset_daily_tokens_s: float = 0.0
    max_concurrent: int = 0
    in_flight: int = 0

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers, lower-case names, for every response.

        Example: ``{"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests":
        "59", "x-ratelimit-reset-requests": "1m0s", ...}``.
        """
        out: dict[str, str] = {}
        if self.limit_requests > 0:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.remaining_requests))
            out["x-ratelimit-reset-requests"] = format_duration(self.reset_requests_s)
        if self.limit_tokens > 0:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.remaining_tokens))
            out["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_s)
        return out

    @classmethod
    def unknown(cls, limits: KeyLimits) -> LimitStatus:
        """The status to report when the state could not be read (Redis outage, fail open):
        the configured limits, everything remaining."""
        return cls(
            limit_requests=limits.rpm,
            remaining_requests=limits.rpm,
            limit_tokens=limits.tpm,
            remaining_tokens=limits.tpm,
            limit_daily_tokens=limits.daily_tokens,
            remaining_daily_tokens=limits.daily_tokens,
            max_concurrent=limits.max_concurrent,
        )
