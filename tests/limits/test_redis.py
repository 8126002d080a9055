"""The Redis limiter beyond the shared suite: several gateways sharing one limit (two
instances, two OS processes), the same answers as the in-process limiter, leases of
crashed replicas, script loading, the key layout, and Redis outages (open and closed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from teamgpu.limits import (
    KeyLimits,
    LimiterUnavailable,
    LimitStatus,
    MemoryLimiter,
    RateLimited,
    RedisLimiter,
    RequestTooLarge,
    Reservation,
    lua,
    make_limiter,
)
from teamgpu.limits.base import Limiter
from teamgpu.limits.redis_backend import connect

from .conftest import MIDNIGHT, REDIS_URL, T0, closed_port_url

pytestmark = pytest.mark.services

REPO = Path(__file__).resolve().parents[2]


async def _admitted(lim: Limiter, key: str, limits: KeyLimits, est: int, now: float | None) -> bool:
    try:
        await lim.reserve(key, limits, est, now=now)
    except RateLimited:
        return False
    return True


# --- several gateways -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "est", "expected"),
    [
        (KeyLimits(rpm=25), 0, 25),
        (KeyLimits(tpm=1000), 30, 33),
        (KeyLimits(max_concurrent=11), 0, 11),
        (KeyLimits(daily_tokens=300), 7, 42),
    ],
)
async def test_two_gateways_admit_exactly_what_one_would(
    prefix: str, limits: KeyLimits, est: int, expected: int
) -> None:
    # 60 connections opened at once: on a loaded 2-core machine one connect took longer
    # than the 0.5 s default and the outage policy (fail open) admitted it; what this
    # test checks is the shared count, so connects get time (outages: tests below)
    a = RedisLimiter(connect(REDIS_URL, timeout_s=10), key_prefix=prefix, owns_client=True)
    b = RedisLimiter(connect(REDIS_URL, timeout_s=10), key_prefix=prefix, owns_client=True)
    try:
        calls = [_admitted(a if i % 2 else b, "k", limits, est, T0) for i in range(60)]
        results = await asyncio.gather(*calls)
        assert a.redis_errors_total == b.redis_errors_total == 0
        assert sum(results) == expected
        assert sum(await asyncio.gather(_admitted(a, "k", limits, est, T0))) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_burst_larger_than_the_pool_waits_instead_of_failing_open(prefix: str) -> None:
    """More concurrent calls than pooled connections are load, not an outage."""
    lim = RedisLimiter(connect(REDIS_URL, max_connections=4), key_prefix=prefix, owns_client=True)
    try:
        results = await asyncio.gather(
            *(_admitted(lim, "k", KeyLimits(rpm=20), 0, T0) for _ in range(200))
        )
        assert sum(results) == 20
        assert lim.redis_errors_total == 0
    finally:
        await lim.close()


def test_two_gateway_processes_share_one_limit(prefix: str) -> None:
    """Two OS processes, 40 requests each at once, on the Redis server's clock."""
    go_key = f"{prefix}:go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("redis_worker.py")),
        REDIS_URL,
        prefix,
        go_key,
        "40",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for _ in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        import redis

        with redis.Redis.from_url(REDIS_URL) as r:
            r.rpush(go_key, "go", "go")
        outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert sum(o["rpm"] for o in outs) == 30
    assert sum(o["tpm"] for o in outs) == 25
    assert sum(o["conc"] for o in outs) == 9


async def _differential(seed: int, prefix: str) -> dict[str, int]:
    rng = random.Random(seed)
    mem = MemoryLimiter()
    red = RedisLimiter(
        connect(REDIS_URL), key_prefix=f"{prefix}:{seed}", owns_client=True, lease_s=1e6
    )
    held: list[tuple[Reservation, Reservation]] = []
    refusals: dict[str, int] = {}
    now = MIDNIGHT - 200  # crosses a UTC midnight
    try:
        for _ in range(400):
            now += rng.choice([0, 0, 0.25, 1, 3, 7.5])
            key = rng.choice(["a", "b"])
            limits = KeyLimits(rpm=8, tpm=400, max_concurrent=4, daily_tokens=900)
            op = rng.random()
            if op < 0.55:
                est = rng.randint(0, 150)
                outs: list[tuple[Reservation, LimitStatus] | tuple[object, ...]] = []
                for lim in (mem, red):
                    try:
                        outs.append(await lim.reserve(key, limits, est, now=now))
                    except RateLimited as exc:
                        outs.append((exc.limit, exc.retry_after_s, exc.message, exc.headers))
                m, r = outs
                if isinstance(m[0], Reservation) and isinstance(r[0], Reservation):
                    assert m[1] == r[1]
                    held.append((m[0], r[0]))
                else:
                    assert m == r
                    refusals[str(m[0])] = refusals.get(str(m[0]), 0) + 1
            elif op < 0.9 and held:
                m_res, r_res = held.pop(rng.randrange(len(held)))
                actual = rng.randint(0, 2 * m_res.tokens + 5)
                await mem.settle(m_res, actual, now=now)
                await red.settle(r_res, actual, now=now)
            else:
                s_m = await mem.status(key, limits, now=now)
                s_r = await red.status(key, limits, now=now)
                assert s_m == s_r
    finally:
        await red.close()
    return refusals


