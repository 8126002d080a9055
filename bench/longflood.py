"""The long flood of issue 10: a Batch API job of 5+ x ``aging_s`` beside interactive users.

Run from ``bench/fairness.py --only longflood`` (its module docstring lists the options).
For each way, one batch of ``items`` completions (``--batch-prompt-tokens`` prompt,
``--batch-tokens`` output, ``ignore_eos``) runs while ``n`` developers each send a ``high``
streamed request of ``--dev-tokens`` tokens every ``--dev-interval-s`` (a fixed schedule,
open loop, spread over the interval as in the batch flood) until the batch is served:

* ``fifo``: every batch item sent straight to vLLM at once, not streamed, no priority (a
  naive batch client); the developers straight to vLLM too.
* ``vllm-priority``: the same, with vLLM's ``priority`` field (batch 2, developers 0).
* ``capped-S`` (a what-if for the scheduler, not run by default): direct with the
  ``priority`` field on the engine of ``--max-num-seqs S``, the batch client keeping exactly
  ``S - reserved_slots_high - reserved_slots_normal`` items in flight (16 of 19): the
  engine side of "the batch gets what FIFO gets, interactive work the extra slots".
* ``teamgpu-S``: the batch through the Batch API (``POST /v1/files`` and
  ``/v1/batches`` with a key whose ceiling and default are ``low``), the developers
  through the gateway (``X-Priority: high``), on an engine of ``--max-num-seqs S`` with
  the gateway at ``--max-inflight S``: the batch class gets ``S - reserved_slots_high -
  reserved_slots_normal`` slots.

The direct ways run on an engine of ``--max-num-seqs`` (16); each engine size of
``--teamgpu-seqs`` gets an engine of its own, started after the one before was stopped
(one engine at a time). The item count is fixed once, from a calibration wave on the
first engine (``--max-num-seqs`` requests of ``--batch-tokens`` at once): enough for the
batch to last ``--flood-s`` at that rate, unless ``--long-items`` gives it.

Times come from the client (monotonic seconds) for what it sends itself; the batch items
of the Batch API and the gateway's queue waits come from the gateway's audit log
(``usage.ts`` is the end of a request, ``total_ms`` its length, ``queue_ms`` its wait in
the fair queue), converted to the client's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fairness as fb
import httpx

TTFT_TARGET_S = 0.25       # interactive TTFT p95 through teamgpu, whole flood and every minute
E2E_RATIO_TARGET = 2.0     # interactive end-to-end p95 through teamgpu / idle
BATCH_SHARE_TARGET = 0.98  # batch tokens/s through teamgpu / direct FIFO
MINUTE_S = 60.0
WAITED_S = 0.010           # a gateway queue wait counted as "waited"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class Way:
    name: str
    label: str
    seqs: int              # the engine's --max-num-seqs (and the gateway's --max-inflight)
    via_gateway: bool
    priority_field: bool = False
    batch_cap: int | None = None  # direct: batch items in flight at most (None: all at once)


def ways(args: argparse.Namespace) -> list[Way]:
    out = []
    reserve = args.reserved_high + args.reserved_normal
    for m in args.long_modes.split(","):
        if m == "fifo":
            out.append(Way("fifo", "direct, FIFO (no priority)", args.max_num_seqs, False))
        elif m == "vllm-priority":
            out.append(Way("vllm-priority", "direct, vLLM `priority` field", args.max_num_seqs,
                           False, True))
        elif m == "capped":
            out += [Way(f"capped-{s}", f"direct, `priority`, batch capped at {s - reserve}, "
                        f"{s} seqs", s, False, True, s - reserve) for s in args.teamgpu_seqs]
        elif m == "teamgpu":
            out += [Way(f"teamgpu-{s}", f"teamgpu, {s} seqs (batch {s - reserve})", s, True)
                    for s in args.teamgpu_seqs]
        else:
            raise SystemExit(f"--long-modes: unknown way {m!r} (fifo, vllm-priority, teamgpu, "
                             "capped)")
    return out


@dataclass
class Item:
    """One batch item: when it started and ended (client clock), its output tokens."""

    start: float
    end: float
    tokens: int
    ok: bool


# ------------------------------------------------------------------ processes


class LongStack(fb.Stack):
    """One engine of ``seqs`` sequences, the gateway at ``--max-inflight seqs``, and keys:
    ``dev1..devN`` and ``nightly`` (ceiling and default ``low``)."""

    def __init__(self, args: argparse.Namespace, work: Path, seqs: int, n_devs: int) -> None:
        own = argparse.Namespace(**{**vars(args), "max_num_seqs": seqs, "engine_url": None,
                                    "devs": n_devs})
        super().__init__(own, work)
        self.seqs = seqs
        self.dtype = "?"

    def _key(self, user: str, *flags: str) -> None:
        out = subprocess.run(
            [*self._teamgpu(), "keys", "create", user, *flags, "--json", "--data-dir",
             str(self.work / "data")],
            check=True, capture_output=True, text=True, cwd=self.work, env=self._env(),
        ).stdout
        self.keys[user] = json.loads(out)["key"]

    def _make_keys(self) -> None:
        for i in range(max(1, self.args.devs)):  # dev1 also measures idle, even with N = 0
            self._key(f"dev{i + 1}")
        self._key("nightly", "--max-priority", "low", "--default-priority", "low")

    async def start(self) -> None:
        log = self.out / "engine.log"
        offset = log.stat().st_size if log.exists() else 0
        await super().start()
        with log.open("rb") as fh:
            fh.seek(offset)
            m = re.search(rb"dtype=torch\.(\w+)", fh.read())
        self.dtype = m.group(1).decode() if m else "?"

    def audit(self, after_id: int = 0) -> list[dict[str, Any]]:
        """Audit rows with ``id > after_id``; ``end`` is ``ts`` as Unix seconds."""
        path = self.work / "data" / "teamgpu.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                                timeout=5.0)) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(
                'SELECT id, request_id, ts, "user", priority, status, outcome, queue_ms, '
                "ttft_ms, total_ms, completion_tokens, batch_id FROM usage WHERE id > ? "
                "ORDER BY id", (after_id,))]
        for r in rows:
            ts = datetime.fromisoformat(str(r["ts"]))
            r["end"] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
        return rows


# ------------------------------------------------------------------ requests


async def complete_whole(client: httpx.AsyncClient, base: str, rec: fb.Rec, prompt: str, *,
                         field_priority: int | None = None) -> fb.Rec:
    """One ``/v1/completions`` request, not streamed (as a batch client sends it)."""
    body: dict[str, Any] = {"model": fb.MODEL, "prompt": prompt, "max_tokens": rec.max_tokens,
                            "ignore_eos": True, "temperature": 0.0}
    if field_priority is not None:
        body["priority"] = field_priority
    try:
        r = await client.post(f"{base}/v1/completions", json=body)
        rec.status = r.status_code
        if r.status_code == 200:
            rec.completion_tokens = int((r.json().get("usage") or {}).get("completion_tokens")
                                        or 0)
        else:
            rec.error = r.text[:300]
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.end = fb.now()
    return rec


def parse_gateway_metrics(text: str) -> tuple[float, float]:
    """``(in-flight requests, queued requests)`` from the gateway's ``/metrics``."""
    inflight = queued = 0.0
    for line in text.splitlines():
        if line.startswith(("teamgpu_inflight_requests{", "teamgpu_queue_depth{")):
            with contextlib.suppress(ValueError):
                v = float(line.rsplit(" ", 1)[1])
                if line.startswith("teamgpu_inflight"):
                    inflight += v
                else:
                    queued += v
    return inflight, queued


