"""The failed-authentication throttle, in process and in Redis: the exact boundary, per
address (no lockout of others), IPv6 grouping, concurrency, and Redis outages."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from teamgpu.limits import (
    AuthFailureThrottle,
    LimiterUnavailable,
    MemoryAuthFailureThrottle,
    RateLimited,
    RedisAuthFailureThrottle,
    client_key,
    make_auth_failure_throttle,
)
from teamgpu.limits.redis_backend import connect

from .conftest import REDIS_URL, T0, _delete_prefix, closed_port_url, services


@pytest.fixture(params=["memory", pytest.param("redis", marks=services)])
async def throttle(request: pytest.FixtureRequest) -> AsyncIterator[AuthFailureThrottle]:
    if request.param == "memory":
        yield MemoryAuthFailureThrottle(max_failures_per_minute=10)
        return
    client = connect(REDIS_URL, timeout_s=5.0)
    await client.ping()
    p = f"teamgpu:test:{uuid.uuid4().hex}"
    t = RedisAuthFailureThrottle(client, max_failures_per_minute=10, key_prefix=p)
    yield t
    await t.close()
    await _delete_prefix(client, p)
    await client.aclose()


async def test_tenth_failure_blocks_with_exact_retry_after(throttle: AuthFailureThrottle) -> None:
    for i in range(9):
        await throttle.check("203.0.113.7", now=T0 + i)
        await throttle.record_failure("203.0.113.7", now=T0 + i)
    await throttle.check("203.0.113.7", now=T0 + 9)  # 9 failures: still allowed
    await throttle.record_failure("203.0.113.7", now=T0 + 9)
    with pytest.raises(RateLimited) as info:
        await throttle.check("203.0.113.7", now=T0 + 9.5)
    exc = info.value
    assert (exc.limit, exc.status, exc.retry_after_s) == ("auth_failures", 429, 51)
    assert exc.headers["Retry-After"] == "51"
    with pytest.raises(RateLimited):
        await throttle.check("203.0.113.7", now=T0 + 59.999)
    await throttle.check("203.0.113.7", now=T0 + 60)  # the first failure has left


async def test_one_address_cannot_lock_out_another(throttle: AuthFailureThrottle) -> None:
    for _ in range(50):
        await throttle.record_failure("198.51.100.66", now=T0)
    with pytest.raises(RateLimited):
        await throttle.check("198.51.100.66", now=T0)
    await throttle.check("198.51.100.67", now=T0)
    await throttle.check("2001:db8::1", now=T0)


async def test_ipv6_counts_per_64(throttle: AuthFailureThrottle) -> None:
    for i in range(10):
        await throttle.record_failure(f"2001:db8:0:0::{i + 1:x}", now=T0)
    with pytest.raises(RateLimited):
        await throttle.check("2001:db8::ffff", now=T0)  # same /64
    await throttle.check("2001:db8:0:1::1", now=T0)  # the next /64


async def test_concurrent_failures_all_count(throttle: AuthFailureThrottle) -> None:
    await asyncio.gather(*(throttle.record_failure("192.0.2.1", now=T0) for _ in range(50)))
    with pytest.raises(RateLimited) as info:
        await throttle.check("192.0.2.1", now=T0 + 1)
    assert info.value.retry_after_s == 59


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:DB8:0:0:1234::1", "2001:db8::/64"),
        ("testclient", "testclient"),
    ],
)
def test_client_key(addr: str, key: str) -> None:
    assert client_key(addr) == key


async def test_memory_throttle_forgets_old_addresses() -> None:
    t = MemoryAuthFailureThrottle(max_failures_per_minute=3)
    for i in range(1000):
        await t.record_failure(f"10.0.{i // 256}.{i % 256}", now=T0)
    for i in range(100):  # the table reaches its sweep size; the first 1000 have left
        await t.record_failure(f"10.1.0.{i}", now=T0 + 61)
    assert len(t._logs) == 100


def test_throttle_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError, match="max_failures_per_minute must be >= 1"):
        MemoryAuthFailureThrottle(0)


@services
async def test_redis_throttle_down_open_and_closed() -> None:
    opened = make_auth_failure_throttle(closed_port_url(), on_redis_error="open")
    closed = make_auth_failure_throttle(closed_port_url(), on_redis_error="closed")
    try:
        await opened.record_failure("192.0.2.1")  # never raises
        await opened.check("192.0.2.1")  # not throttled while Redis is down
        assert opened.redis_errors_total == 1
        await closed.record_failure("192.0.2.1")
        with pytest.raises(LimiterUnavailable) as info:
            await closed.check("192.0.2.1")
        assert info.value.status == 503
    finally:
        await opened.close()
        await closed.close()


async def test_make_auth_failure_throttle() -> None:
    mem = make_auth_failure_throttle(None, max_failures_per_minute=5)
    assert isinstance(mem, MemoryAuthFailureThrottle)
    assert mem.max_failures == 5
    red = make_auth_failure_throttle(REDIS_URL)
    assert isinstance(red, RedisAuthFailureThrottle)
    await mem.close()
    await red.close()
