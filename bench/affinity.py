"""Prefix-affinity routing on two real vLLM engines: ``affinity`` versus ``least_loaded``.

    .venv/bin/python bench/affinity.py [--conversations 8] [--turns 6] [--concurrency 4]
                                       [--engine-urls URL_A,URL_B] [--modes affinity,least_loaded]

One run starts two CPU vLLM engines with the demo model (``--dtype float32 --enforce-eager
--max-num-seqs 8 --max-model-len 2048``, ``VLLM_CPU_KVCACHE_SPACE=1``, each engine's
threads pinned to a core of its own with ``VLLM_CPU_OMP_THREADS_BIND``; prefix caching is on
by default in vLLM 0.32 V1 for a decoder model, and the run checks the engine log says so),
then for each mode starts the gateway, ``teamgpu serve --backend A --backend B`` with
``TEAMGPU_ROUTING=<mode>``, runs the same multi-turn chat workload through it and stops it.
Everything started here is stopped at the end, as process groups.

Workload: ``--conversations`` conversations, each with a distinct system prompt of about
``--system-tokens`` tokens (random one-token words) and ``--turns`` short user turns; each
answer (``max_tokens`` ``--max-tokens``, temperature 0, streamed) goes back into the
history before the next turn. ``--concurrency`` conversations run at once. Each mode gets
system prompts of its own and both engines' prefix caches are reset before it (vLLM's
dev-mode ``POST /reset_prefix_cache``), so no mode profits from the one before.

Reported per mode: the prefix cache hit rate (deltas of ``vllm:prefix_cache_hits_total`` /
``vllm:prefix_cache_queries_total``, both in tokens, both engines summed), client-side TTFT
p50/p95 of turns 2+ (and of turn 1, where no cache can help), requests per backend (from the
engines' ``vllm:request_success_total``), and from the gateway's audit log how many
conversations stayed on one backend and how often a turn changed backend. Prints a markdown
table and writes ``affinity.md`` and ``affinity.json`` to ``--out`` (default bench/out/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from teamgpu.engine.supervisor import EngineSpec, EngineSupervisor, free_port

MODEL = "SmolLM2-135M-Instruct"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "teamgpu"
ENGINE_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-num-seqs", "8",
               "--max-model-len", "2048")
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
            "vllm:request_success_total", "vllm:prompt_tokens_total",
            "vllm:num_requests_running", "vllm:num_requests_waiting")
# short English words, about one token each with the leading space
WORDS = (  # noqa: SIM905
    "the and for are but not you all any can her was one our out day get has him his how "
    "man new now old see two way who boy did its let put say she too use cat dog red big "
    "sun run sea sky car box cup hat map pen top bed bus egg fan fox hen jam key leg net "
    "owl pig rat toy van web yes zoo art bag bat cow ear eye fig gum ice ink job kid lab "
    "mud nut oak pan pot rug saw tin tub war wax win yak"
).split()


def now() -> float:
    return time.monotonic()


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]; nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def parse_metrics(text: str) -> dict[str, float]:
    """The counters and gauges in ``COUNTERS``, summed over their label sets."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            with contextlib.suppress(ValueError):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


# ------------------------------------------------------------------ processes