class LongRunner:
    def __init__(self, args: argparse.Namespace, stack: LongStack, client: httpx.AsyncClient,
                 prompts: fb.Prompts) -> None:
        self.a = args
        self.stack = stack
        self.client = client
        self.prompts = prompts
        self.cpu = fb.CpuMeter(stack.pgids)

    async def calibrate(self, n: int) -> float:
        """Output tokens/s of ``n`` batch-sized requests at once, direct (also a warm-up)."""
        await fb.wait_engine_idle(self.client, self.stack.engine_url)
        recs = [fb.Rec("cal", fb.now(), self.a.batch_prompt_tokens, self.a.batch_tokens)
                for _ in range(n)]
        t0 = fb.now()
        await asyncio.gather(*(complete_whole(self.client, self.stack.engine_url, r,
                                              self.prompts.make(self.a.batch_prompt_tokens))
                               for r in recs))
        bad = [r.error for r in recs if not r.ok]
        if bad:
            raise RuntimeError(f"calibration failed: {bad[0]}")
        return sum(r.completion_tokens for r in recs) / (max(r.end or t0 for r in recs) - t0)

    async def idle(self, via_gateway: bool) -> dict[str, Any]:
        """Interactive requests one at a time (after one not counted), as the batch flood's."""
        recs: list[fb.Rec] = []
        for k in range(self.a.idle_samples + 1):
            rec = await self.dev_request(via_gateway, False, 0, [])
            if k:
                recs.append(rec)
        ok = [r for r in recs if r.ok]
        return {"seqs": self.stack.seqs, "via_gateway": via_gateway, "n": len(ok),
                "errors": len(recs) - len(ok), "ttft_p50_s": fb.pct([r.ttft for r in ok], 0.5),
                "e2e_p50_s": fb.pct([r.e2e for r in ok], 0.5)}

    async def dev_request(self, via_gateway: bool, priority_field: bool, i: int,
                          recs: list[fb.Rec]) -> fb.Rec:
        a = self.a
        rec = fb.Rec(user=f"dev{i + 1}", sent=fb.now(), prompt_tokens=a.dev_prompt_tokens,
                     max_tokens=a.dev_tokens)
        recs.append(rec)
        prompt = self.prompts.make(a.dev_prompt_tokens)
        if via_gateway:
            return await fb.complete(self.client, self.stack.gateway_url, rec, prompt,
                                     key=self.stack.keys[rec.user], header_priority="high")
        return await fb.complete(self.client, self.stack.engine_url, rec, prompt,
                                 field_priority=0 if priority_field else None)

    async def developers(self, way: Way, n: int, t0: float, done: asyncio.Future[Any],
                         recs: list[fb.Rec]) -> None:
        """``n`` developers on a fixed schedule until ``done``; returns when all answered."""
        a = self.a
        tasks: list[asyncio.Future[fb.Rec]] = []

        async def developer(i: int) -> None:
            k = 0
            while True:
                at = t0 + a.dev_start_s + (i / n + k) * a.dev_interval_s
                await asyncio.wait([done], timeout=max(0.0, at - fb.now()))
                if done.done():
                    return
                tasks.append(asyncio.ensure_future(
                    self.dev_request(way.via_gateway, way.priority_field, i, recs)))
                k += 1

        await asyncio.gather(*(developer(i) for i in range(n)))
        await asyncio.gather(*tasks)

    async def sample(self, engine: list[tuple[float, float, float]],
                     gateway: list[tuple[float, float, float]], via_gateway: bool) -> None:
        """vLLM's running/waiting and the gateway's in-flight/queued every 0.5 s."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                m = await fb.engine_metrics(self.client, self.stack.engine_url)
                engine.append((fb.now(), m["vllm:num_requests_running"],
                               m["vllm:num_requests_waiting"]))
            if via_gateway:
                with contextlib.suppress(httpx.HTTPError):
                    r = await self.client.get(f"{self.stack.gateway_url}/metrics")
                    gateway.append((fb.now(), *parse_gateway_metrics(r.text)))
            await asyncio.sleep(0.5)

    # -------------------------------------------------------------- one way

    async def run(self, way: Way, n: int, items: int) -> dict[str, Any]:
        a = self.a
        before = await self.settle()
        last_row = max((r["id"] for r in self.stack.audit()), default=0)
        bodies = [self.prompts.make(a.batch_prompt_tokens) for _ in range(items)]
        file_id = await self.upload(bodies) if way.via_gateway else ""
        dev_recs: list[fb.Rec] = []
        engine_s: list[tuple[float, float, float]] = []
        gateway_s: list[tuple[float, float, float]] = []
        self.cpu.start()
        sampler = asyncio.ensure_future(self.sample(engine_s, gateway_s, way.via_gateway))
        t0, wall0 = fb.now(), time.time()
        batch_obj: dict[str, Any] = {}
        direct: list[fb.Rec] = []
        if way.via_gateway:
            done: asyncio.Future[Any] = asyncio.ensure_future(self.batch_job(file_id))
        else:
            cap = asyncio.Semaphore(way.batch_cap or len(bodies))

            async def item(prompt: str) -> fb.Rec:
                async with cap:
                    rec = fb.Rec("batch", fb.now(), a.batch_prompt_tokens, a.batch_tokens)
                    direct.append(rec)
                    return await complete_whole(
                        self.client, self.stack.engine_url, rec, prompt,
                        field_priority=2 if way.priority_field else None)

            done = asyncio.ensure_future(asyncio.gather(*(item(p) for p in bodies)))
        devs = asyncio.ensure_future(self.developers(way, n, t0, done, dev_recs))
        result = await done
        sampler.cancel()
        await devs
        foreign = self.cpu.foreign_share()
        after = await self.settle()
        rows: list[dict[str, Any]] = []
        if way.via_gateway:
            batch_obj = result
            rows = await self.audit_rows(last_row, batch_obj["id"], items, len(dev_recs))

            def mono(wall: float) -> float:
                return t0 + (wall - wall0)

            batch = [Item(mono(r["end"] - r["total_ms"] / 1000), mono(r["end"]),
                          int(r["completion_tokens"] or 0), r["status"] == 200)
                     for r in rows if r["batch_id"] == batch_obj["id"]]
            dev_rows = [{**r, "start": mono(r["end"] - r["total_ms"] / 1000)}
                        for r in rows if (r["user"] or "").startswith("dev")]
        else:
            batch = [Item(r.sent, r.end or r.sent, r.completion_tokens, r.ok) for r in direct]
            dev_rows = []
        return summarize(self.a, way, n, t0, dev_recs, batch, dev_rows, engine_s, gateway_s,
                         batch_obj, foreign, after["vllm:num_preemptions_total"]
                         - before["vllm:num_preemptions_total"])

    async def settle(self) -> dict[str, float]:
        await fb.wait_engine_idle(self.client, self.stack.engine_url)
        return await fb.engine_metrics(self.client, self.stack.engine_url)

    def _nightly(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.stack.keys['nightly']}"}

    async def upload(self, prompts: list[str]) -> str:
        """``POST /v1/files`` of one ``/v1/completions`` line per prompt; the file id."""
        a = self.a
        lines = [json.dumps({"custom_id": f"item-{k + 1}", "method": "POST",
                             "url": "/v1/completions",
                             "body": {"model": fb.MODEL, "prompt": p,
                                      "max_tokens": a.batch_tokens, "ignore_eos": True,
                                      "temperature": 0.0}})
                 for k, p in enumerate(prompts)]
        r = await self.client.post(
            f"{self.stack.gateway_url}/v1/files", headers=self._nightly(),
            data={"purpose": "batch"},
            files={"file": ("longflood.jsonl", ("\n".join(lines) + "\n").encode(),
                            "application/jsonl")})
        r.raise_for_status()
        return str(r.json()["id"])

    async def batch_job(self, file_id: str) -> dict[str, Any]:
        """``POST /v1/batches``, then the batch object every 0.5 s until it has ended."""
        url = f"{self.stack.gateway_url}/v1/batches"
        r = await self.client.post(url, headers=self._nightly(), json={
            "input_file_id": file_id, "endpoint": "/v1/completions",
            "completion_window": "24h", "metadata": {"bench": "longflood"}})
        r.raise_for_status()
        batch: dict[str, Any] = r.json()
        while batch["status"] not in TERMINAL:
            await asyncio.sleep(0.5)
            with contextlib.suppress(httpx.HTTPError):
                r = await self.client.get(f"{url}/{batch['id']}", headers=self._nightly())
                if r.status_code == 200:
                    batch = r.json()
        return batch

    async def audit_rows(self, after_id: int, batch_id: str, items: int,
                         devs: int) -> list[dict[str, Any]]:
        """The rows of this run, once the audit writer has written all of them (or 15 s)."""
        deadline = fb.now() + 15.0
        while True:
            rows = self.stack.audit(after_id)
            n_batch = sum(1 for r in rows if r["batch_id"] == batch_id and r["status"] == 200)
            n_dev = sum(1 for r in rows if (r["user"] or "").startswith("dev"))
            if (n_batch >= items and n_dev >= devs) or fb.now() > deadline:
                return rows
            await asyncio.sleep(0.5)


# ------------------------------------------------------------------ figures


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarize(a: argparse.Namespace, way: Way, n: int, t0: float, dev_recs: list[fb.Rec],
              batch: list[Item], dev_rows: list[dict[str, Any]],
              engine_s: list[tuple[float, float, float]],
              gateway_s: list[tuple[float, float, float]], batch_obj: dict[str, Any],
              foreign: float, preemptions: float) -> dict[str, Any]:
    """Everything reported about one way; times relative to ``t0`` in ``raw``."""
    ok_items = [b for b in batch if b.ok]
    b_start = min((b.start for b in ok_items), default=t0)
    b_end = max((b.end for b in ok_items), default=t0)
    window = b_end - b_start
    tokens = sum(b.tokens for b in ok_items)
    # the flood: from the start to the last batch item's end; later requests saw no flood
    in_flood = [r for r in dev_recs if r.sent <= b_end]
    ok = [r for r in in_flood if r.ok]
    queue = [r["queue_ms"] / 1000 for r in dev_rows if r["queue_ms"] is not None
             and r["start"] <= b_end]
    # interactive output in the batch window (each streamed chunk's share of the tokens)
    inter_tokens = sum(r.completion_tokens / len(r.token_times) for r in dev_recs
                       if r.token_times for t in r.token_times if b_start <= t <= b_end)
    inter_open = sum(max(0.0, min(r.end or b_end, b_end) - max(r.sent, b_start))
                     for r in dev_recs)
    eng = [x for x in engine_s if t0 <= x[0] <= b_end]
    gws = [x for x in gateway_s if t0 <= x[0] <= b_end]
    minutes = []
    for k in range(int((b_end - t0) // MINUTE_S) + 1):
        lo, hi = t0 + k * MINUTE_S, min(t0 + (k + 1) * MINUTE_S, b_end)
        xs = [r.ttft for r in ok if lo <= r.sent < hi]
        q = [r["queue_ms"] / 1000 for r in dev_rows if r["queue_ms"] is not None
             and lo <= r["start"] < hi]
        e = [x for x in eng if lo <= x[0] < hi]
        g = [x for x in gws if lo <= x[0] < hi]
        minutes.append({
            "minute": k, "from_s": k * MINUTE_S, "to_s": hi - t0, "n": len(xs),
            "ttft_p50_s": fb.pct(xs, 0.5), "ttft_p95_s": fb.pct(xs, 0.95),
            "ttft_max_s": fb.pct(xs, 1.0), "queue_p95_s": fb.pct(q, 0.95),
            "queue_max_s": fb.pct(q, 1.0), "waited_n": sum(1 for x in q if x > WAITED_S),
            "engine_running_mean": _mean([x[1] for x in e]),
            "engine_waiting_share": _mean([float(x[2] > 0) for x in e]),
            "gateway_inflight_mean": _mean([x[1] for x in g]),
            "gateway_queued_mean": _mean([x[2] for x in g]),
            "gateway_ttft_p95_s": fb.pct([r["ttft_ms"] / 1000 for r in dev_rows
                                          if r["ttft_ms"] is not None and lo <= r["start"] < hi],
                                         0.95),
        })
    counts = batch_obj.get("request_counts") or {}
    return {
        "way": way.name, "label": way.label, "seqs": way.seqs, "devs": n,
        "batch_slots": way.batch_cap or (way.seqs - (a.reserved_high + a.reserved_normal)
                                         if way.via_gateway else way.seqs),
        "batch_cap": way.batch_cap,
        "via_gateway": way.via_gateway, "t0": t0,
        "interactive_n": len(ok), "interactive_errors": len(in_flood) - len(ok),
        "interactive_after_flood": len(dev_recs) - len(in_flood),
        "first_error": next((r.error for r in dev_recs if r.error), ""),
        "ttft_p50_s": fb.pct([r.ttft for r in ok], 0.5),
        "ttft_p95_s": fb.pct([r.ttft for r in ok], 0.95),
        "ttft_max_s": fb.pct([r.ttft for r in ok], 1.0),
        "e2e_p50_s": fb.pct([r.e2e for r in ok], 0.5),
        "e2e_p95_s": fb.pct([r.e2e for r in ok], 0.95),
        "batch_items": len(batch), "batch_ok": len(ok_items),
        "batch_failed": len(batch) - len(ok_items),
        "batch_tokens": tokens, "batch_window_s": window,
        "batch_first_start_s": b_start - t0,
        "batch_tokens_per_s": tokens / window if window > 0 else math.nan,
        "interactive_tokens_per_s": inter_tokens / window if window > 0 else math.nan,
        "total_tokens_per_s": (tokens + inter_tokens) / window if window > 0 else math.nan,
        "interactive_open_mean": inter_open / window if window > 0 else math.nan,
        "batch_status": batch_obj.get("status", "client"),
        "batch_completed": counts.get("completed", len(ok_items)),
        "batch_failed_reported": counts.get("failed", len(batch) - len(ok_items)),
        "batch_total": counts.get("total", len(batch)),
        "batch_usage_output_tokens": (batch_obj.get("usage") or {}).get("output_tokens"),
        "queue_n": len(queue), "queue_p50_s": fb.pct(queue, 0.5),
        "queue_p95_s": fb.pct(queue, 0.95), "queue_max_s": fb.pct(queue, 1.0),
        "queue_waited_n": sum(1 for x in queue if x > WAITED_S),
        # the gateway's own TTFT (admission wait included): client TTFT minus this is relay
        "gateway_ttft_p95_s": fb.pct([r["ttft_ms"] / 1000 for r in dev_rows
                                      if r["ttft_ms"] is not None and r["start"] <= b_end], 0.95),
        "engine_running_mean": _mean([x[1] for x in eng]),
        "engine_waiting_share": _mean([float(x[2] > 0) for x in eng]),
        "engine_waiting_max": max((x[2] for x in eng), default=math.nan),
        "gateway_inflight_mean": _mean([x[1] for x in gws]),
        "gateway_queued_mean": _mean([x[2] for x in gws]),
        "preemptions": preemptions, "foreign_cpu": foreign, "minutes": minutes,
        "raw": {
            "dev": [[round(r.sent - t0, 3), round(r.ttft, 4), round(r.e2e, 4), r.status]
                    for r in dev_recs],
            "batch": [[round(b.start - t0, 3), round(b.end - t0, 3), b.tokens, b.ok]
                      for b in batch],
            "engine": [[round(t - t0, 2), r, w] for t, r, w in engine_s],
            "gateway": [[round(t - t0, 2), i, q] for t, i, q in gateway_s],
        },
    }


def targets(r: dict[str, Any], idle_e2e: float, fifo: dict[str, Any] | None,
            aging_s: float) -> list[tuple[str, bool]]:
    """``(description, met)`` for each of issue 10's targets, for one teamgpu way."""
    f = fb.f
    out = []
    timed = [m for m in r["minutes"] if m["n"]]
    if timed:  # with --devs 0 (the batch alone) only the batch's figures apply
        text = (f"interactive TTFT p95 over the flood {f(r['ttft_p95_s'])} s <= "
                f"{TTFT_TARGET_S} s")
        out.append((text, r["ttft_p95_s"] <= TTFT_TARGET_S))
        worst = max(timed, key=lambda m: m["ttft_p95_s"])
        text = (f"interactive TTFT p95 in every minute <= {TTFT_TARGET_S} s (worst: minute "
                f"{worst['minute']}, {f(worst['ttft_p95_s'])} s)")
        out.append((text, all(m["ttft_p95_s"] <= TTFT_TARGET_S for m in timed)))
        ratio = r["e2e_p95_s"] / idle_e2e
        text = (f"interactive end-to-end p95 {f(r['e2e_p95_s'])} s = {f(ratio, 2)} x idle "
                f"{f(idle_e2e)} s <= {E2E_RATIO_TARGET:g} x")
        out.append((text, ratio <= E2E_RATIO_TARGET))
    if fifo is not None:
        share = r["batch_tokens_per_s"] / fifo["batch_tokens_per_s"]
        text = (f"batch tokens/s {f(r['batch_tokens_per_s'], 0)} = {100 * share:.1f}% of "
                f"direct FIFO's {f(fifo['batch_tokens_per_s'], 0)} >= "
                f"{100 * BATCH_SHARE_TARGET:g}%")
        out.append((text, share >= BATCH_SHARE_TARGET))
    text = (f"the batch lasted {f(r['batch_window_s'], 0)} s >= 5 x aging_s = "
            f"{5 * aging_s:g} s (a condition of the scenario, not a target)")
    out.append((text, r["batch_window_s"] >= 5 * aging_s))
    return out