async def test_same_answers_as_the_in_process_limiter(prefix: str) -> None:
    """Random workloads (reserve, settle smaller or larger, status; across a UTC
    midnight) give identical admissions, refusals, messages, Retry-After and headers in
    process and in Redis."""
    seen: set[str] = set()
    for seed in range(6):
        seen |= set(await _differential(seed, prefix))
    assert seen == {"requests", "tokens", "concurrent", "daily_tokens"}


# --- leases -----------------------------------------------------------------------------


async def test_slots_of_a_crashed_gateway_are_freed_when_their_lease_expires(prefix: str) -> None:
    limits = KeyLimits(max_concurrent=2)
    crashed = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=30)
    alive = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=30)
    try:
        await crashed.reserve("k", limits, 0, now=T0)
        await crashed.reserve("k", limits, 0, now=T0)
        await crashed.close()  # dies without settling
        with pytest.raises(RateLimited):
            await alive.reserve("k", limits, 0, now=T0 + 29.9)
        await alive.reserve("k", limits, 0, now=T0 + 30)
    finally:
        await alive.close()


async def test_a_live_gateway_renews_its_leases(prefix: str) -> None:
    limits = KeyLimits(max_concurrent=1)
    a = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=30)
    b = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=30)
    try:
        res, _ = await a.reserve("k", limits, 0, now=T0)
        await a.renew_leases(now=T0 + 20)  # what the background task does every lease_s / 3
        with pytest.raises(RateLimited):
            await b.reserve("k", limits, 0, now=T0 + 45)
        await a.settle(res, 0, now=T0 + 46)
        await a.renew_leases(now=T0 + 46)  # a settled slot is not brought back
        await b.reserve("k", limits, 0, now=T0 + 46)
    finally:
        await a.close()
        await b.close()


async def test_background_renewal_runs(prefix: str, redis_client: aioredis.Redis) -> None:
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=0.5)
    try:
        res, _ = await lim.reserve("k", KeyLimits(max_concurrent=1), 0)
        await asyncio.sleep(1.2)  # over two lease lifetimes: only renewal keeps the slot
        assert await redis_client.zscore(f"{prefix}:{{k}}:conc", res.reservation_id) is not None
        with pytest.raises(RateLimited):
            await lim.reserve("k", KeyLimits(max_concurrent=1), 0)
    finally:
        await lim.close()


# --- scripts, layout, clock -------------------------------------------------------------


async def test_scripts_are_reloaded_when_redis_does_not_know_them(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    """EVALSHA first; on NOSCRIPT (a restarted or flushed Redis) SCRIPT LOAD and again.
    The unknown SHA stands in for SCRIPT FLUSH, which would disturb others sharing Redis."""
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True)
    try:
        for script in (lim._reserve, lim._settle):
            script.sha = "0" * 40
        res, _ = await lim.reserve("k", KeyLimits(rpm=5), 10, now=T0)
        await lim.settle(res, 4, now=T0 + 1)
        assert lim._reserve.sha == hashlib.sha1(lua.RESERVE.encode()).hexdigest()
        assert lim._settle.sha == hashlib.sha1(lua.SETTLE.encode()).hexdigest()
        assert await redis_client.script_exists(lim._reserve.sha) == [True]
        assert (await lim.status("k", KeyLimits(rpm=5, tpm=100), now=T0 + 2)).remaining_tokens == 96
        assert lim.redis_errors_total == 0
    finally:
        await lim.close()