class Stack:
    """Two engines, and one gateway at a time; ``close`` stops whatever was started."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.out = Path(args.out)
        self.engine_urls: list[str] = [u.rstrip("/") for u in args.engine_urls.split(",")] \
            if args.engine_urls else []
        self.engine_logs: list[Path] = []
        self.gateway_url = ""
        self.keys: dict[str, str] = {}
        self._supervisors: list[EngineSupervisor] = []
        self._gateway: asyncio.subprocess.Process | None = None
        self._gateway_log: Any = None

    async def start_engines(self) -> None:
        if self.engine_urls:
            return
        python = Path((CACHE / "engine-python").read_text().strip())
        model = CACHE / "models" / MODEL
        for i in range(2):
            log = self.out / f"affinity-engine-{'ab'[i]}.log"
            log.unlink(missing_ok=True)
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1))}
            spec = EngineSpec(python=python, model=str(model), served_model_name=MODEL,
                              port=free_port(), args=ENGINE_ARGS, env=env, log_path=log)
            self._supervisors.append(EngineSupervisor(spec, start_timeout_s=900.0))
            self.engine_logs.append(log)
        print(f"starting two vLLM engines ({' '.join(ENGINE_ARGS)}), logs "
              f"{', '.join(map(str, self.engine_logs))}", flush=True)
        t0 = now()
        await asyncio.gather(*(s.start() for s in self._supervisors))
        self.engine_urls = [s.base_url for s in self._supervisors]
        print(f"engines ready on {', '.join(self.engine_urls)} after {now() - t0:.0f} s",
              flush=True)

    def prefix_caching_logged(self) -> list[bool | None]:
        """Per engine, what its log says of ``enable_prefix_caching`` (None: no log)."""
        out: list[bool | None] = []
        for log in self.engine_logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out.append(True if "enable_prefix_caching=True" in text
                       else False if "enable_prefix_caching=False" in text else None)
        return out

    def _teamgpu(self) -> list[str]:
        exe = Path(sys.executable).parent / "teamgpu"
        return [str(exe)] if exe.exists() else [shutil.which("teamgpu") or "teamgpu"]

    def _env(self, routing: str = "") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMGPU_")}
        env["TEAMGPU_LOG_LEVEL"] = "warning"
        if routing:
            env["TEAMGPU_ROUTING"] = routing
        return env

    def make_keys(self, users: list[str]) -> None:
        for user in users:
            out = subprocess.run(
                [*self._teamgpu(), "keys", "create", user, "--json", "--data-dir",
                 str(self.work / "data")],
                check=True, capture_output=True, text=True, cwd=self.work, env=self._env(),
            ).stdout
            self.keys[user] = json.loads(out)["key"]

    async def start_gateway(self, routing: str) -> None:
        port = free_port()
        self._gateway_log = (self.out / f"affinity-gateway-{routing}.log").open("wb")
        argv = [*self._teamgpu(), "serve"]
        for url in self.engine_urls:
            argv += ["--backend", url]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--data-dir",
                 str(self.work / "data"), "--max-inflight", "8"]
        self._gateway = await asyncio.create_subprocess_exec(
            *argv, cwd=self.work, env=self._env(routing), stdin=asyncio.subprocess.DEVNULL,
            stdout=self._gateway_log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.gateway_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as c:
            deadline = now() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await c.get(f"{self.gateway_url}/readyz")
                    if r.status_code == 200 and all(b["up"] for b in r.json()["backends"]):
                        return
                if now() > deadline or self._gateway.returncode is not None:
                    raise RuntimeError(f"gateway did not become ready; see {self.out}")
                await asyncio.sleep(0.2)

    async def stop_gateway(self) -> None:
        if self._gateway is not None and self._gateway.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._gateway.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._gateway.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._gateway.pid, signal.SIGKILL)
                await self._gateway.wait()
        self._gateway = None
        if self._gateway_log is not None:
            self._gateway_log.close()
            self._gateway_log = None

    def audit_rows(self, after_id: int = 0) -> list[dict[str, Any]]:
        """The gateway's audit rows with ``id > after_id`` (its SQLite store, read-only)."""
        path = self.work / "data" / "teamgpu.db"
        if not path.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            cur = conn.execute('SELECT id, "user", endpoint, status, backend, ttft_ms '
                               "FROM usage WHERE id > ? ORDER BY id", (after_id,))
            return [dict(r) for r in cur.fetchall()]

    async def close(self) -> None:
        await self.stop_gateway()
        await asyncio.gather(*(s.stop(timeout_s=20.0) for s in self._supervisors))


# ------------------------------------------------------------------ the workload


@dataclass
class Turn:
    conversation: int
    turn: int  # 1-based
    sent: float
    first: float | None = None
    end: float | None = None
    status: int = 0
    error: str = ""
    prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.first is not None

    @property
    def ttft(self) -> float:
        return self.first - self.sent if self.first is not None else math.nan