def report(args: argparse.Namespace, info: dict[str, Any], idle: list[dict[str, Any]],
           runs: list[dict[str, Any]]) -> str:
    f = fb.f
    lines: list[str] = []
    add = lines.append
    rh, rn = args.reserved_high, args.reserved_normal
    add("## Long flood (issue 10)")
    add("")
    add(f"Engine: vLLM 0.32 CPU, {fb.MODEL}, dtype {info['dtype']} (the model's own, as the "
        "batch flood: no `--dtype` flag), `--scheduling-policy priority "
        "--max-model-len 2048`, no `--enforce-eager`, `VLLM_CPU_KVCACHE_SPACE=1`; "
        f"`--max-num-seqs {args.max_num_seqs}` for the direct ways, "
        + ", ".join(f"{s} for teamgpu-{s}" for s in args.teamgpu_seqs)
        + " (start-up " + ", ".join(f"{s} seqs {t:.0f} s" for s, t in info["start_s"].items())
        + ").")
    add(f"Gateway: `--max-inflight` = the engine's sequences, reserved_slots_high {rh}, "
        f"reserved_slots_normal {rn}, aging_s {args.aging_s:g}; the batch class may use "
        f"max-inflight - {rh + rn} slots.")
    sized = (f"sized for {args.flood_s:g} s at the calibrated "
             f"{f(info['calibration_tokens_per_s'], 0)} tokens/s ({args.max_num_seqs} at once, "
             "direct)" if args.long_items is None else "given by `--long-items`")
    add(f"Batch: {info['items']} items of {args.batch_tokens} output tokens (prompt "
        f"{args.batch_prompt_tokens}, `ignore_eos`), {sized}; direct: all sent at once "
        "unless capped, not streamed; teamgpu: one Batch API job (`/v1/completions` lines) "
        "of a key with ceiling and default `low`.")
    add(f"Interactive: N developers each send a `high` streamed request of {args.dev_tokens} "
        f"tokens (prompt {args.dev_prompt_tokens}) every {args.dev_interval_s:g} s, spread "
        "over the interval, open loop, until the batch is served; counted: those sent before "
        "the last batch item ended.")
    add("")
    add("| idle, one request at a time | engine seqs | TTFT p50 (s) | end-to-end p50 (s) |")
    add("|---|---:|---:|---:|")
    for r in idle:
        add(f"| {'through teamgpu' if r['via_gateway'] else 'direct'} | {r['seqs']} | "
            f"{f(r['ttft_p50_s'])} | {f(r['e2e_p50_s'])} |")
    add("")
    idle_e2e = next((r["e2e_p50_s"] for r in idle
                     if not r["via_gateway"] and r["seqs"] == args.max_num_seqs), math.nan)
    order = [w.name for w in ways(args)]
    for n in args.devs_list:
        rs = sorted((r for r in runs if r["devs"] == n), key=lambda r: order.index(r["way"]))
        if not rs:
            continue
        fifo = next((r for r in rs if r["way"] == "fifo"), None)
        add(f"### N = {n} developers")
        add("")
        add("| way | engine seqs (batch slots) | TTFT p50 (s) | TTFT p95 (s) | TTFT max (s) | "
            "end-to-end p50 (s) | end-to-end p95 (s) | e2e p95 / idle | interactive requests "
            "(errors) | batch tokens/s | vs FIFO | interactive tokens/s | total tokens/s | "
            "interactive requests open (mean) | batch window (s) | batch items completed "
            "/ failed (status) | gateway queue p50 / p95 / max (s), waited > 10 ms | "
            "vLLM waiting (share of samples, max) | mean running in vLLM | preemptions | "
            "other processes' CPU |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
            "---|---:|---:|---:|")
        for r in rs:
            share = r["batch_tokens_per_s"] / fifo["batch_tokens_per_s"] if fifo else math.nan
            q = (f"{f(r['queue_p50_s'], 3)} / {f(r['queue_p95_s'], 3)} / "
                 f"{f(r['queue_max_s'], 3)}, {r['queue_waited_n']} of {r['queue_n']}"
                 if r["via_gateway"] else "n/a")
            add(f"| {r['label']} | {r['seqs']} ({r['batch_slots']}) | {f(r['ttft_p50_s'])} | "
                f"{f(r['ttft_p95_s'])} | {f(r['ttft_max_s'])} | {f(r['e2e_p50_s'])} | "
                f"{f(r['e2e_p95_s'])} | {f(r['e2e_p95_s'] / idle_e2e, 2)} | "
                f"{r['interactive_n']} ({r['interactive_errors']}) | "
                f"{f(r['batch_tokens_per_s'], 0)} | {100 * share:.1f}% | "
                f"{f(r.get('interactive_tokens_per_s', math.nan), 0)} | "
                f"{f(r.get('total_tokens_per_s', math.nan), 0)} | "
                f"{f(r.get('interactive_open_mean', math.nan), 1)} | "
                f"{f(r['batch_window_s'], 1)} | {r['batch_completed']} / "
                f"{r['batch_failed_reported']} ({r['batch_status']}) | {q} | "
                f"{100 * r['engine_waiting_share']:.0f}%, {r['engine_waiting_max']:.0f} | "
                f"{f(r['engine_running_mean'], 1)} | {r['preemptions']:.0f} | "
                f"{100 * r['foreign_cpu']:.0f}% |")
        add("")
        n_min = max(len(r["minutes"]) for r in rs)
        add("Interactive TTFT p50 / p95 (s) per minute of the flood (by the minute a request "
            "was sent; the last row is the part of a minute the flood lasted, per way):")
        add("")
        add("| minute | " + " | ".join(r["label"] for r in rs) + " |")
        add("|---|" + "---:|" * len(rs))
        for k in range(n_min):
            cells = []
            for r in rs:
                m = r["minutes"][k] if k < len(r["minutes"]) else None
                cells.append(f"{f(m['ttft_p50_s'])} / {f(m['ttft_p95_s'])}" if m and m["n"]
                             else "")
            add(f"| {k} | " + " | ".join(cells) + " |")
        add("")
        for r in rs:
            if not r["via_gateway"]:
                continue
            add(f"{r['label']}, per minute: interactive requests, TTFT p95 and max at the "
                "client, TTFT p95 in the gateway (audit `ttft_ms`, queue included), the "
                "gateway queue wait p95 and max of interactive requests and how many waited "
                "> 10 ms, vLLM's share of samples with requests waiting, mean running in vLLM, "
                "the gateway's mean in-flight and queued:")
            add("")
            add("| minute | requests | TTFT p95 (s) | TTFT max (s) | gateway TTFT p95 (s) | "
                "queue p95 (s) | queue max (s) | waited | vLLM waiting | running in vLLM | "
                "gateway in-flight | gateway queued |")
            add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for m in r["minutes"]:
                add(f"| {m['minute']} ({f(m['from_s'], 0)}-{f(m['to_s'], 0)} s) | {m['n']} | "
                    f"{f(m['ttft_p95_s'])} | {f(m['ttft_max_s'])} | "
                    f"{f(m['gateway_ttft_p95_s'])} | {f(m['queue_p95_s'], 3)} |"
                    f" {f(m['queue_max_s'], 3)} | {m['waited_n']} | "
                    f"{100 * m['engine_waiting_share']:.0f}% | "
                    f"{f(m['engine_running_mean'], 1)} | {f(m['gateway_inflight_mean'], 1)} | "
                    f"{f(m['gateway_queued_mean'], 1)} |")
            add("")
        for r in rs:
            if not (r["via_gateway"] or r.get("batch_cap")):
                continue
            what_if = "" if r["via_gateway"] else " (a what-if outside the gateway)"
            add(f"Targets, {r['label']}, N = {n}{what_if}:")
            add("")
            for text, met in targets(r, idle_e2e, fifo, args.aging_s):
                add(f"- **{'PASS' if met else 'FAIL'}** {text}")
            add("")
    return "\n".join(lines)


