"""Fixtures for the limits tests: both limiters, a real Redis at 127.0.0.1:6379 (tests
fail, not skip, when it is unreachable), a unique key prefix per test, a fixed clock."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from teamgpu.limits import Limiter, MemoryLimiter, RedisLimiter
from teamgpu.limits.redis_backend import connect

REDIS_URL = "redis://127.0.0.1:6379/0"
#: 2025-06-15 15:06:40 UTC: a fixed clock, far from midnight.
T0 = 1_750_000_000.0
#: 2025-06-16 00:00:00 UTC.
MIDNIGHT = 1_750_032_000.0

services = pytest.mark.services


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis; fails the test when Redis is down."""
    client = connect(REDIS_URL, timeout_s=5.0)
    await client.ping()
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: aioredis.Redis) -> AsyncIterator[str]:
    """A key prefix of this test only; its keys are deleted afterwards."""
    p = f"teamgpu:test:{uuid.uuid4().hex}"
    yield p
    await _delete_prefix(redis_client, p)


@pytest.fixture(params=["memory", pytest.param("redis", marks=services)])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    """Each test using it runs once in process and once against the real Redis."""
    if request.param == "memory":
        lim: Limiter = MemoryLimiter()
        yield lim
        await lim.close()
        return
    client = connect(REDIS_URL, timeout_s=5.0)
    await client.ping()
    p = f"teamgpu:test:{uuid.uuid4().hex}"
    # a lease far longer than any fake time span a test covers, like the in-process limiter
    lim = RedisLimiter(client, key_prefix=p, lease_s=10_000.0)
    yield lim
    await lim.close()
    await _delete_prefix(client, p)
    await client.aclose()


def closed_port_url() -> str:
    """A Redis URL on a local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
