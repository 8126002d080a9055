"""Throttling of failed authentication per client address, so keys cannot be guessed at
speed.

The same sliding window log as the key limits (:mod:`teamgpu.limits.window`): an address
with ``max_failures_per_minute`` failures in the last 60 s is refused (429) until the
oldest of them is 60 s old. Only failures count, and only against the address that made
them: a blocked address never affects another one, nor a key used from elsewhere.

IPv6 addresses are grouped by their /64 network (one subscriber usually holds a whole
/64 and could otherwise rotate addresses freely); IPv4-mapped IPv6 addresses count as
the IPv4 address.

Behind a reverse proxy every client has the proxy's address, and a throttle keyed on it
would let one guesser lock out everyone: the gateway must then take the client address
from ``X-Forwarded-For`` (setting ``trust_forwarded_for``), and only then.

Caveat: :meth:`AuthFailureThrottle.check` runs before the key is verified and
:meth:`AuthFailureThrottle.record_failure` after, so attempts already past ``check``
when the limit is reached still complete; with 256-bit keys this does not matter.
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis

from teamgpu.limits import lua
from teamgpu.limits.base import wall_clock_us
from teamgpu.limits.errors import RateLimited
from teamgpu.limits.models import ceil_seconds
from teamgpu.limits.outage import OnRedisError, RedisOutagePolicy
from teamgpu.limits.redis_backend import DEFAULT_PREFIX, REDIS_ERRORS
from teamgpu.limits.window import WindowLog


def client_key(addr: str, ipv6_prefix_len: int = 64) -> str:
    """The throttle's key for a client address.

    ``"203.0.113.7"`` stays as it is; ``"2001:db8::1"`` becomes ``"2001:db8::/64"``;
    ``"::ffff:203.0.113.7"`` becomes ``"203.0.113.7"``; anything that is not an IP address
    (a Unix socket, a test client) is used as it is.
    """
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_len), strict=False))
    return str(ip)


def _blocked(max_failures: int, retry_after_s: int) -> RateLimited:
    return RateLimited(
        "auth_failures",
        retry_after_s,
        f"Too many failed authentication attempts from your address: Limit {max_failures} "
        f"per minute. Please try again in {retry_after_s}s.",
    )


@runtime_checkable
class AuthFailureThrottle(Protocol):
    """Per-address throttle of failed authentications.

    Usage::

        await throttle.check(addr)           # raises RateLimited (429) when blocked
        if not key_ok:
            await throttle.record_failure(addr)
            ...  # 401
    """

    @property
    def redis_errors_total(self) -> int: ...

    async def check(self, addr: str, now: float | None = None) -> None:
        """Refuse an address with too many recent failures.

        Args:
            addr: the client address (already taken from X-Forwarded-For if trusted).
            now: seconds since the epoch; None = the throttle's clock.

        Raises:
            RateLimited: ``limit == "auth_failures"``; 429 with Retry-After (whole seconds
                until the oldest counted failure leaves the window).
            LimiterUnavailable: Redis fails and the throttle fails closed; 503.
        """
        ...

    async def record_failure(self, addr: str, now: float | None = None) -> None:
        """Count one failed authentication of ``addr``. Never raises for Redis errors."""
        ...

    async def close(self) -> None: ...


class MemoryAuthFailureThrottle:
    """:class:`AuthFailureThrottle` in process.

    Args:
        max_failures_per_minute: failures allowed per address in any 60 s (>= 1).
    """

    def __init__(self, max_failures_per_minute: int = 10) -> None:
        if max_failures_per_minute < 1:
            raise ValueError("max_failures_per_minute must be >= 1")
        self.max_failures = max_failures_per_minute
        self._logs: dict[str, WindowLog] = {}
        self._sweep_at = 1024

    @property
    def redis_errors_total(self) -> int:
        return 0

    async def check(self, addr: str, now: float | None = None) -> None:
        """See :meth:`AuthFailureThrottle.check` (raises RateLimited, 429)."""
        log = self._logs.get(client_key(addr))
        if log is None:
            return
        now_us = wall_clock_us(now)
        log.prune(now_us)
        if len(log) >= self.max_failures:
            wait = log.wait_to_free_us(now_us, len(log) + 1 - self.max_failures)
            raise _blocked(self.max_failures, ceil_seconds(wait))

    async def record_failure(self, addr: str, now: float | None = None) -> None:
        """See :meth:`AuthFailureThrottle.record_failure`."""
        now_us = wall_clock_us(now)
        key = client_key(addr)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = WindowLog()
        log.prune(now_us)
        log.add(now_us, 1)
        if len(self._logs) >= self._sweep_at:  # drop addresses with no recent failure
            for k, v in list(self._logs.items()):
                v.prune(now_us)
                if not len(v):
                    del self._logs[k]
            self._sweep_at = max(1024, 2 * len(self._logs))

    async def close(self) -> None:
        """Nothing to release."""


class RedisAuthFailureThrottle:
    """:class:`AuthFailureThrottle` in Redis, shared by gateway replicas.

    One ZSET per address, ``<prefix>:auth:<address>``, member a failure id, score its time
    in microseconds; it expires 61 s after the last failure.

    Args:
        client: an asyncio Redis client (see :func:`teamgpu.limits.redis_backend.connect`).
        max_failures_per_minute: failures allowed per address in any 60 s (>= 1).
        key_prefix: prefix of every key.
        on_redis_error: ``"open"``: do not throttle while Redis fails; ``"closed"``:
            :meth:`check` raises LimiterUnavailable (503).
        owns_client: close ``client`` in :meth:`close`.
        policy: the outage policy (built from ``on_redis_error`` when None).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_failures_per_minute: int = 10,
        key_prefix: str = DEFAULT_PREFIX,
        on_redis_error: OnRedisError = "open",
        owns_client: bool = False,
        policy: RedisOutagePolicy | None = None,
    ) -> None:
        if max_failures_per_minute < 1:
            raise ValueError("max_failures_per_minute must be >= 1")
        self.max_failures = max_failures_per_minute
        self._client = client
        self._prefix = key_prefix
        self._owns_client = owns_client
        self.policy = policy or RedisOutagePolicy(on_redis_error, what="auth-failure throttle")
        self._script = client.register_script(lua.AUTH_FAILURES)

    @property
    def redis_errors_total(self) -> int:
        return self.policy.errors_total

    def _key(self, addr: str) -> str:
        return f"{self._prefix}:auth:{client_key(addr)}"

    async def _call(self, mode: str, addr: str, now: float | None) -> int:
        clock = "" if now is None else str(wall_clock_us(now))
        result = await self._script(
            keys=[self._key(addr)],
            args=[mode, clock, self.max_failures, uuid.uuid4().hex],
        )
        return int(result)

    async def check(self, addr: str, now: float | None = None) -> None:
        """See :meth:`AuthFailureThrottle.check` (raises RateLimited 429,
        LimiterUnavailable 503 when failing closed)."""
        if not self.policy.available():
            if self.policy.mode == "closed":
                raise self.policy.unavailable()
            return
        try:
            wait = await self._call("check", addr, now)
        except REDIS_ERRORS as exc:
            self.policy.record(exc)
            if self.policy.mode == "closed":
                raise self.policy.unavailable() from exc
            return
        if wait >= 0:
            raise _blocked(self.max_failures, ceil_seconds(wait))

    async def record_failure(self, addr: str, now: float | None = None) -> None:
        """See :meth:`AuthFailureThrottle.record_failure`."""
        if not self.policy.available():
            return
        try:
            await self._call("record", addr, now)
        except REDIS_ERRORS as exc:
            self.policy.record(exc)

    async def close(self) -> None:
        """Close the client if this throttle owns it."""
        if self._owns_client:
            await self._client.aclose()
