"""The Redis limiter: all limit state in Redis, so several gateway replicas enforce one
limit together.

Key layout (prefix ``teamgpu:lim`` by default; ``{key_id}`` is a Redis Cluster hash tag)::

    <prefix>:{key_id}:req     ZSET  member reservation id, score admission time (us)
    <prefix>:{key_id}:tok     ZSET  member "<rid>:<tokens>", score time (us)
    <prefix>:{key_id}:toksum  STRING running total of :tok
    <prefix>:{key_id}:conc    ZSET  member reservation id, score lease expiry (us)
    <prefix>:{key_id}:day     HASH  d = UTC day number, u = tokens charged that day

Window keys expire 61 s after their last write, the concurrency set 1 s after its
longest lease, the daily hash after two days. Every change is one Lua script (EVALSHA,
re-loaded with SCRIPT LOAD when Redis answers NOSCRIPT), so it is atomic.

Concurrency slots are leases: each expires ``lease_s`` after it was taken or last
renewed. A live gateway renews its leases every ``lease_s / 3``; a crashed one stops, and
its slots are freed ``lease_s`` later at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from teamgpu.limits import lua
from teamgpu.limits.base import (
    check_actual,
    check_estimate,
    new_reservation_id,
    refusal,
    status_from_usage,
    wall_clock_us,
)
from teamgpu.limits.models import (
    CONCURRENCY_RETRY_US,
    DAY_US,
    KeyLimits,
    LimitStatus,
    Reservation,
    seconds_to_us,
)
from teamgpu.limits.outage import OnRedisError, RedisOutagePolicy
from teamgpu.limits.window import Usage, Waits

#: Errors treated as a Redis outage (redis-py wraps socket errors, but be safe).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)

DEFAULT_PREFIX = "teamgpu:lim"


def connect(
    url: str,
    *,
    timeout_s: float = 0.5,
    max_connections: int = 64,
    pool_timeout_s: float = 5.0,
) -> aioredis.Redis:
    """An asyncio Redis client for the limits layer.

    Commands are not retried (a retried reserve could count twice). Connect and read time
    out after ``timeout_s``, so an unreachable Redis costs a request at most that long
    before the outage policy applies. The pool blocks: a burst of more concurrent calls
    than ``max_connections`` waits up to ``pool_timeout_s`` for a connection instead of
    failing (a full pool is load, not an outage; with a non-blocking pool a burst would
    make the limiter fail open).

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]`` (or ``rediss://``, ``unix://``).
        timeout_s: connect and read timeout (seconds).
        max_connections: connections to Redis at most.
        pool_timeout_s: longest wait for a free connection (seconds).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    return client


def _clock_arg(now: float | None) -> str:
    return "" if now is None else str(seconds_to_us(now))


def _opt(x: int) -> int | None:
    return None if x < 0 else int(x)


class RedisLimiter:
    """:class:`~teamgpu.limits.base.Limiter` with all state in Redis.

    Args:
        client: an asyncio Redis client (see :func:`connect`).
        key_prefix: prefix of every key.
        on_redis_error: ``"open"`` admits while Redis fails (a warning at most every
            30 s, :attr:`redis_errors_total` counts); ``"closed"`` raises
            :class:`~teamgpu.limits.errors.LimiterUnavailable` (503 with Retry-After).
        lease_s: lifetime of a concurrency slot without renewal (seconds).
        owns_client: close ``client`` in :meth:`close`.
        policy: the outage policy (built from ``on_redis_error`` when None).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = DEFAULT_PREFIX,
        on_redis_error: OnRedisError = "open",
        lease_s: float = 30.0,
        owns_client: bool = False,
        policy: RedisOutagePolicy | None = None,
    ) -> None:
        self._client = client
        self._prefix = key_prefix
        self._lease_s = lease_s
        self._lease_us = seconds_to_us(lease_s)
        self._owns_client = owns_client
        self.policy = policy or RedisOutagePolicy(on_redis_error)
        self._reserve = client.register_script(lua.RESERVE)
        self._settle = client.register_script(lua.SETTLE)
        self._renew = client.register_script(lua.RENEW)
        self._pending: dict[str, Reservation] = {}
        self._renewer: asyncio.Task[None] | None = None

    @property
    def redis_errors_total(self) -> int:
        """Redis errors met so far (for the metrics layer)."""
        return self.policy.errors_total

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self._prefix}:{{{key_id}}}"
        return [f"{base}:req", f"{base}:tok", f"{base}:toksum", f"{base}:conc", f"{base}:day"]

    async def _run(
        self, mode: str, key_id: str, limits: KeyLimits, est: int, rid: str, now: float | None
    ) -> tuple[bool, Waits, Usage]:
        raw: list[Any] = await self._reserve(
            keys=self._keys(key_id),
            args=[
                mode,
                _clock_arg(now),
                rid,
                est,
                limits.rpm,
                limits.tpm,
                limits.max_concurrent,
                limits.daily_tokens,
                self._lease_us,
                CONCURRENCY_RETRY_US,
            ],
        )
        r = [int(x) for x in raw]
        waits = Waits(_opt(r[2]), _opt(r[3]), _opt(r[4]), _opt(r[5]))
        usage = Usage(
            now_us=r[1],
            requests=r[6],
            requests_newest_us=_opt(r[7]),
            tokens=r[8],
            tokens_newest_us=_opt(r[9]),
            in_flight=r[10],
            day=r[11],
            day_used=r[12],
        )
        return r[0] == 1, waits, usage

    def _fail_open(
        self, key_id: str, limits: KeyLimits, est: int, rid: str, now: float | None
    ) -> tuple[Reservation, LimitStatus]:
        now_us = wall_clock_us(now)
        reservation = Reservation(
            key_id=key_id,
            tokens=est,
            reservation_id=rid,
            admitted_at_us=now_us,
            day=now_us // DAY_US,
            recorded=False,
        )
        self._pending[rid] = reservation
        return reservation, LimitStatus.unknown(limits)

    async def reserve(
        self, key_id: str, limits: KeyLimits, est_tokens: int, now: float | None = None
    ) -> tuple[Reservation, LimitStatus]:
        """See :meth:`teamgpu.limits.base.Limiter.reserve` (raises RateLimited 429,
        RequestTooLarge 400, LimiterUnavailable 503 when failing closed).

        When Redis fails and the policy is ``"open"``, the request is admitted unrecorded;
        settle then charges its actual tokens if Redis is back.
        """
        check_estimate(limits, est_tokens)
        rid = new_reservation_id()
        if not self.policy.available():
            if self.policy.mode == "closed":
                raise self.policy.unavailable()
            return self._fail_open(key_id, limits, est_tokens, rid, now)
        try:
            admitted, waits, usage = await self._run(
                "reserve", key_id, limits, est_tokens, rid, now
            )
        except REDIS_ERRORS as exc:
            self.policy.record(exc)
            if self.policy.mode == "closed":
                raise self.policy.unavailable() from exc
            return self._fail_open(key_id, limits, est_tokens, rid, now)
        if not admitted:
            raise refusal(limits, est_tokens, waits, usage)
        reservation = Reservation(
            key_id=key_id,
            tokens=est_tokens,
            reservation_id=rid,
            admitted_at_us=usage.now_us,
            day=usage.day,
        )
        self._pending[rid] = reservation
        self._start_renewer()
        return reservation, status_from_usage(limits, usage)

    async def settle(
        self, reservation: Reservation, actual_tokens: int, now: float | None = None
    ) -> None:
        """See :meth:`teamgpu.limits.base.Limiter.settle`. Redis errors are counted and
        logged, never raised."""
        check_actual(actual_tokens)
        if reservation.settled:
            return
        reservation.settled = True
        self._pending.pop(reservation.reservation_id, None)
        if not self.policy.available():
            return
        est = reservation.tokens if reservation.recorded else 0
        try:
            await self._settle(
                keys=self._keys(reservation.key_id),
                args=[
                    _clock_arg(now),
                    reservation.reservation_id,
                    est,
                    actual_tokens,
                    reservation.day,
                ],
            )
        except REDIS_ERRORS as exc:
            self.policy.record(exc)

    async def status(self, key_id: str, limits: KeyLimits, now: float | None = None) -> LimitStatus:
        """See :meth:`teamgpu.limits.base.Limiter.status` (raises LimiterUnavailable,
        503, when Redis fails and the policy is ``"closed"``)."""
        if self.policy.available():
            try:
                _, _, usage = await self._run("status", key_id, limits, 0, "", now)
                return status_from_usage(limits, usage)
            except REDIS_ERRORS as exc:
                self.policy.record(exc)
                if self.policy.mode == "closed":
                    raise self.policy.unavailable() from exc
                return LimitStatus.unknown(limits)
        if self.policy.mode == "closed":
            raise self.policy.unavailable()
        return LimitStatus.unknown(limits)

    async def renew_leases(self, now: float | None = None) -> None:
        """Extend the concurrency leases of this gateway's requests in flight.

        Runs by itself every ``lease_s / 3`` seconds once a request was admitted.
        Redis errors are counted and logged, never raised.
        """
        by_key: dict[str, list[str]] = {}
        for r in list(self._pending.values()):
            if r.recorded:
                by_key.setdefault(r.key_id, []).append(r.reservation_id)
        if not by_key or not self.policy.available():
            return
        try:
            for key_id, rids in by_key.items():
                await self._renew(
                    keys=[self._keys(key_id)[3]],
                    args=[_clock_arg(now), self._lease_us, *rids],
                )
        except REDIS_ERRORS as exc:
            self.policy.record(exc)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="teamgpu-limits-lease-renewal"
            )

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            await self.renew_leases()

    async def close(self) -> None:
        """Stop lease renewal and close the client if this limiter owns it."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._owns_client:
            await self._client.aclose()
