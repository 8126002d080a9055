"""The :class:`Limiter` interface and the logic both backends share: validating an
estimate, turning a key's use into a :class:`LimitStatus`, and a refusal into a
:class:`RateLimited` with its Retry-After."""

from __future__ import annotations

import time
import uuid
from typing import Protocol, runtime_checkable

from teamgpu.limits.errors import RateLimited, RequestTooLarge
from teamgpu.limits.models import (
    DAY_US,
    WINDOW_US,
    KeyLimits,
    LimitName,
    LimitStatus,
    Reservation,
    ceil_seconds,
    seconds_to_us,
)
from teamgpu.limits.window import Usage, Waits


@runtime_checkable
class Limiter(Protocol):
    """Per-key rate limits and quotas: RPM, TPM, concurrency and a daily token quota.

    Usage per request::

        reservation, status = await limiter.reserve(key_id, limits, est_tokens)
        try:
            ...  # serve; status.headers() go on the response
        finally:
            await limiter.settle(reservation, actual_tokens)

    Attributes:
        redis_errors_total: Redis errors met so far (always 0 in process), for metrics.
    """

    @property
    def redis_errors_total(self) -> int: ...

    async def reserve(
        self, key_id: str, limits: KeyLimits, est_tokens: int, now: float | None = None
    ) -> tuple[Reservation, LimitStatus]:
        """Check every limit and, if all admit, reserve in all of them at once.

        All-or-nothing and atomic: a refused request takes nothing, and concurrent calls
        (on one gateway or many sharing Redis) never admit more than the limits allow.

        Args:
            key_id: the API key to charge.
            limits: its limits (0 = unlimited).
            est_tokens: prompt tokens + max_tokens (tokens, >= 0), reserved in the TPM
                window and today's quota until :meth:`settle`.
            now: the clock in seconds since the epoch; None = the limiter's clock (the
                Redis server's clock for :class:`RedisLimiter`). Tests pass it.

        Returns:
            The reservation to settle, and the key's status after it (for the headers).

        Raises:
            RateLimited: a limit refuses now; 429 with Retry-After (whole seconds until
                the request would be admitted if nothing else happened).
            RequestTooLarge: ``est_tokens`` alone exceeds the TPM or the daily quota, so it
                can never be admitted; 400.
            LimiterUnavailable: Redis is unreachable and the limiter fails closed; 503.
            ValueError: ``est_tokens`` is negative (a server bug; 500).
        """
        ...

    async def settle(
        self, reservation: Reservation, actual_tokens: int, now: float | None = None
    ) -> None:
        """Replace the reserved estimate by the tokens really used, and free the slot.

        Call it exactly when the request ends, however it ends: non-streaming, streaming,
        client disconnect (pass the tokens produced so far), backend error. Idempotent:
        only the first call counts. Never raises for Redis errors (they are counted and
        logged; the concurrency lease then expires by itself).

        Args:
            reservation: from :meth:`reserve`.
            actual_tokens: prompt + completion tokens really used (>= 0); may exceed the
                estimate, and then the window records the actual count.
            now: the clock in seconds since the epoch; None = the limiter's clock.
        """
        ...

    async def status(self, key_id: str, limits: KeyLimits, now: float | None = None) -> LimitStatus:
        """The key's standing without reserving anything.

        Raises:
            LimiterUnavailable: Redis is unreachable and the limiter fails closed; 503.
        """
        ...

    async def close(self) -> None:
        """Release connections and background tasks. In-flight reservations are not
        released (Redis leases expire on their own)."""
        ...


def new_reservation_id() -> str:
    """A unique reservation id (32 hex characters, no ``:``)."""
    return uuid.uuid4().hex


def wall_clock_us(now: float | None) -> int:
    """``now`` (seconds) in microseconds, or the wall clock when None."""
    return seconds_to_us(time.time() if now is None else now)


def check_estimate(limits: KeyLimits, est_tokens: int) -> None:
    """Refuse estimates that no wait could ever admit.

    Raises:
        RequestTooLarge: ``est_tokens`` exceeds the TPM or the daily quota; 400.
        ValueError: ``est_tokens`` is negative (a server bug; 500).
    """
    if est_tokens < 0:
        raise ValueError(f"est_tokens must be >= 0, got {est_tokens}")
    if limits.tpm and est_tokens > limits.tpm:
        raise RequestTooLarge("tokens", est_tokens, limits.tpm)
    if limits.daily_tokens and est_tokens > limits.daily_tokens:
        raise RequestTooLarge("daily_tokens", est_tokens, limits.daily_tokens)


def check_actual(actual_tokens: int) -> None:
    """Raises ValueError (a server bug; 500) for a negative token count."""
    if actual_tokens < 0:
        raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")


def _reset_s(newest_us: int | None, now_us: int) -> float:
    if newest_us is None:
        return 0.0
    return max(0, newest_us + WINDOW_US - now_us) / 1_000_000


def status_from_usage(limits: KeyLimits, usage: Usage) -> LimitStatus:
    """The :class:`LimitStatus` of a key whose use is ``usage``."""
    return LimitStatus(
        limit_requests=limits.rpm,
        remaining_requests=max(0, limits.rpm - usage.requests),
        reset_requests_s=_reset_s(usage.requests_newest_us, usage.now_us),
        limit_tokens=limits.tpm,
        remaining_tokens=max(0, limits.tpm - usage.tokens),
        reset_tokens_s=_reset_s(usage.tokens_newest_us, usage.now_us),
        limit_daily_tokens=limits.daily_tokens,
        remaining_daily_tokens=max(0, limits.daily_tokens - usage.day_used),
        reset_daily_tokens_s=((usage.day + 1) * DAY_US - usage.now_us) / 1_000_000,
        max_concurrent=limits.max_concurrent,
        in_flight=usage.in_flight,
    )


def refusal(limits: KeyLimits, est_tokens: int, waits: Waits, usage: Usage) -> RateLimited:
    """The :class:`RateLimited` for a refused request.

    When several limits refuse, the request is admitted only once all admit, so the
    binding limit is the one with the longest wait (ties: requests, tokens, concurrent,
    daily_tokens).
    """
    named: tuple[tuple[int | None, LimitName], ...] = (
        (waits.requests, "requests"),
        (waits.tokens, "tokens"),
        (waits.concurrent, "concurrent"),
        (waits.daily_tokens, "daily_tokens"),
    )
    candidates = [(w, name) for w, name in named if w is not None]
    wait_us, limit = max(candidates, key=lambda c: c[0])  # max keeps the first of ties
    retry_after_s = ceil_seconds(wait_us)
    if limit == "requests":
        what = f"requests per min (RPM): Limit {limits.rpm}, Used {usage.requests}, Requested 1"
    elif limit == "tokens":
        what = (
            f"tokens per min (TPM): Limit {limits.tpm}, Used {usage.tokens}, Requested {est_tokens}"
        )
    elif limit == "concurrent":
        what = f"concurrent requests: Limit {limits.max_concurrent}, In flight {usage.in_flight}"
    else:
        what = (
            f"tokens per day (UTC): Limit {limits.daily_tokens}, Used {usage.day_used}, "
            f"Requested {est_tokens}; the quota resets at 00:00 UTC"
        )
    message = f"Rate limit reached on {what}. Please try again in {retry_after_s}s."
    return RateLimited(limit, retry_after_s, message, limit_status=status_from_usage(limits, usage))
