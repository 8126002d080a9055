"""Fairness and priority on a real vLLM (CPU, demo model): direct versus through teamgpu.

    .venv/bin/python bench/fairness.py [--quick] [--engine-url URL] [--only flood,heavy]
    .venv/bin/python bench/fairness.py --only longflood [--devs 3,10] [--flood-s 180]
                                       [--teamgpu-seqs 19,16] [--long-modes ...]

One run starts everything itself, as process groups it kills at the end: vLLM with the
demo model (``--max-num-seqs 16 --scheduling-policy priority``, not ``--enforce-eager``,
``VLLM_CPU_KVCACHE_SPACE=1``, through ``teamgpu.engine.supervisor.EngineSupervisor``) and
the gateway (``teamgpu serve``, keys made with ``teamgpu keys create --json``). Then:

* **idle**: interactive requests one at a time, direct and through the gateway.
* **batch flood** (issue 3): one user submits ``--batch-requests`` ``low`` requests of
  ``--batch-tokens`` output tokens at once; ``--devs`` developers each send a ``high``
  request of ``--dev-tokens`` tokens every ``--dev-interval-s`` (a fixed schedule, open
  loop) until the flood is served. Three ways: direct with FIFO (no priority sent), direct
  with vLLM's ``priority`` field set by the clients, and through the gateway
  (``X-Priority``). Reported: interactive TTFT and end-to-end p50/p95, total tokens/s.
* **two heavy users**: two users keep ``--heavy-concurrency`` requests each outstanding
  in the same class for ``--heavy-duration-s``; user A's prompts are ``--heavy-ratio``
  times longer than user B's. Reported: each user's weighted service (input weight 1,
  output weight 2) per ``--window-s`` window and the largest gap, direct (FIFO) versus
  through the gateway, against the fairness bound of Sheng et al., OSDI 2024 (see
  docs/scheduler.md): ``2 * (w_in * P + w_out * O)`` for one slot and
  ``2 * (w_in * P + N * w_out * O)`` for ``N`` slots, with ``P`` and ``O`` the largest
  prompt and output.

* **long flood** (issue 10, ``--only longflood``; code in ``bench/longflood.py``): a batch
  job that lasts ``--flood-s`` (180 s: at least 5 x ``aging_s``) while ``N`` developers send
  ``high`` streamed requests on the batch flood's schedule, for each ``N`` of ``--devs``
  (``3,10`` here). The batch is ``--long-items`` completions of ``--batch-tokens`` (256)
  output tokens; by default as many as direct FIFO serves in ``--flood-s``, from a
  calibration wave (``--max-num-seqs`` of them at once) on the first engine. Ways
  (``--long-modes``, default ``fifo,vllm-priority,teamgpu``): direct FIFO (every item sent
  to vLLM at once, not streamed, no priority; the developers direct too), direct with
  vLLM's ``priority`` field (batch 2, developers 0), and through teamgpu, the batch as one
  Batch API job (``POST /v1/files`` and ``/v1/batches``, a key made with ``--max-priority
  low --default-priority low``) and the developers with ``X-Priority: high``. teamgpu runs
  once per size of ``--teamgpu-seqs`` (default ``max-num-seqs + reserved-high +
  reserved-normal`` and ``max-num-seqs``: 19,16), each on an engine of that
  ``--max-num-seqs`` with the gateway at that ``--max-inflight``, so that at 19 the batch
  class gets 16 slots, as many as direct FIFO, and interactive work the 3 extra (but see
  docs/scheduler.md: interactive requests in flight count against the batch's 16). A
  what-if way, ``capped`` (not in the default): direct with the ``priority`` field on the
  engine of each ``--teamgpu-seqs`` size, the batch client keeping exactly that size - 3
  items in flight, so that the batch always has its 16 beside interactive work. The
  direct ways run on an engine of ``--max-num-seqs``; engines run one at a time. Reported
  per way: interactive TTFT p50/p95 over the flood and per minute, end-to-end p95 and its
  ratio to idle (direct, one at a time), batch tokens/s from the first batch item's start
  to the last one's end and its ratio to direct FIFO, the gateway queue wait of
  interactive requests (audit ``queue_ms``), vLLM's own queue (``num_requests_waiting``),
  the batch's completion (its batch object). Targets, printed PASS/FAIL for each teamgpu
  size: TTFT p95 <= 0.25 s over the flood and in every minute, end-to-end p95 <= 2 x idle,
  batch tokens/s >= 98 % of direct FIFO. Writes ``fairness-longflood.md``, ``.json`` and
  ``.png`` (interactive TTFT over time, every way) to ``--out``. ``--engine-url`` does not
  apply: it starts its own engines. ``--quick`` makes it a smoke run (``--flood-s`` 30,
  64-token items).

Service is counted where the client sees it: a request's prompt tokens when its first
token arrives, each output token when it arrives. Prompts are random sequences of words
that are one token each, so prompt lengths are exact and no two prompts share a prefix
(vLLM's prefix cache stays out of the way); ``ignore_eos`` makes output lengths exact.

Prints markdown tables and writes ``fairness.md``, ``fairness.json``, ``fairness.png``
(two heavy users: cumulative weighted service per user over time) and
``fairness-flood.png`` (the flood: cumulative service per user, interactive TTFT) to
``--out`` (default bench/out/). Targets (issue 3): interactive TTFT p95 through the
gateway under the flood <= 0.5 s, end-to-end p95 <= 3x idle, gateway tokens/s >= 90% of
direct, the two users' service gap within the bound in every window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from teamgpu.engine.supervisor import EngineSpec, EngineSupervisor, free_port

MODEL = "SmolLM2-135M-Instruct"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "teamgpu"
W_IN, W_OUT = 1.0, 2.0  # the VTC weights the gateway runs with (its defaults)
# Short words; the ones the tokenizer keeps as one token (with the leading space) make the
# prompts. About 4 bytes per token, which is what the gateway's estimate assumes.
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


# ------------------------------------------------------------------ one request


@dataclass
class Rec:
    """One streamed completion as the client saw it (times: monotonic seconds)."""

    user: str
    sent: float
    prompt_tokens: int  # as generated; replaced by the server's count when it reports one
    max_tokens: int
    first: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    status: int = 0
    error: str = ""
    x_priority: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.end is not None

    @property
    def ttft(self) -> float:
        return (self.first - self.sent) if self.first is not None else math.nan

    @property
    def e2e(self) -> float:
        return (self.end - self.sent) if self.end is not None else math.nan

    def service_events(self) -> list[tuple[float, float]]:
        """``(time, weighted service)``: the prompt at the first token, then each token."""
        if self.first is None:
            return []
        n = len(self.token_times)
        per_chunk = (self.completion_tokens / n) if (self.completion_tokens and n) else 1.0
        out = [(self.first, W_IN * self.prompt_tokens)]
        out += [(t, W_OUT * per_chunk) for t in self.token_times]
        return out


async def complete(client: httpx.AsyncClient, base: str, rec: Rec, prompt: str, *,
                   key: str | None = None, header_priority: str | None = None,
                   field_priority: int | None = None) -> Rec:
    """Stream one ``/v1/completions`` request, filling ``rec`` as chunks arrive."""
    body: dict[str, Any] = {
        "model": MODEL, "prompt": prompt, "max_tokens": rec.max_tokens, "ignore_eos": True,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }
    if field_priority is not None:
        body["priority"] = field_priority
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if header_priority:
        headers["X-Priority"] = header_priority
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body,
                                 headers=headers) as r:
            rec.status = r.status_code
            rec.x_priority = r.headers.get("x-priority")
            if r.status_code != 200:
                rec.error = (await r.aread()).decode("utf-8", "replace")[:300]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
                    rec.completion_tokens = int(usage.get("completion_tokens") or 0)
                if obj.get("error"):
                    rec.error = json.dumps(obj["error"])[:300]
                for choice in obj.get("choices") or []:
                    if choice.get("text") is not None:
                        t = now()
                        if rec.first is None:
                            rec.first = t
                        rec.token_times.append(t)
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.end = now()
    return rec


# ------------------------------------------------------------------ processes


class Stack:
    """vLLM, the gateway and its keys; everything started here is stopped in ``close``."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.out = Path(args.out)
        self.engine_url = (args.engine_url or "").rstrip("/")
        self.gateway_url = ""
        self.keys: dict[str, str] = {}
        self.engine_start_s: float | None = None
        self._supervisor: EngineSupervisor | None = None
        self._gateway: asyncio.subprocess.Process | None = None
        self._gateway_log: Any = None
        self._engine_pgids: set[int] = set()

    async def start(self) -> None:
        if not self.engine_url:
            await self._start_engine()
        self._engine_pgids = engine_pgids(self.engine_url)
        self._make_keys()
        await self._start_gateway()

    async def _start_engine(self) -> None:
        python = Path((CACHE / "engine-python").read_text().strip())
        model = CACHE / "models" / MODEL
        # compiled graphs, as the baselines were measured (teamgpu up defaults to
        # eager mode on the CPU; see teamgpu/engine/supervisor.py)
        args = ("--max-num-seqs", str(self.args.max_num_seqs), "--scheduling-policy", "priority",
                "--max-model-len", "2048", "--no-enforce-eager")
        spec = EngineSpec(python=python, model=str(model), served_model_name=MODEL,
                          port=free_port(), args=args, env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                          log_path=self.out / "engine.log")
        print(f"starting vLLM ({' '.join(args)}), log {spec.log_path}", flush=True)
        self._supervisor = EngineSupervisor(spec, start_timeout_s=900.0)
        t0 = now()
        await self._supervisor.start()
        self.engine_start_s = now() - t0
        self.engine_url = self._supervisor.base_url
        print(f"vLLM ready on {self.engine_url} after {self.engine_start_s:.0f} s", flush=True)

    def _teamgpu(self) -> list[str]:
        exe = Path(sys.executable).parent / "teamgpu"
        return [str(exe)] if exe.exists() else [shutil.which("teamgpu") or "teamgpu"]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMGPU_")}
        a = self.args
        env.update({
            "TEAMGPU_RESERVED_SLOTS_HIGH": str(a.reserved_high),
            "TEAMGPU_RESERVED_SLOTS_NORMAL": str(a.reserved_normal),
            "TEAMGPU_AGING_S": str(a.aging_s),
            "TEAMGPU_LOG_LEVEL": "warning",
        })
        return env

    def _make_keys(self) -> None:
        import subprocess

        users = ["batch", *(f"dev{i + 1}" for i in range(self.args.devs)), "heavyA", "heavyB"]
        for user in users:
            out = subprocess.run(
                [*self._teamgpu(), "keys", "create", user, "--json", "--data-dir",
                 str(self.work / "data")],
                check=True, capture_output=True, text=True, cwd=self.work, env=self._env(),
            ).stdout
            self.keys[user] = json.loads(out)["key"]

    async def _start_gateway(self) -> None:
        port = free_port()
        self._gateway_log = (self.out / "gateway.log").open("ab")
        self._gateway = await asyncio.create_subprocess_exec(
            *self._teamgpu(), "serve", "--backend", self.engine_url, "--host", "127.0.0.1",
            "--port", str(port), "--data-dir", str(self.work / "data"),
            "--max-inflight", str(self.args.max_num_seqs),
            cwd=self.work, env=self._env(), stdin=asyncio.subprocess.DEVNULL,
            stdout=self._gateway_log, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self.gateway_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as c:
            deadline = now() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(f"{self.gateway_url}/readyz")).status_code == 200:
                        break
                if now() > deadline or self._gateway.returncode is not None:
                    raise RuntimeError(f"gateway did not become ready; see {self.out}/gateway.log")
                await asyncio.sleep(0.2)
        print(f"gateway ready on {self.gateway_url}", flush=True)

    def audit_rows(self, after_id: int = 0) -> list[dict[str, Any]]:
        """The gateway's audit rows with ``id > after_id`` (its SQLite store, read-only)."""
        import sqlite3

        path = self.work / "data" / "teamgpu.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            cur = conn.execute('SELECT id, "user", priority, queue_ms, ttft_ms, status '
                               "FROM usage WHERE id > ? ORDER BY id", (after_id,))
            return [dict(r) for r in cur.fetchall()]

    def pgids(self) -> set[int]:
        """Process groups of the engine and the gateway (pgid = pid of the leader)."""
        out = set(self._engine_pgids)
        if self._gateway is not None:
            out.add(self._gateway.pid)
        return out

    async def close(self) -> None:
        if self._gateway is not None and self._gateway.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._gateway.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._gateway.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._gateway.pid, signal.SIGKILL)
                await self._gateway.wait()
        if self._gateway_log is not None:
            self._gateway_log.close()
        if self._supervisor is not None:
            await self._supervisor.stop(timeout_s=20.0)


