"""A separate gateway process for test_redis.py: waits for the go signal, then fires its
share of requests at one Redis-backed limit and prints how many were admitted (JSON).

Usage: python redis_worker.py REDIS_URL PREFIX GO_KEY N
"""

from __future__ import annotations

import asyncio
import json
import sys

from teamgpu.limits import KeyLimits, RateLimited, RedisLimiter
from teamgpu.limits.redis_backend import connect


async def main(url: str, prefix: str, go_key: str, n: int) -> None:
    client = connect(url, timeout_s=10.0)
    limiter = RedisLimiter(client, key_prefix=prefix, owns_client=True)
    await client.ping()
    print("ready", flush=True)
    await client.blpop([go_key], timeout=30)

    async def one(key: str, limits: KeyLimits, est: int) -> bool:
        try:
            await limiter.reserve(key, limits, est)  # the Redis server's clock
        except RateLimited:
            return False
        return True

    rpm = [one("rpm", KeyLimits(rpm=30), 0) for _ in range(n)]
    tpm = [one("tpm", KeyLimits(tpm=250), 10) for _ in range(n)]
    conc = [one("conc", KeyLimits(max_concurrent=9), 1) for _ in range(n)]
    results = await asyncio.gather(*rpm, *tpm, *conc)
    await limiter.close()
    print(
        json.dumps(
            {
                "rpm": sum(results[:n]),
                "tpm": sum(results[n : 2 * n]),
                "conc": sum(results[2 * n :]),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
