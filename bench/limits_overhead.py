"""Time a limit check adds to one request: reserve + settle, in process and with Redis.

Prints a markdown table of per-request latency (p50 / p99 / mean, microseconds) and
throughput. A request also pays the failed-authentication throttle's check (before its
key is verified), timed in a row of its own. The key has all four limits set (RPM, TPM,
concurrency, daily tokens), high enough never to refuse, so every call takes the full
admission path; the one key's windows fill with every request of the run (thousands of
entries: far more than a real key holds, so the figures are an upper bound). A "refused"
row times the 429 path, which walks the window to compute Retry-After.

Usage::

    python bench/limits_overhead.py [--redis-url redis://127.0.0.1:6379/0] [-n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from teamgpu.limits import (
    AuthFailureThrottle,
    KeyLimits,
    Limiter,
    MemoryAuthFailureThrottle,
    MemoryLimiter,
    RateLimited,
    RedisAuthFailureThrottle,
    RedisLimiter,
)
from teamgpu.limits.redis_backend import connect

BIG = 10**12
LIMITS = KeyLimits(rpm=BIG, tpm=BIG, max_concurrent=BIG, daily_tokens=BIG)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def _sequential(fn: Callable[[], Awaitable[None]], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        await fn()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


async def _concurrent(
    fn: Callable[[], Awaitable[None]], n: int, width: int
) -> tuple[list[float], float]:
    out: list[float] = []
    sem = asyncio.Semaphore(width)

    async def one() -> None:
        async with sem:
            t = time.perf_counter_ns()
            await fn()
            out.append((time.perf_counter_ns() - t) / 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return out, time.perf_counter() - t0


def _reserve_settle(
    lim: Limiter, key: str, split: dict[str, list[float]] | None = None
) -> Callable[[], Awaitable[None]]:
    async def fn() -> None:
        t0 = time.perf_counter_ns()
        res, _ = await lim.reserve(key, LIMITS, 600)
        t1 = time.perf_counter_ns()
        await lim.settle(res, 250)
        if split is not None:
            split["reserve"].append((t1 - t0) / 1000)
            split["settle"].append((time.perf_counter_ns() - t1) / 1000)

    return fn


def _ping(client: aioredis.Redis) -> Callable[[], Awaitable[None]]:
    async def fn() -> None:
        await client.ping()

    return fn


def _throttle_check(throttle: AuthFailureThrottle) -> Callable[[], Awaitable[None]]:
    async def fn() -> None:
        await throttle.check("203.0.113.7")

    return fn


def _refused(lim: Limiter, key: str) -> Callable[[], Awaitable[None]]:
    async def fn() -> None:
        try:
            await lim.reserve(key, KeyLimits(rpm=BIG, tpm=1_000), 1)
        except RateLimited:
            return
        raise AssertionError("expected a refusal")

    return fn


async def main(url: str, n: int, width: int) -> None:
    rows: list[tuple[str, str, list[float], float | None]] = []

    mem = MemoryLimiter()
    split: dict[str, list[float]] = {"reserve": [], "settle": []}
    lat = await _sequential(_reserve_settle(mem, "k", split), n, 200)
    rows.append(("in process", "reserve + settle, one at a time", lat, None))
    rows.append(
        ("in process", "of which reserve (before the request)", split["reserve"][-n:], None)
    )
    rows.append(("in process", "of which settle (at the end of the answer)",
                 split["settle"][-n:], None))
    lat, wall = await _concurrent(_reserve_settle(mem, "k2"), n, width)
    rows.append(("in process", f"reserve + settle, {width} at once", lat, n / wall))
    lat = await _sequential(_throttle_check(MemoryAuthFailureThrottle()), n, 200)
    rows.append(("in process", "auth-failure throttle check (every request)", lat, None))

    prefix = f"teamgpu:bench:{uuid.uuid4().hex}"
    client = connect(url, timeout_s=5.0)
    red = RedisLimiter(client, key_prefix=prefix)
    try:
        await client.ping()
        split = {"reserve": [], "settle": []}
        lat = await _sequential(_reserve_settle(red, "k", split), n, 200)
        rows.append(("Redis", "reserve + settle, one at a time", lat, None))
        rows.append(("Redis", "of which reserve (before the request)",
                     split["reserve"][-n:], None))
        rows.append(("Redis", "of which settle (at the end of the answer)",
                     split["settle"][-n:], None))
        throttle = RedisAuthFailureThrottle(client, key_prefix=prefix)
        lat = await _sequential(_throttle_check(throttle), n, 200)
        rows.append(("Redis", "auth-failure throttle check (every request)", lat, None))
        ping = await _sequential(_ping(client), n, 200)
        rows.append(("Redis", "for scale: one PING round trip", ping, None))
        lat, wall = await _concurrent(_reserve_settle(red, "k2"), n, width)
        rows.append(("Redis", f"reserve + settle, {width} at once", lat, n / wall))
        # the 429 path: a key whose token window holds 1000 one-token entries
        fill = RedisLimiter(client, key_prefix=prefix)
        for _ in range(1000):
            await fill.reserve("k3", KeyLimits(tpm=1_000), 1)
        lat = await _sequential(_refused(red, "k3"), min(n, 2000), 50)
        rows.append(("Redis", "refused (429), 1000 entries in window", lat, None))
        await fill.close()
        assert red.redis_errors_total == 0, "Redis errors during the benchmark"
    finally:
        await red.close()
        await _cleanup(client, prefix)
        await client.aclose()

    print(f"n = {n} requests per row; one key; latency in microseconds\n")
    print("| backend | what | p50 (us) | p99 (us) | mean (us) | throughput (req/s) |")
    print("|---|---|---:|---:|---:|---:|")
    for backend, what, lat, rate in rows:
        tput = f"{rate:,.0f}" if rate is not None else f"{1e6 / statistics.mean(lat):,.0f}"
        print(
            f"| {backend} | {what} | {_pct(lat, 50):.1f} | {_pct(lat, 99):.1f} | "
            f"{statistics.mean(lat):.1f} | {tput} |"
        )


async def _cleanup(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("-n", type=int, default=5000, help="requests per row")
    ap.add_argument("--width", type=int, default=50, help="concurrent requests")
    args = ap.parse_args()
    asyncio.run(main(args.redis_url, args.n, args.width))