def plot(args: argparse.Namespace, runs: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devs = [n for n in args.devs_list if any(r["devs"] == n for r in runs)]
    order = [w.name for w in ways(args)]
    runs = sorted(runs, key=lambda r: order.index(r["way"]) if r["way"] in order else 99)
    fig, axes = plt.subplots(1, len(devs), figsize=(6.4 * len(devs), 4.6), squeeze=False)
    for ax, n in zip(axes[0], devs, strict=True):
        for r in (r for r in runs if r["devs"] == n):
            end = r["batch_first_start_s"] + r["batch_window_s"]
            pts = [(s, t) for s, t, _, st in r["raw"]["dev"] if st == 200 and s <= end
                   and not math.isnan(t)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, label=r["label"])
        ax.axhline(TTFT_TARGET_S, color="k", ls="--", lw=1, label=f"target {TTFT_TARGET_S} s")
        ax.set_yscale("log")
        ax.set_title(f"interactive TTFT under the long flood, N = {n}", fontsize=10)
        ax.set_xlabel("sent at (s after the batch was submitted)")
        ax.set_ylabel("TTFT (s)")
        ax.grid(alpha=0.3)
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the points
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "fairness-longflood.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> int:
    """Every way for every N (engines one at a time); prints and writes the results."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before any load)
    started = fb.now()
    all_ways = ways(args)
    seqs_order = [args.max_num_seqs] if any(not w.via_gateway for w in all_ways) else []
    seqs_order += [s for s in args.teamgpu_seqs if s not in seqs_order
                   and any(w.via_gateway and w.seqs == s for w in all_ways)]
    info: dict[str, Any] = {"items": args.long_items, "start_s": {}, "dtype": "?",
                            "calibration_tokens_per_s": math.nan, "warmup_tokens_per_s": {}}
    idle: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    prompts: fb.Prompts | None = None
    limits = httpx.Limits(max_connections=8192, max_keepalive_connections=256)
    for seqs in seqs_order:
        with tempfile.TemporaryDirectory(prefix="teamgpu-longflood-") as tmp:
            stack = LongStack(args, Path(tmp), seqs, max(args.devs_list))
            try:
                await stack.start()
                info["start_s"][seqs] = stack.engine_start_s
                info["dtype"] = stack.dtype
                async with httpx.AsyncClient(trust_env=False, limits=limits,
                                             timeout=httpx.Timeout(1800.0, connect=30.0)
                                             ) as client:
                    if prompts is None:
                        prompts = await fb.Prompts.calibrate(client, stack.engine_url,
                                                             args.seed)
                    lr = LongRunner(args, stack, client, prompts)
                    rate = await lr.calibrate(args.max_num_seqs)
                    info["warmup_tokens_per_s"][seqs] = rate
                    print(f"{seqs} seqs: {args.max_num_seqs} x {args.batch_tokens} tokens at "
                          f"once direct: {rate:.0f} tokens/s", flush=True)
                    if info["items"] is None:
                        info["calibration_tokens_per_s"] = rate
                        info["items"] = math.ceil(args.flood_s * rate / args.batch_tokens)
                        print(f"batch: {info['items']} items", flush=True)
                    for via in (False, True):
                        idle.append(await lr.idle(via))
                        print(f"idle: {idle[-1]}", flush=True)
                    for n in args.devs_list:
                        for w in all_ways:
                            if w.seqs != seqs:
                                continue
                            t = fb.now()
                            r = await lr.run(w, n, info["items"])
                            runs.append(r)
                            print(f"long flood {w.name} N={n} done in {fb.now() - t:.0f} s: "
                                  f"TTFT p95 {fb.f(r['ttft_p95_s'])} s, batch "
                                  f"{fb.f(r['batch_tokens_per_s'], 0)} tokens/s over "
                                  f"{fb.f(r['batch_window_s'], 0)} s, batch "
                                  f"{r['batch_completed']}/{r['batch_total']} "
                                  f"{r['batch_status']}, errors {r['interactive_errors']} "
                                  f"{r['first_error']}", flush=True)
            finally:
                await stack.close()
    # the figures first, so that a report that fails does not lose them
    blob = {"kind": "longflood", "args": vars(args), "info": info, "idle": idle, "runs": runs}
    (out / "fairness-longflood.json").write_text(json.dumps(blob, indent=1, default=str))
    md = report(args, info, idle, runs)
    total = fb.now() - started
    md += (f"\nTotal run time {total:.0f} s. Command: "
           f"`{' '.join(['bench/fairness.py', *sys.argv[1:]])}`\n")
    print("\n" + md, flush=True)
    (out / "fairness-longflood.md").write_text(md)
    if runs:
        print(f"wrote {plot(args, runs, out)}")
    return 0


def replot(blob: dict[str, Any], out: Path) -> int:
    """Draw ``fairness-longflood.png`` again from a ``fairness-longflood.json``."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot(argparse.Namespace(**blob['args']), blob['runs'], out)}")
    return 0