async def engine_metrics(client: httpx.AsyncClient, engine_url: str) -> dict[str, float]:
    """A few of vLLM's own gauges and counters, summed over label sets."""
    wanted = ("vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:num_preemptions_total", "vllm:kv_cache_usage_perc")
    out = dict.fromkeys(wanted, 0.0)
    text = (await client.get(f"{engine_url}/metrics")).text
    for line in text.splitlines():
        for name in wanted:
            if line.startswith((name + "{", name + " ")):
                with contextlib.suppress(ValueError):
                    value = float(line.rsplit(" ", 1)[1])
                    out[name] = max(out[name], value) if name.endswith("_perc") \
                        else out[name] + value
    return out


async def wait_engine_idle(client: httpx.AsyncClient, engine_url: str) -> None:
    deadline = now() + 120
    while now() < deadline:
        m = await engine_metrics(client, engine_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return
        await asyncio.sleep(0.25)
    raise RuntimeError("the engine did not become idle")


def _cpu_seconds(pgids: set[int]) -> tuple[float, float]:
    """Busy CPU seconds of the whole machine, and of the processes in ``pgids`` plus this one.

    From ``/proc`` (Linux); ``(nan, nan)`` where it is not available.
    """
    try:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(vals) - vals[3] - vals[4]  # all but idle and iowait
    ours = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[2]) in pgids or int(entry) == os.getpid():
            ours += int(rest[11]) + int(rest[12])
    return busy / tick, ours / tick