async def chat_turn(client: httpx.AsyncClient, base: str, key: str,
                    messages: list[dict[str, str]], max_tokens: int, rec: Turn) -> str:
    """Stream one chat completion through the gateway; returns the answer's text."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    text: list[str] = []
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = (await r.aread()).decode("utf-8", "replace")[:300]
                return ""
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line[6:] == "[DONE]":
                    break
                obj = json.loads(line[6:])
                if obj.get("error"):
                    rec.error = json.dumps(obj["error"])[:300]
                if obj.get("usage"):
                    rec.prompt_tokens = int(obj["usage"].get("prompt_tokens") or 0)
                for choice in obj.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if rec.first is None:
                            rec.first = now()
                        text.append(piece)
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.end = now()
    return "".join(text)


def system_prompt(rng: random.Random, n_words: int, index: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return f"You are assistant number {index}. Keep these notes in mind: {words}."


async def run_mode(args: argparse.Namespace, stack: Stack, client: httpx.AsyncClient,
                   mode: str, seed: int) -> dict[str, Any]:
    for url in stack.engine_urls:  # a cold start for every mode
        reset = await client.post(f"{url}/reset_prefix_cache")
        if reset.status_code != 200 or not reset.json().get("success"):
            print(f"warning: {url}/reset_prefix_cache answered {reset.status_code} "
                  f"{reset.text[:100]}"
                  " (an engine not in dev mode?); the mode's own prompts still differ",
                  flush=True)
    await stack.start_gateway(mode)
    last_row = max((r["id"] for r in stack.audit_rows()), default=0)
    before = [parse_metrics((await client.get(f"{u}/metrics")).text) for u in stack.engine_urls]
    rng = random.Random(seed)
    systems = [system_prompt(rng, args.system_tokens, i) for i in range(args.conversations)]
    turns: list[Turn] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def conversation(i: int) -> None:
        async with gate:
            messages = [{"role": "system", "content": systems[i]}]
            for t in range(1, args.turns + 1):
                a, b = rng.choice(WORDS), rng.choice(WORDS)
                messages.append({"role": "user",
                                 "content": f"Turn {t}: say one thing about {a} and {b}."})
                rec = Turn(conversation=i, turn=t, sent=now())
                turns.append(rec)
                answer = await chat_turn(client, stack.gateway_url, stack.keys[f"conv{i}"],
                                         messages, args.max_tokens, rec)
                messages.append({"role": "assistant", "content": answer})

    t0 = now()
    await asyncio.gather(*(conversation(i) for i in range(args.conversations)))
    duration = now() - t0
    for url in stack.engine_urls:  # finished requests are counted when they leave
        for _ in range(40):
            m = parse_metrics((await client.get(f"{url}/metrics")).text)
            if not m["vllm:num_requests_running"] and not m["vllm:num_requests_waiting"]:
                break
            await asyncio.sleep(0.25)
    after = [parse_metrics((await client.get(f"{u}/metrics")).text) for u in stack.engine_urls]
    await asyncio.sleep(1.0)  # the audit writer batches its writes
    rows = [r for r in stack.audit_rows(last_row) if r["endpoint"] == "chat/completions"]
    await stack.stop_gateway()

    def delta(name: str, i: int) -> float:
        return after[i][name] - before[i][name]

    n = len(stack.engine_urls)
    hits = sum(delta("vllm:prefix_cache_hits_total", i) for i in range(n))
    queries = sum(delta("vllm:prefix_cache_queries_total", i) for i in range(n))
    per_conv: dict[str, list[str]] = {}
    for row in rows:
        per_conv.setdefault(row["user"], []).append(row["backend"] or "")
    switches = sum(sum(1 for x, y in itertools.pairwise(bs) if x != y)
                   for bs in per_conv.values())
    ok = [t for t in turns if t.ok]
    later = [t.ttft for t in ok if t.turn >= 2]
    return {
        "mode": mode, "duration_s": duration,
        "hits_tokens": hits, "queries_tokens": queries,
        "hit_rate": hits / queries if queries else math.nan,
        "requests_per_engine": [delta("vllm:request_success_total", i) for i in range(n)],
        "prompt_tokens_per_engine": [delta("vllm:prompt_tokens_total", i) for i in range(n)],
        "ttft_later_p50_s": pct(later, 0.5), "ttft_later_p95_s": pct(later, 0.95),
        "ttft_first_p50_s": pct([t.ttft for t in ok if t.turn == 1], 0.5),
        "turns_ok": len(ok), "errors": len(turns) - len(ok),
        "first_error": next((t.error for t in turns if t.error), ""),
        "conversations_on_one_backend": sum(1 for bs in per_conv.values() if len(set(bs)) == 1),
        "conversations": len(per_conv), "backend_switches": switches,
        "mean_prompt_tokens": sum(t.prompt_tokens for t in ok) / len(ok) if ok else math.nan,
        "turns": [asdict(t) for t in turns],
    }


def report(args: argparse.Namespace, stack: Stack, results: list[dict[str, Any]],
           cmd: str) -> str:
    def f(x: float, nd: int = 2) -> str:
        return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.{nd}f}"

    lines = [
        (f"Two vLLM 0.32 CPU engines (demo model {MODEL}, `{' '.join(ENGINE_ARGS)}`, "
        "1 GiB KV cache each, one core each) behind one teamgpu gateway. "
        f"{args.conversations} conversations x {args.turns} turns, system prompt about "
        f"{args.system_tokens} tokens each, `max_tokens` {args.max_tokens}, "
        f"{args.concurrency} conversations at once. Prefix caching on: "
        f"{stack.prefix_caching_logged() or 'not checked (engines given)'}."),
        "",
        ("| routing | prefix cache hit rate | hit / queried tokens | TTFT p50, turns 2+ | "
        "TTFT p95, turns 2+ | TTFT p50, turn 1 | requests A / B | conversations on one "
        "backend | backend switches | errors | wall time |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        reqs = " / ".join(f"{x:.0f}" for x in r["requests_per_engine"])
        lines.append(
            f"| {r['mode']} | {100 * r['hit_rate']:.1f} % | {r['hits_tokens']:.0f} / "
            f"{r['queries_tokens']:.0f} | {f(r['ttft_later_p50_s'], 3)} s | "
            f"{f(r['ttft_later_p95_s'], 3)} s | {f(r['ttft_first_p50_s'], 3)} s | {reqs} | "
            f"{r['conversations_on_one_backend']} / {r['conversations']} | "
            f"{r['backend_switches']} | {r['errors']} | {r['duration_s']:.0f} s |")
    lines += ["", "Mean prompt tokens per turn: "
              + ", ".join(f"{r['mode']} {f(r['mean_prompt_tokens'], 0)}" for r in results)
              + f". Command: `{cmd}`"]
    errors = [r["first_error"] for r in results if r["first_error"]]
    if errors:
        lines.append(f"First error: {errors[0]}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- once, before anything runs
    cmd = " ".join([".venv/bin/python bench/affinity.py", *sys.argv[1:]])
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="teamgpu-affinity-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            await stack.start_engines()
            stack.make_keys([f"conv{i}" for i in range(args.conversations)])
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
            async with httpx.AsyncClient(trust_env=False, limits=limits,
                                         timeout=httpx.Timeout(600.0, connect=10.0)) as client:
                for url in stack.engine_urls:  # warm each engine up once, directly
                    await client.post(f"{url}/v1/chat/completions", json={
                        "model": MODEL, "max_tokens": 8, "temperature": 0,
                        "messages": [{"role": "user", "content": "Hello"}]})
                results = []
                for k, mode in enumerate(modes):
                    results.append(await run_mode(args, stack, client, mode,
                                                  args.seed + 1000 * k))
                    r = results[-1]
                    print(f"{mode}: hit rate {r['hit_rate']:.3f}, TTFT turns 2+ p50 "
                          f"{r['ttft_later_p50_s']:.3f} s, requests "
                          f"{r['requests_per_engine']}, errors {r['errors']}", flush=True)
            md = report(args, stack, results, cmd)
        finally:
            await stack.close()
    print("\n" + md)
    (out / "affinity.md").write_text(md + "\n")
    (out / "affinity.json").write_text(json.dumps(
        {"args": vars(args), "engine_args": ENGINE_ARGS, "results": results}, indent=1,
        default=str))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--engine-urls", default=None,
                    help="two vLLM servers that already run (dev mode, flags above), comma "
                         "separated, instead of starting them")
    ap.add_argument("--modes", default="affinity,least_loaded",
                    help="routing settings to compare, in this order")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4, help="conversations at once")
    ap.add_argument("--system-tokens", type=int, default=600,
                    help="words in each system prompt (about one token each)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    return ap.parse_args(argv)


def main() -> int:
    return asyncio.run(run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
