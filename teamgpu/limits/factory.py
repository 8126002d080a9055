"""Building the limiter and the auth-failure throttle from the settings' values."""

from __future__ import annotations

from teamgpu.limits.auth_throttle import (
    AuthFailureThrottle,
    MemoryAuthFailureThrottle,
    RedisAuthFailureThrottle,
)
from teamgpu.limits.base import Limiter
from teamgpu.limits.memory import MemoryLimiter
from teamgpu.limits.outage import OnRedisError
from teamgpu.limits.redis_backend import DEFAULT_PREFIX, RedisLimiter, connect


def make_limiter(
    redis_url: str | None,
    *,
    on_redis_error: OnRedisError = "open",
    key_prefix: str = DEFAULT_PREFIX,
    lease_s: float = 30.0,
    redis_timeout_s: float = 0.5,
) -> Limiter:
    """The limiter for this gateway: in process without ``redis_url``, else in Redis.

    No connection is made here; the first request connects (a Redis that is down then
    takes the ``on_redis_error`` path, it does not stop the gateway from starting).

    Args:
        redis_url: e.g. ``redis://127.0.0.1:6379/0`` (setting ``redis_url``), or None.
        on_redis_error: ``"open"`` (admit, log, count) or ``"closed"`` (503) while Redis
            fails (setting ``redis_failure_mode``).
        key_prefix: prefix of every Redis key.
        lease_s: concurrency lease lifetime without renewal (seconds); a crashed replica's
            slots are free again after at most this long.
        redis_timeout_s: connect and read timeout of each Redis call (seconds).
    """
    if redis_url is None:
        return MemoryLimiter()
    return RedisLimiter(
        connect(redis_url, timeout_s=redis_timeout_s),
        key_prefix=key_prefix,
        on_redis_error=on_redis_error,
        lease_s=lease_s,
        owns_client=True,
    )


def make_auth_failure_throttle(
    redis_url: str | None,
    *,
    max_failures_per_minute: int = 10,
    on_redis_error: OnRedisError = "open",
    key_prefix: str = DEFAULT_PREFIX,
    redis_timeout_s: float = 0.5,
) -> AuthFailureThrottle:
    """The auth-failure throttle: in process without ``redis_url``, else in Redis.

    Args:
        redis_url: as for :func:`make_limiter`.
        max_failures_per_minute: failures allowed per client address in any 60 s
            (setting ``auth_failures_per_minute``).
        on_redis_error: as for :func:`make_limiter`.
        key_prefix: prefix of every Redis key.
        redis_timeout_s: connect and read timeout of each Redis call (seconds).
    """
    if redis_url is None:
        return MemoryAuthFailureThrottle(max_failures_per_minute)
    return RedisAuthFailureThrottle(
        connect(redis_url, timeout_s=redis_timeout_s),
        max_failures_per_minute=max_failures_per_minute,
        key_prefix=key_prefix,
        on_redis_error=on_redis_error,
        owns_client=True,
    )