class CpuMeter:
    """What share of the machine's CPU other processes took while a scenario ran.

    The bench's own processes are its engine's and gateway's process groups and itself;
    anything else busy on the machine (another engine, other tests) slows the engine and
    makes the figures worse than the machine can do.
    """

    def __init__(self, pgids: Callable[[], set[int]]) -> None:
        self._pgids = pgids
        self._start: tuple[float, float, float] | None = None

    def start(self) -> None:
        busy, ours = _cpu_seconds(self._pgids())
        self._start = (now(), busy, ours)

    def foreign_share(self) -> float:
        """Other processes' CPU since ``start`` as a fraction of all cores (0..1)."""
        assert self._start is not None
        t0, busy0, ours0 = self._start
        busy, ours = _cpu_seconds(self._pgids())
        elapsed = (now() - t0) * (os.cpu_count() or 1)
        return max(0.0, ((busy - busy0) - (ours - ours0)) / elapsed) if elapsed else math.nan


def engine_pgids(engine_url: str) -> set[int]:
    """Process groups of a vLLM server listening on ``engine_url``'s port (by command line)."""
    port = engine_url.rsplit(":", 1)[-1].strip("/")
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and (
                b"--port" in argv and argv[argv.index(b"--port") + 1] == port.encode()):
            with contextlib.suppress(OSError):
                out.add(os.getpgid(int(entry)))
    return out


# ------------------------------------------------------------------ prompts


class Prompts:
    """Random prompts of an exact token count, with no shared prefix."""

    def __init__(self, words: list[str], seed: int) -> None:
        self.words = words
        self.rng = random.Random(seed)

    @classmethod
    async def calibrate(cls, client: httpx.AsyncClient, engine_url: str, seed: int) -> Prompts:
        single = []
        for w in WORDS:
            r = await client.post(f"{engine_url}/tokenize",
                                  json={"model": MODEL, "prompt": " " + w})
            if r.status_code == 200 and r.json().get("count") == 1:
                single.append(" " + w)
        if len(single) < 20:
            raise RuntimeError(f"only {len(single)} one-token words; cannot make prompts")
        p = cls(single, seed)
        probe = p.make(500)
        r = await client.post(f"{engine_url}/tokenize", json={"model": MODEL, "prompt": probe})
        count = r.json()["count"]
        if count != 500:
            raise RuntimeError(f"a 500-word prompt is {count} tokens, not 500")
        return p

    def make(self, n: int) -> str:
        return "".join(self.rng.choice(self.words) for _ in range(n))


