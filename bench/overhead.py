"""What the gateway adds: the same load direct to a fast fake backend and through the gateway.

    .venv/bin/python bench/overhead.py [--rate 200] [--seconds 10] [--json]
        [--key-limits [rpm,tpm,max-concurrent,daily-tokens]] [--redis-url URL]
        [--apis responses,messages]

Three processes on this machine: the fake backend (tests.support.fake_backend), the
gateway (``teamgpu serve``), and this load generator. For each of non-streaming and
streaming chat completions it sends an open-loop load at ``--rate`` requests/s (fixed
schedule, so a slow server cannot slow the load down) first direct, then through the
gateway, and prints latency p50/p99 both ways and the difference: the latency the gateway
adds, with the gateway process's CPU time per request (user + system, from ``/proc``: a
steadier figure than latency on a shared machine whose speed drifts between runs). Then
it finds the highest request rate sustained with 64 concurrent clients, both ways.
Targets (issue 2): added p50 <= 1 ms and p99 <= 5 ms at 200 requests/s.

``--key-limits`` gives the bench key limits (all four, or the ones named), each far too
high to refuse, so every request takes the whole limit check (with ``tpm`` or
``daily-tokens``, a ``/tokenize`` call to the backend too); ``--redis-url`` keeps the
limit state in Redis (under a prefix of its own, deleted afterwards). Compare with a run
without them for what the limit check adds (issue 4).

``--apis responses,messages`` adds streamed ``/v1/responses`` (OpenAI Responses) and
``/v1/messages`` (Anthropic Messages) phases with the same 4 tokens (issue 11: their added
latency and gateway CPU per request within 10 % of streamed chat's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


LIMIT_FLAGS = ("rpm", "tpm", "max-concurrent", "daily-tokens")
NEVER_REFUSES = 10**9

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 16, "fake": {"tokens": 4}}
# the streamed requests of the agent APIs (issue 11): the same 4 tokens, their own events
API_BODIES: dict[str, tuple[str, dict[str, object]]] = {
    "responses": ("/v1/responses", {"model": "fake-model", "input": "hello there",
                                    "max_output_tokens": 16, "stream": True,
                                    "fake": {"tokens": 4}}),
    "messages": ("/v1/messages", {"model": "fake-model", "max_tokens": 16, "stream": True,
                                  "messages": [{"role": "user", "content": "hello there"}],
                                  "fake": {"tokens": 4}}),
}


async def one(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
              stream: bool, body: dict[str, object] | None = None) -> float:
    t0 = time.perf_counter()
    if body is None:
        body = {**BODY, "stream": True} if stream else BODY
    async with session.post(url, json=body, headers=headers) as r:
        if stream:
            async for _ in r.content.iter_any():
                pass
        else:
            await r.read()
        assert r.status == 200, r.status
    return (time.perf_counter() - t0) * 1000.0


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))


async def open_loop(url: str, headers: dict[str, str], rate: float, seconds: float,
                    stream: bool, body: dict[str, object] | None = None
                    ) -> tuple[list[float], int]:
    async with _session(512) as session:
        for _ in range(50):  # warm up connections and code paths
            await one(session, url, headers, stream, body)
        n = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        late = 0
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1
            tasks.append(asyncio.ensure_future(one(session, url, headers, stream, body)))
        lat = await asyncio.gather(*tasks)
    return list(lat), late


async def closed_loop(url: str, headers: dict[str, str], conc: int, seconds: float) -> float:
    async with _session(conc) as session:
        done = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await one(session, url, headers, False)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s of the open-loop load")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    ap.add_argument("--rounds", type=int, default=4,
                    help="alternating direct/gateway phases the duration is split into")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--key-limits", nargs="?", const=",".join(LIMIT_FLAGS), default="",
                    help="give the key these limits, too high to refuse (default: all four)")
    ap.add_argument("--redis-url", default=None, help="keep the limit state in this Redis")
    ap.add_argument("--apis", default="",
                    help="also streamed requests of these APIs: responses,messages")
    a = ap.parse_args()
    apis = [x for x in a.apis.split(",") if x]
    if set(apis) - set(API_BODIES):
        ap.error(f"--apis takes some of {','.join(API_BODIES)}")
    limits = [x for x in a.key_limits.split(",") if x]
    if set(limits) - set(LIMIT_FLAGS):
        ap.error(f"--key-limits takes some of {','.join(LIMIT_FLAGS)}")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    data_dir = tempfile.mkdtemp(prefix="teamgpu-bench-")
    fport, gport = free_port(), free_port()
    env = {**os.environ, "TEAMGPU_DATA_DIR": data_dir}
    redis_prefix = f"teamgpu:bench:{os.getpid()}:{time.time_ns()}"
    if a.redis_url:
        env["TEAMGPU_REDIS_KEY_PREFIX"] = redis_prefix
    procs = [subprocess.Popen([PY, "-m", "tests.support.fake_backend", "--port", str(fport)],
                              env=env, cwd=ROOT)]
    try:
        wait_http(f"http://127.0.0.1:{fport}/health")
        limit_args = [x for f in limits for x in (f"--{f}", str(NEVER_REFUSES))]
        key = json.loads(subprocess.check_output(
            [str(BIN / "teamgpu"), "keys", "create", "bench", "--json", *limit_args],
            env=env))["key"]
        redis_args = ["--redis-url", a.redis_url] if a.redis_url else []
        procs.append(subprocess.Popen(
            [str(BIN / "teamgpu"), "serve", "--backend", f"http://127.0.0.1:{fport}",
             "--port", str(gport), "--host", "127.0.0.1", *redis_args],
            env={**env, "TEAMGPU_LOG_LEVEL": "warning"}, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{gport}/readyz")
        direct = f"http://127.0.0.1:{fport}/v1/chat/completions"
        via = f"http://127.0.0.1:{gport}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
        results: dict[str, dict[str, float]] = {}
        phases: list[tuple[str, bool, str, dict[str, object] | None]] = [
            ("non-streaming", False, "/v1/chat/completions", None),
            ("streaming", True, "/v1/chat/completions", None),
            *((f"streaming {api}", True, *API_BODIES[api]) for api in apis)]
        for name, stream, path, body in phases:
            d_url, g_url = f"http://127.0.0.1:{fport}{path}", f"http://127.0.0.1:{gport}{path}"
            # alternate direct and gateway phases so that drift of the shared machine
            # (other processes, CPU frequency) affects both sides alike
            d: list[float] = []
            g: list[float] = []
            late_d = late_g = 0
            gw_cpu = 0.0
            for _ in range(a.rounds):
                lat, late = asyncio.run(open_loop(d_url, {}, a.rate, a.seconds / a.rounds,
                                                  stream, body))
                d += lat
                late_d += late
                c0 = cpu_s(procs[1].pid)
                lat, late = asyncio.run(open_loop(g_url, auth, a.rate, a.seconds / a.rounds,
                                                  stream, body))
                gw_cpu += cpu_s(procs[1].pid) - c0
                g += lat
                late_g += late
            results[name] = {
                "direct_p50_ms": pct(d, 50), "direct_p99_ms": pct(d, 99),
                "gateway_p50_ms": pct(g, 50), "gateway_p99_ms": pct(g, 99),
                "added_p50_ms": pct(g, 50) - pct(d, 50), "added_p99_ms": pct(g, 99) - pct(d, 99),
                "requests": len(g), "late_sends": late_d + late_g,
                "gateway_cpu_ms_per_request": gw_cpu * 1000 / max(1, len(g)),
                "direct_mean_ms": statistics.fmean(d), "gateway_mean_ms": statistics.fmean(g),
            }
        rate_d = asyncio.run(closed_loop(direct, {}, 64, a.seconds / 2))
        rate_g = asyncio.run(closed_loop(via, auth, 64, a.seconds / 2))
        results["max_rate"] = {"direct_rps": rate_d, "gateway_rps": rate_g}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        if a.redis_url:
            import redis

            with redis.Redis.from_url(a.redis_url) as r:
                stale = list(r.scan_iter(match=f"{redis_prefix}*", count=1000))
                if stale:
                    r.delete(*stale)
    setup = {"key_limits": limits, "limit_state": "redis" if a.redis_url else "in process"}
    if a.json:
        print(json.dumps({"rate": a.rate, "seconds": a.seconds, **setup, **results}, indent=2))
        return
    print(f"\nGateway overhead at {a.rate:g} requests/s, {a.seconds:g} s per phase "
          f"(fake backend, 4 tokens per answer; {os.cpu_count()} cores shared by all three)")
    print(f"Key limits: {', '.join(limits) or 'none'}; limit state: {setup['limit_state']}\n")
    print("| requests | direct p50 | direct p99 | gateway p50 | gateway p99 | added p50 "
          "| added p99 | gateway CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in [k for k in results if k != "max_rate"]:
        r = results[name]
        print(f"| {name} | {r['direct_p50_ms']:.2f} ms | {r['direct_p99_ms']:.2f} ms | "
              f"{r['gateway_p50_ms']:.2f} ms | {r['gateway_p99_ms']:.2f} ms | "
              f"**{r['added_p50_ms']:.2f} ms** | **{r['added_p99_ms']:.2f} ms** | "
              f"{r['gateway_cpu_ms_per_request']:.2f} ms/request |")
    m = results["max_rate"]
    print(f"\nHighest rate sustained, 64 concurrent clients, non-streaming: direct "
          f"{m['direct_rps']:.0f} requests/s, through the gateway "
          f"{m['gateway_rps']:.0f} requests/s")


if __name__ == "__main__":
    main()