async def test_key_layout_and_ttls(prefix: str, redis_client: aioredis.Redis) -> None:
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True, lease_s=30)
    try:
        res, _ = await lim.reserve("key42", KeyLimits(), 17, now=T0)
        base = f"{prefix}:{{key42}}"
        keys = sorted(
            k.decode() if isinstance(k, bytes) else k
            for k in await redis_client.keys(f"{prefix}:*")
        )
        assert keys == sorted(f"{base}:{s}" for s in ("req", "tok", "toksum", "conc", "day"))
        assert await redis_client.zscore(f"{base}:req", res.reservation_id) == T0 * 1e6
        assert await redis_client.zscore(f"{base}:tok", f"{res.reservation_id}:17") == T0 * 1e6
        assert await redis_client.get(f"{base}:toksum") == b"17"
        assert await redis_client.zscore(f"{base}:conc", res.reservation_id) == (T0 + 30) * 1e6
        assert await redis_client.hgetall(f"{base}:day") == {
            b"d": str(int(T0 // 86400)).encode(),
            b"u": b"17",
        }
        for suffix, ttl_ms in (
            ("req", 61_000),
            ("tok", 61_000),
            ("toksum", 61_000),
            ("conc", 31_000),
            ("day", 172_800_000),
        ):
            assert ttl_ms - 2_000 < await redis_client.pttl(f"{base}:{suffix}") <= ttl_ms
    finally:
        await lim.close()


async def test_lost_token_sum_is_recounted(prefix: str, redis_client: aioredis.Redis) -> None:
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True)
    try:
        await lim.reserve("k", KeyLimits(tpm=100), 60, now=T0)
        await redis_client.delete(f"{prefix}:{{k}}:toksum")
        with pytest.raises(RateLimited):
            await lim.reserve("k", KeyLimits(tpm=100), 41, now=T0 + 1)
        await lim.reserve("k", KeyLimits(tpm=100), 40, now=T0 + 1)
    finally:
        await lim.close()


async def test_default_clock_is_the_redis_servers(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True)
    try:
        secs, micros = await redis_client.time()
        res, _ = await lim.reserve("k", KeyLimits(), 0)
        assert 0 <= res.admitted_at_s - (secs + micros / 1e6) < 1.0
    finally:
        await lim.close()


async def test_make_limiter() -> None:
    mem = make_limiter(None)
    assert isinstance(mem, MemoryLimiter)
    red = make_limiter(REDIS_URL)
    assert isinstance(red, RedisLimiter)
    await mem.close()
    await red.close()


# --- Redis down -------------------------------------------------------------------------


async def test_redis_down_fail_open(caplog: pytest.LogCaptureFixture) -> None:
    lim = make_limiter(closed_port_url(), on_redis_error="open")
    assert isinstance(lim, RedisLimiter)
    lim.policy.retry_interval_s = 0.0  # try Redis on every call, to count every error
    limits = KeyLimits(rpm=1, tpm=100)
    try:
        with caplog.at_level(logging.WARNING, logger="teamgpu.limits"):
            reservations = [(await lim.reserve("k", limits, 50, now=T0))[0] for _ in range(3)]
        assert all(not r.recorded for r in reservations)  # admitted beyond rpm=1: open
        assert lim.redis_errors_total == 3
        warnings = [r for r in caplog.records if r.name == "teamgpu.limits"]
        assert len(warnings) == 1  # at most one line per 30 s
        assert "fail open" in warnings[0].getMessage()
        assert await lim.status("k", limits) == LimitStatus.unknown(limits)
        await lim.settle(reservations[0], 10)  # never raises
        assert lim.redis_errors_total == 5
        with pytest.raises(RequestTooLarge):  # needs no Redis, still enforced
            await lim.reserve("k", limits, 101)
    finally:
        await lim.close()


async def test_redis_down_fail_closed() -> None:
    lim = make_limiter(closed_port_url(), on_redis_error="closed")
    assert isinstance(lim, RedisLimiter)
    try:
        with pytest.raises(LimiterUnavailable) as info:
            await lim.reserve("k", KeyLimits(rpm=1), 0, now=T0)
        exc = info.value
        assert exc.status == 503
        assert exc.headers["Retry-After"] == "5"
        assert exc.__cause__ is not None  # converted once, from the Redis error
        # the next calls within the retry interval do not wait for Redis again
        with pytest.raises(LimiterUnavailable):
            await lim.reserve("k", KeyLimits(rpm=1), 0, now=T0)
        with pytest.raises(LimiterUnavailable):
            await lim.status("k", KeyLimits(rpm=1))
        assert lim.redis_errors_total == 1
    finally:
        await lim.close()
    lim = make_limiter(closed_port_url(), on_redis_error="closed")
    assert isinstance(lim, RedisLimiter)
    try:
        res = Reservation("k", 10, "r1", int(T0 * 1e6), int(T0 // 86400))
        await lim.settle(res, 5)  # the request was served: settle never raises
        assert lim.redis_errors_total == 1
    finally:
        await lim.close()


async def test_fail_open_reservation_is_charged_when_redis_is_back(
    prefix: str, redis_client: aioredis.Redis
) -> None:
    lim = RedisLimiter(connect(REDIS_URL), key_prefix=prefix, owns_client=True)
    try:
        res = Reservation(
            key_id="k",
            tokens=50,
            reservation_id="r1",
            admitted_at_us=int(T0 * 1e6),
            day=int(T0 // 86400),
            recorded=False,
        )
        await lim.settle(res, 70, now=T0 + 1)
        status = await lim.status("k", KeyLimits(tpm=100, daily_tokens=1000), now=T0 + 2)
        assert (status.remaining_tokens, status.remaining_daily_tokens) == (30, 930)
    finally:
        await lim.close()