# ------------------------------------------------------------------ scenarios


@dataclass
class Mode:
    name: str            # fifo, vllm-priority, teamgpu
    label: str
    via_gateway: bool
    send_priority_field: bool = False


MODES = {
    "fifo": Mode("fifo", "direct, FIFO (no priority)", False),
    "vllm-priority": Mode("vllm-priority", "direct, vLLM `priority` field", False, True),
    "teamgpu": Mode("teamgpu", "through teamgpu", True),
}
CLASS_VALUE = {"high": 0, "normal": 1, "low": 2}


class Runner:
    def __init__(self, args: argparse.Namespace, stack: Stack, client: httpx.AsyncClient,
                 prompts: Prompts) -> None:
        self.a = args
        self.stack = stack
        self.client = client
        self.prompts = prompts
        self.cpu = CpuMeter(stack.pgids)

    def send(self, mode: Mode, recs: list[Rec], user: str, cls: str, prompt_tokens: int,
             max_tokens: int) -> Awaitable[Rec]:
        rec = Rec(user=user, sent=now(), prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        recs.append(rec)
        prompt = self.prompts.make(prompt_tokens)
        if mode.via_gateway:
            return complete(self.client, self.stack.gateway_url, rec, prompt,
                            key=self.stack.keys[user], header_priority=cls)
        return complete(self.client, self.stack.engine_url, rec, prompt,
                        field_priority=CLASS_VALUE[cls] if mode.send_priority_field else None)

    async def sample_engine(self, samples: list[tuple[float, float, float]],
                            interval_s: float = 0.25) -> None:
        """Append ``(time, running, waiting)`` from vLLM's ``/metrics`` until cancelled."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                m = await engine_metrics(self.client, self.stack.engine_url)
                samples.append((now(), m["vllm:num_requests_running"],
                                m["vllm:num_requests_waiting"]))
            await asyncio.sleep(interval_s)

    async def settle(self) -> dict[str, float]:
        await wait_engine_idle(self.client, self.stack.engine_url)
        return await engine_metrics(self.client, self.stack.engine_url)

    # -------------------------------------------------------------- idle

    async def idle(self, mode: Mode) -> dict[str, Any]:
        recs: list[Rec] = []
        await self.send(mode, [], "dev1", "high", self.a.dev_prompt_tokens, self.a.dev_tokens)
        for _ in range(self.a.idle_samples):
            await self.send(mode, recs, "dev1", "high", self.a.dev_prompt_tokens,
                            self.a.dev_tokens)
        ok = [r for r in recs if r.ok]
        return {"mode": mode.name, "n": len(ok), "errors": len(recs) - len(ok),
                "ttft_p50_s": pct([r.ttft for r in ok], 0.5),
                "e2e_p50_s": pct([r.e2e for r in ok], 0.5)}

    # -------------------------------------------------------------- batch flood

    async def flood(self, mode: Mode) -> dict[str, Any]:
        a = self.a
        before = await self.settle()
        last_row = max((r["id"] for r in self.stack.audit_rows()), default=0)
        recs: list[Rec] = []
        self.cpu.start()
        samples: list[tuple[float, float, float]] = []
        sampler = asyncio.ensure_future(self.sample_engine(samples))
        t0 = now()
        batch = [asyncio.ensure_future(self.send(mode, recs, "batch", "low",
                                                 a.batch_prompt_tokens, a.batch_tokens))
                 for _ in range(a.batch_requests)]
        batch_done = asyncio.ensure_future(asyncio.gather(*batch))
        dev_tasks: list[asyncio.Future[Rec]] = []

        async def developer(i: int) -> None:
            k = 0
            while True:
                at = t0 + a.dev_start_s + (i / a.devs + k) * a.dev_interval_s
                await asyncio.wait([batch_done], timeout=max(0.0, at - now()))
                if batch_done.done():
                    return
                dev_tasks.append(asyncio.ensure_future(self.send(
                    mode, recs, f"dev{i + 1}", "high", a.dev_prompt_tokens, a.dev_tokens)))
                k += 1

        devs = asyncio.ensure_future(asyncio.gather(*(developer(i) for i in range(a.devs))))
        batch_recs = await batch_done
        t_end = max(r.end or t0 for r in batch_recs)
        sampler.cancel()
        in_flood = [x for x in samples if t0 <= x[0] <= t_end]
        await devs
        if dev_tasks:
            await asyncio.gather(*dev_tasks)
        foreign = self.cpu.foreign_share()
        after = await self.settle()
        queue_s: list[float] = []
        if mode.via_gateway:
            await asyncio.sleep(1.5)  # the audit writer batches its writes
            queue_s = [r["queue_ms"] / 1000 for r in self.stack.audit_rows(last_row)
                       if r["user"].startswith("dev") and r["queue_ms"] is not None]
        inter = [r for r in recs if r.user != "batch"]
        ok = [r for r in inter if r.ok]
        duration = t_end - t0
        tokens_in_flood = sum(
            amount / W_OUT for r in recs for (t, amount) in r.service_events()[1:] if t <= t_end)
        # saturated: until the last batch request started, work was waiting for a slot
        t_sat = max((r.first for r in batch_recs if r.first is not None), default=t_end)
        tokens_saturated = sum(
            amount / W_OUT for r in recs for (t, amount) in r.service_events()[1:] if t <= t_sat)
        batch_tokens = sum(r.completion_tokens for r in batch_recs)
        return {
            "mode": mode.name, "label": mode.label, "t0": t0, "duration_s": duration,
            "interactive_n": len(ok), "interactive_errors": len(inter) - len(ok),
            "batch_errors": sum(1 for r in batch_recs if not r.ok),
            "ttft_p50_s": pct([r.ttft for r in ok], 0.5),
            "ttft_p95_s": pct([r.ttft for r in ok], 0.95),
            "ttft_max_s": pct([r.ttft for r in ok], 1.0),
            "e2e_p50_s": pct([r.e2e for r in ok], 0.5),
            "e2e_p95_s": pct([r.e2e for r in ok], 0.95),
            "total_tokens_per_s": tokens_in_flood / duration,
            "saturated_s": t_sat - t0,
            # too short a window (every request started at once) measures nothing
            "saturated_tokens_per_s": tokens_saturated / (t_sat - t0) if t_sat - t0 >= 5.0
            else math.nan,
            "batch_tokens_per_s": batch_tokens / duration,
            "preemptions": after["vllm:num_preemptions_total"]
            - before["vllm:num_preemptions_total"],
            "x_priority_seen": sorted({r.x_priority for r in recs if r.x_priority}),
            "foreign_cpu": foreign,
            "gateway_queue_p95_s": pct(queue_s, 0.95),
            "gateway_queue_max_s": pct(queue_s, 1.0),
            "engine_running_mean": sum(x[1] for x in in_flood) / max(1, len(in_flood)),
            "engine_waiting_share": sum(1 for x in in_flood if x[2] > 0) / max(1, len(in_flood)),
            "engine_samples": [(round(t - t0, 3), r, w) for t, r, w in samples],
            "recs": recs,
        }

    # -------------------------------------------------------------- two heavy users

    async def heavy(self, mode: Mode) -> dict[str, Any]:
        a = self.a
        await self.settle()
        long_prompt = a.heavy_short_prompt * a.heavy_ratio
        users = {"heavyA": long_prompt, "heavyB": a.heavy_short_prompt}
        recs: list[Rec] = []
        self.cpu.start()
        t0 = now()
        deadline = t0 + a.heavy_duration_s

        async def worker(user: str, prompt_tokens: int) -> None:
            while now() < deadline:
                await self.send(mode, recs, user, "normal", prompt_tokens, a.heavy_output)

        # interleaved, so that neither user's requests all arrive first
        tasks = [asyncio.ensure_future(worker(u, p)) for _ in range(a.heavy_concurrency)
                 for u, p in users.items()]
        await asyncio.sleep(max(0.0, deadline - now()))
        for t in tasks:
            t.cancel()  # closes the streams: the engine aborts what is left
        await asyncio.gather(*tasks, return_exceptions=True)
        foreign = self.cpu.foreign_share()
        await self.settle()
        errors = [r.error for r in recs if r.error]
        n_slots = a.max_num_seqs - (a.reserved_high if mode.via_gateway else 0)
        p_max = max(users.values())
        bound_one = 2 * (W_IN * p_max + W_OUT * a.heavy_output)
        bound_n = 2 * (W_IN * p_max + n_slots * W_OUT * a.heavy_output)
        windows = []
        n_win = int(a.heavy_duration_s // a.window_s)
        for k in range(n_win):
            lo, hi = t0 + k * a.window_s, t0 + (k + 1) * a.window_s
            svc = {u: sum(x for r in recs if r.user == u for (t, x) in r.service_events()
                          if lo <= t < hi) for u in users}
            windows.append({"window": k, "start_s": k * a.window_s, **svc,
                            "gap": abs(svc["heavyA"] - svc["heavyB"])})
        # the paper's quantity: the largest |W_A - W_B| over any interval in the run
        events = sorted((t, (x if r.user == "heavyA" else -x)) for r in recs
                        for (t, x) in r.service_events() if t0 <= t < deadline)
        diff, hi_d, lo_d = 0.0, 0.0, 0.0
        for _, x in events:
            diff += x
            hi_d, lo_d = max(hi_d, diff), min(lo_d, diff)
        total = {u: sum(w[u] for w in windows) for u in users}
        return {
            "mode": mode.name, "label": mode.label, "t0": t0, "windows": windows,
            "requests": {u: sum(1 for r in recs if r.user == u and r.ok) for u in users},
            "service": total, "max_window_gap": max((w["gap"] for w in windows), default=0.0),
            "max_interval_gap": hi_d - lo_d, "bound_one_slot": bound_one,
            "bound_n_slots": bound_n, "n_slots": n_slots, "errors": len(errors),
            "first_error": errors[0] if errors else "", "foreign_cpu": foreign, "recs": recs,
        }


# ------------------------------------------------------------------ report


def f(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def report(args: argparse.Namespace, stack: Stack, idle: list[dict[str, Any]],
           floods: list[dict[str, Any]], heavies: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"Engine: vLLM 0.32 CPU, {MODEL}, `--max-num-seqs {args.max_num_seqs} "
        "--scheduling-policy priority`, no `--enforce-eager`, `VLLM_CPU_KVCACHE_SPACE=1`"
        + (f" (start-up {stack.engine_start_s:.0f} s)." if stack.engine_start_s else "."))
    add(f"Gateway: `--max-inflight {args.max_num_seqs}`, reserved_slots_high "
        f"{args.reserved_high}, reserved_slots_normal {args.reserved_normal}, aging_s "
        f"{args.aging_s:g}.")
    add("")
    idle_e2e = math.nan
    if idle:
        add("| idle, one request at a time | TTFT p50 (s) | end-to-end p50 (s) |")
        add("|---|---:|---:|")
        for r in idle:
            add(f"| {MODES[r['mode']].label} | {f(r['ttft_p50_s'])} | {f(r['e2e_p50_s'])} |")
        idle_e2e = next((r["e2e_p50_s"] for r in idle if r["mode"] == "fifo"), math.nan)
        add("")
    if floods:
        add(f"Batch flood: {args.batch_requests} `low` requests of {args.batch_tokens} tokens "
            f"at once; {args.devs} developers each send a `high` request of {args.dev_tokens} "
            f"tokens every {args.dev_interval_s:g} s until the flood is served.")
        add("")
        add("| way | interactive TTFT p50 (s) | TTFT p95 (s) | end-to-end p50 (s) | "
            "end-to-end p95 (s) | interactive requests | tokens/s while saturated | "
            "tokens/s, whole flood | batch tokens/s | "
            "flood served in (s) | mean running in vLLM | vLLM preemptions | "
            "other processes' CPU |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in floods:
            add(f"| {r['label']} | {f(r['ttft_p50_s'])} | {f(r['ttft_p95_s'])} | "
                f"{f(r['e2e_p50_s'])} | {f(r['e2e_p95_s'])} | {r['interactive_n']} | "
                f"{f(r['saturated_tokens_per_s'], 0)} | "
                f"{f(r['total_tokens_per_s'], 0)} | {f(r['batch_tokens_per_s'], 0)} | "
                f"{f(r['duration_s'], 1)} | {f(r['engine_running_mean'], 1)} | "
                f"{r['preemptions']:.0f} | "
                f"{100 * r['foreign_cpu']:.0f}% |")
        add("")
        gw = next((r for r in floods if r["mode"] == "teamgpu"), None)
        fifo = next((r for r in floods if r["mode"] == "fifo"), None)
        if gw is not None:
            ok1 = gw["ttft_p95_s"] <= 0.5
            add(f"- interactive TTFT p95 through teamgpu: {f(gw['ttft_p95_s'])} s "
                f"(target <= 0.5 s): **{'met' if ok1 else 'missed'}**; their wait in the "
                f"gateway's queue (audit log `queue_ms`): p95 {f(gw['gateway_queue_p95_s'], 3)} s, "
                f"max {f(gw['gateway_queue_max_s'], 3)} s")
            ratio = gw["e2e_p95_s"] / idle_e2e if not math.isnan(idle_e2e) else math.nan
            add(f"- end-to-end p95 through teamgpu: {f(gw['e2e_p95_s'])} s = {f(ratio, 1)}x "
                f"the idle {f(idle_e2e)} s (target <= 3x): "
                f"**{'met' if ratio <= 3 else 'missed'}**")
            if fifo is not None:
                sr = gw["saturated_tokens_per_s"] / fifo["saturated_tokens_per_s"]
                if math.isnan(sr):  # a flood too small to saturate: judge the whole flood
                    sr = gw["total_tokens_per_s"] / fifo["total_tokens_per_s"]
                tr = gw["total_tokens_per_s"] / fifo["total_tokens_per_s"]
                add(f"- total tokens/s through teamgpu while saturated (until the last batch "
                    f"request started): {f(gw['saturated_tokens_per_s'], 0)} = {100 * sr:.0f}% "
                    f"of direct FIFO (target >= 90%): **{'met' if sr >= 0.9 else 'missed'}**; "
                    f"over the whole flood, drain included: {100 * tr:.0f}%")
            errs = sum(r["interactive_errors"] + r["batch_errors"] for r in floods)
            add(f"- failed requests in all flood runs: {errs}")
            add("")
    if heavies:
        a = args
        add(f"Two heavy users: each keeps {a.heavy_concurrency} `normal` requests outstanding "
            f"for {a.heavy_duration_s:g} s; A's prompts are {a.heavy_short_prompt * a.heavy_ratio}"
            f" tokens, B's {a.heavy_short_prompt}; {a.heavy_output} output tokens each. Weighted "
            f"service = {W_IN:g} x prompt + {W_OUT:g} x output tokens, per {a.window_s:g} s "
            "window.")
        add("")
        add("| way | A requests | B requests | A service | B service | A:B | largest window gap "
            "| largest gap, any interval | bound, 1 slot | bound, N slots (N) | within | "
            "other processes' CPU |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in heavies:
            sa, sb = r["service"]["heavyA"], r["service"]["heavyB"]
            g = r["max_window_gap"]
            within = ("both" if g <= r["bound_one_slot"] else
                      "N-slot only" if g <= r["bound_n_slots"] else "neither")
            add(f"| {r['label']} | {r['requests']['heavyA']} | {r['requests']['heavyB']} | "
                f"{sa:.0f} | {sb:.0f} | {f(sa / sb if sb else math.nan)} | {g:.0f} | "
                f"{r['max_interval_gap']:.0f} | {r['bound_one_slot']:.0f} | "
                f"{r['bound_n_slots']:.0f} ({r['n_slots']}) | {within} | "
                f"{100 * r['foreign_cpu']:.0f}% |")
        add("")
        add("| way | " + " | ".join(f"{w['start_s']:g}-{w['start_s'] + a.window_s:g} s"
                                    for w in heavies[0]["windows"]) + " |")
        add("|---|" + "---:|" * len(heavies[0]["windows"]))
        for r in heavies:
            add(f"| {r['label']}: A / B (gap) | " + " | ".join(
                f"{w['heavyA']:.0f} / {w['heavyB']:.0f} ({w['gap']:.0f})" for w in r["windows"])
                + " |")
        add("")
    return "\n".join(lines)


def plot(args: argparse.Namespace, floods: list[dict[str, Any]],
         heavies: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def cumulative(recs: list[Rec], user: str, t0: float) -> tuple[list[float], list[float]]:
        ev = sorted((t - t0, x) for r in recs if r.user == user for (t, x) in r.service_events())
        xs, ys, acc = [0.0], [0.0], 0.0
        for t, x in ev:
            acc += x
            xs.append(t)
            ys.append(acc)
        return xs, ys

    if heavies:
        fig, axes = plt.subplots(1, len(heavies) + 1, figsize=(5.2 * (len(heavies) + 1), 4.2))
        colors = {"heavyA": "tab:red", "heavyB": "tab:blue"}
        names = {"heavyA": f"A (prompt {args.heavy_short_prompt * args.heavy_ratio})",
                 "heavyB": f"B (prompt {args.heavy_short_prompt})"}
        top = 0.0
        for ax, r in zip(axes, heavies, strict=False):
            for u in ("heavyA", "heavyB"):
                xs, ys = cumulative(r["recs"], u, r["t0"])
                ax.plot(xs, ys, color=colors[u], label=names[u])
                top = max(top, ys[-1])
            ax.set_title(r["label"])
            ax.set_xlabel("time (s)")
            ax.set_xlim(0, args.heavy_duration_s)
            ax.grid(alpha=0.3)
        for ax in axes[:-1]:
            ax.set_ylim(0, top * 1.05)
        axes[0].set_ylabel("weighted service: prompt + 2 x output tokens")
        axes[0].legend(loc="upper left")
        ax = axes[-1]
        width = args.window_s / (len(heavies) + 1)
        for i, r in enumerate(heavies):
            ax.bar([w["start_s"] + (i + 0.5) * width for w in r["windows"]],
                   [w["gap"] for w in r["windows"]], width=width, label=r["label"])
        ax.axhline(heavies[-1]["bound_one_slot"], color="k", ls="--",
                   label="bound, 1 slot: 2(P + 2·O)")
        ax.axhline(heavies[-1]["bound_n_slots"], color="k", ls=":",
                   label=f"bound, N={heavies[-1]['n_slots']} slots: 2(P + N·2·O)")
        ax.set_yscale("log")
        ax.set_title(f"service gap |A - B| per {args.window_s:g} s window")
        ax.set_xlabel("window start (s)")
        ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room for the legend above the bars
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out / "fairness.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if floods:
        fig, axes = plt.subplots(1, len(floods) + 1, figsize=(4.6 * (len(floods) + 1), 4.2))
        users = ["batch", *(f"dev{i + 1}" for i in range(args.devs))]
        for ax, r in zip(axes, floods, strict=False):
            for u in users:
                xs, ys = cumulative(r["recs"], u, r["t0"])
                ax.plot(xs, ys, label=u, lw=2 if u == "batch" else 1.2)
            ax.set_yscale("symlog", linthresh=100)
            ax.set_title(r["label"], fontsize=10)
            ax.set_xlabel("time (s)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("cumulative weighted service")
        axes[0].legend(fontsize=8)
        ax = axes[-1]
        for r in floods:
            inter = [x for x in r["recs"] if x.user != "batch" and x.ok]
            ax.scatter([x.sent - r["t0"] for x in inter], [x.ttft for x in inter], s=9,
                       label=r["label"])
        ax.axhline(0.5, color="k", ls="--", lw=1, label="target 0.5 s")
        ax.set_yscale("log")
        ax.set_title("interactive TTFT under the flood", fontsize=10)
        ax.set_xlabel("sent at (s)")
        ax.set_ylabel("TTFT (s)")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the points
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        path = out / "fairness-flood.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> int:
    only = set(args.only.split(","))
    rc = 0
    if only & {"flood", "heavy"}:
        rc = await run_scenarios(args)
    if "longflood" in only:
        import longflood  # bench/longflood.py; it imports this module as ``fairness``

        rc = max(rc, await longflood.run(args))
    return rc


async def run_scenarios(args: argparse.Namespace) -> int:
    """The idle, batch flood and two heavy users scenarios, on one engine and gateway."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- once, before anything runs
    only = set(args.only.split(","))
    started = now()
    with tempfile.TemporaryDirectory(prefix="teamgpu-fairness-") as tmp:
        stack = Stack(args, Path(tmp))
        try:
            await stack.start()
            limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
            async with httpx.AsyncClient(trust_env=False, limits=limits,
                                         timeout=httpx.Timeout(900.0, connect=10.0)) as client:
                prompts = await Prompts.calibrate(client, stack.engine_url, args.seed)
                runner = Runner(args, stack, client, prompts)
                idle: list[dict[str, Any]] = []
                floods: list[dict[str, Any]] = []
                heavies: list[dict[str, Any]] = []
                if "flood" in only:
                    for name in ("fifo", "teamgpu"):
                        idle.append(await runner.idle(MODES[name]))
                        print(f"idle {name}: {idle[-1]}", flush=True)
                    for name in args.flood_modes.split(","):
                        t = now()
                        floods.append(await runner.flood(MODES[name]))
                        print(f"flood {name} done in {now() - t:.0f} s: "
                              f"{ {k: v for k, v in floods[-1].items() if k != 'recs'} }",
                              flush=True)
                if "heavy" in only:
                    for name in ("fifo", "teamgpu"):
                        heavies.append(await runner.heavy(MODES[name]))
                        h = heavies[-1]
                        print(f"heavy {name}: service {h['service']} max window gap "
                              f"{h['max_window_gap']:.0f} errors {h['errors']} "
                              f"{h['first_error']}", flush=True)
                md = report(args, stack, idle, floods, heavies)
                pngs = plot(args, floods, heavies, out)
        finally:
            await stack.close()
    total = now() - started
    command = " ".join(["bench/fairness.py", *sys.argv[1:]])
    md += f"\nTotal run time {total:.0f} s. Command: `{command}`\n"
    print("\n" + md)
    (out / "fairness.md").write_text(md)
    blob = {"args": vars(args), "idle": idle,
            "floods": [{k: v for k, v in r.items() if k != "recs"} for r in floods],
            "heavy": [{k: v for k, v in r.items() if k != "recs"} for r in heavies],
            "records": {f"{kind}:{r['mode']}": [asdict(x) for x in r["recs"]]
                        for kind, rs in (("flood", floods), ("heavy", heavies)) for r in rs}}
    (out / "fairness.json").write_text(json.dumps(blob, indent=1, default=str))
    for p in pngs:
        print(f"wrote {p}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--engine-url", default=None,
                    help="use a vLLM that already runs (started with the flags above) "
                         "instead of starting one")
    ap.add_argument("--only", default="flood,heavy",
                    help="scenarios to run: flood, heavy, longflood")
    ap.add_argument("--flood-modes", default="fifo,vllm-priority,teamgpu")
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="vLLM --max-num-seqs, also the gateway's --max-inflight")
    ap.add_argument("--reserved-high", type=int, default=2, help="gateway reserved_slots_high")
    ap.add_argument("--reserved-normal", type=int, default=1,
                    help="gateway reserved_slots_normal")
    ap.add_argument("--aging-s", type=float, default=30.0, help="gateway aging_s")
    ap.add_argument("--batch-requests", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=256)
    ap.add_argument("--batch-prompt-tokens", type=int, default=32)
    ap.add_argument("--devs", default=None,
                    help="developers: one number for the flood (default 3), a list for "
                         "the long flood (default 3,10)")
    ap.add_argument("--dev-tokens", type=int, default=32)
    ap.add_argument("--dev-prompt-tokens", type=int, default=64)
    ap.add_argument("--dev-interval-s", type=float, default=2.0)
    ap.add_argument("--dev-start-s", type=float, default=1.0,
                    help="first interactive request this long after the flood starts")
    ap.add_argument("--idle-samples", type=int, default=5)
    ap.add_argument("--heavy-duration-s", type=float, default=60.0)
    ap.add_argument("--heavy-concurrency", type=int, default=32,
                    help="requests each heavy user keeps outstanding (above the slots, so "
                         "that both always have requests waiting: backlogged)")
    ap.add_argument("--heavy-short-prompt", type=int, default=32, help="user B's prompt tokens")
    ap.add_argument("--heavy-ratio", type=int, default=8, help="A's prompt = ratio x B's")
    ap.add_argument("--heavy-output", type=int, default=32)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 16 batch requests of 64 tokens, 20 s of heavy users")
    ap.add_argument("--flood-s", type=float, default=None,
                    help="long flood: how long the batch lasts at direct FIFO's calibrated "
                         "rate (default 180; 30 with --quick)")
    ap.add_argument("--long-items", type=int, default=None,
                    help="long flood: batch items (default: enough for --flood-s)")
    ap.add_argument("--long-modes", default="fifo,vllm-priority,teamgpu",
                    help="long flood: ways to run")
    ap.add_argument("--teamgpu-seqs", default=None,
                    help="long flood: engine --max-num-seqs (= gateway --max-inflight) of "
                         "each teamgpu run (default: max-num-seqs + reserved-high + "
                         "reserved-normal, then max-num-seqs: 19,16)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--replot", metavar="JSON", default=None,
                    help="only draw the PNGs again from a fairness.json (or "
                         "fairness-longflood.json), into --out")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - {"flood", "heavy", "longflood"}
    if unknown:
        ap.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    try:
        devs = [int(x) for x in args.devs.split(",")] if args.devs else None
        seqs = [int(x) for x in args.teamgpu_seqs.split(",")] if args.teamgpu_seqs else None
    except ValueError as exc:
        ap.error(f"--devs and --teamgpu-seqs take comma-separated numbers: {exc}")
    if devs and len(devs) > 1 and only & {"flood", "heavy"}:
        ap.error("--devs takes one number for the flood scenario; run --only longflood "
                 "for a list")
    args.devs = devs[0] if devs else 3
    args.devs_list = devs or [3, 10]
    reserve = args.reserved_high + args.reserved_normal
    args.teamgpu_seqs = seqs or [args.max_num_seqs + reserve, args.max_num_seqs]
    if min(args.teamgpu_seqs) <= reserve:
        ap.error(f"--teamgpu-seqs: each must leave the batch class a slot (> {reserve})")
    if args.flood_s is None:
        args.flood_s = 30.0 if args.quick else 180.0
    if args.quick:
        args.batch_requests, args.batch_tokens = 16, 64
        args.heavy_duration_s, args.idle_samples = 20.0, 2
    return args


def replot(path: Path, out: Path) -> int:
    """Draw the PNGs again from a ``fairness.json`` of an earlier run."""
    blob = json.loads(path.read_text())
    if blob.get("kind") == "longflood":
        import longflood

        return longflood.replot(blob, out)
    args = argparse.Namespace(**blob["args"])
    fields = set(Rec.__dataclass_fields__)

    def with_recs(kind: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**r, "recs": [Rec(**{k: v for k, v in x.items() if k in fields})
                               for x in blob["records"][f"{kind}:{r['mode']}"]]}
                for r in rows]

    out.mkdir(parents=True, exist_ok=True)
    for p in plot(args, with_recs("flood", blob["floods"]), with_recs("heavy", blob["heavy"]),
                  out):
        print(f"wrote {p}")
    return 0


def main() -> int:
    sys.modules.setdefault("fairness", sys.modules[__name__])  # for bench/longflood.py
    args = parse_args()
    if args.replot:
        return replot(Path(args.replot), Path(args.out))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
