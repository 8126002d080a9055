"""The batch runner with a fake executor and a fake clock: slots, pauses on 429 with
retry_after_s, final errors, cancel, expiry, restart and resume, leases, stats."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.batch import runner as runner_mod
from teamgpu.batch.protocol import TERMINAL_STATUSES
from teamgpu.batch.runner import BatchRunner
from teamgpu.batch.store import BatchRecord, BatchStore
from tests.batch.conftest import services
from tests.batch.fakes import FakeClock, FakeExecutor, jsonl, line, parse_jsonl, settings, wait_for

T0 = 1_750_000_000.0


@dataclass
class Env:
    engine: Engine
    store: BatchStore
    keys: KeyStore
    alice: Principal
    clock: FakeClock
    tmp_path: Path
    runners: list[BatchRunner]

    def batch(self, lines: list[dict[str, Any]], *, window_h: int = 24,
              p: Principal | None = None, endpoint: str = "/v1/chat/completions"
              ) -> BatchRecord:
        who = p or self.alice
        f = self.store.files.create(user=who.user, key_id=who.key_id, purpose="batch",
                                    filename="in.jsonl", source=io.BytesIO(jsonl(lines)),
                                    now=datetime.fromtimestamp(self.clock.time(), UTC))
        return self.store.create(principal=who, input_file_id=f.id, endpoint=endpoint,
                                 completion_window=f"{window_h}h", window_s=window_h * 3600,
                                 metadata=None, now=self.clock.time())

    async def runner(self, executor: FakeExecutor, **kw: Any) -> BatchRunner:
        r = BatchRunner(self.engine, executor, self.keys, settings(self.tmp_path, **kw),
                        clock=self.clock)
        await r.start()
        self.runners.append(r)
        return r

    def get(self, batch_id: str) -> BatchRecord:
        rec = self.store.get(batch_id)
        assert rec is not None
        return rec

    async def ended(self, batch_id: str, timeout_s: float = 5.0, *, tick_s: float = 0.0
                    ) -> BatchRecord:
        """The batch once it has ended and no runner works on it; with ``tick_s`` the
        clock moves that much on each look (for what a runner's poll must pick up)."""
        await wait_for(lambda: self.get(batch_id).status in TERMINAL_STATUSES, timeout_s,
                       f"batch {batch_id} to end", clock=self.clock if tick_s else None,
                       tick_s=tick_s)
        for r in self.runners:
            await asyncio.wait_for(r.join(batch_id), timeout_s)
        return self.get(batch_id)

    def content(self, file_id: str | None) -> list[dict[str, Any]]:
        assert file_id is not None
        return parse_jsonl(b"".join(self.store.files.iter_content(file_id)))


async def make_env(engine: Engine, tmp_path: Path) -> Env:
    keys = KeyStore(engine)
    return Env(engine=engine, store=BatchStore(engine), keys=keys,
               alice=keys.create("alice")[1], clock=FakeClock(T0), tmp_path=tmp_path,
               runners=[])


@pytest.fixture
async def env(sqlite_engine: Engine, tmp_path: Path) -> AsyncIterator[Env]:
    e = await make_env(sqlite_engine, tmp_path)
    yield e
    for r in e.runners:
        await r.stop()


@pytest.fixture
async def env_any(engine: Engine, tmp_path: Path) -> AsyncIterator[Env]:
    """``env`` on SQLite and on PostgreSQL."""
    e = await make_env(engine, tmp_path)
    yield e
    for r in e.runners:
        await r.stop()


async def test_a_job_runs_to_completed(env: Env) -> None:
    ex = FakeExecutor(default_slots=2)
    rec = env.batch([line(f"c{i}") for i in range(5)])
    await env.runner(ex)
    done = await env.ended(rec.id)
    assert done.status == "completed"
    pub = done.public()
    assert pub["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert pub["usage"]["input_tokens"] == 15 and pub["usage"]["output_tokens"] == 25
    assert pub["in_progress_at"] == pub["finalizing_at"] == pub["completed_at"] == int(T0)
    assert pub["error_file_id"] is None and pub["output_file_id"]
    out = env.content(pub["output_file_id"])
    assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(5)]
    first = out[0]
    assert set(first) == {"id", "custom_id", "response", "error"} and first["error"] is None
    assert first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200
    assert first["response"]["request_id"] == f"{rec.id}-1-1"
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "answer to c0"
    assert sorted(c.custom_id for c in ex.calls) == [f"c{i}" for i in range(5)]
    call = ex.calls[0]
    assert call.principal.key_id == env.alice.key_id and call.batch_id == rec.id
    assert call.endpoint == "/v1/chat/completions" and call.body["model"] == "m"
    assert ex.max_in_flight["m"] <= 2
    stats = env.runners[0].stats()
    assert [s["id"] for s in stats] == [rec.id]
    assert stats[0]["status"] == "completed" and stats[0]["items"] == {
        "total": 5, "queued": 0, "in_flight": 0, "done": 5, "failed": 0}
    assert stats[0]["tokens"] == {"prompt": 15, "completion": 25, "total": 40}
    assert stats[0]["finished_at"] == T0 and stats[0]["eta_s"] is None


async def test_in_flight_items_never_exceed_each_models_slots(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``slots(principal, model)`` items of one model in flight, the model read
    from each line; pending items are read a page at a time, never the whole file."""
    monkeypatch.setattr(runner_mod, "PAGE_ITEMS", 4)
    reads: list[int] = []
    real_pending = env.store.pending

    ex = FakeExecutor(default_slots=3, slots_by_model={"small": 1})
    lines = [line(f"a{i}", delay_s=0.01) for i in range(10)]
    lines += [line(f"b{i}", model="small", delay_s=0.01) for i in range(5)]
    rec = env.batch(lines)
    r = BatchRunner(env.engine, ex, env.keys, settings(env.tmp_path), clock=env.clock)

    def pending(batch_id: str, *, after_line: int, limit: int) -> Any:
        got = real_pending(batch_id, after_line=after_line, limit=limit)
        reads.append(len(got))
        return got

    monkeypatch.setattr(r.store, "pending", pending)
    await r.start()
    env.runners.append(r)
    done = await env.ended(rec.id)
    assert done.completed == 15
    assert ex.max_in_flight["m"] == 3 and ex.max_in_flight["small"] == 1
    assert max(reads) <= 4 and sum(reads) == 15


async def test_a_429_with_retry_after_pauses_the_job_and_retries_the_same_item(
        env: Env) -> None:
    ex = FakeExecutor(default_slots=1)
    rec = env.batch([line("a", retry_after_s=30), line("b"), line("c")])
    r = await env.runner(ex)
    await wait_for(lambda: ex.attempts["a"] == 1)
    await asyncio.sleep(0.05)
    assert [c.custom_id for c in ex.calls] == ["a"]  # paused: b does not start
    ex.calls[0].body["priority"] = 2  # what a pipeline may add to the body it sends on
    st = r.stats()[0]
    assert st["paused_until"] == T0 + 30 and st["status"] == "in_progress"
    assert st["items"]["queued"] == 3 and st["items"]["failed"] == 0
    await env.clock.advance(29)
    await asyncio.sleep(0.05)
    assert len(ex.calls) == 1
    await env.clock.advance(2)
    done = await env.ended(rec.id)
    assert [c.custom_id for c in ex.calls] == ["a", "a", "b", "c"]
    assert ex.calls[1].request_id == f"{rec.id}-1-2"
    assert "priority" not in ex.calls[1].body  # each attempt gets the line's own body
    assert (done.completed, done.failed) == (3, 0)
    out = env.content(done.output_file_id)
    assert out[0]["custom_id"] == "a" and out[0]["response"]["request_id"] == f"{rec.id}-1-2"
    assert done.error_file_id is None


async def test_a_pause_holds_back_every_item_of_the_job(env: Env) -> None:
    """Items in flight when a 429 arrives finish; nothing new starts until the pause ends."""
    ex = FakeExecutor(default_slots=2)
    rec = env.batch([line("a", retry_after_s=10), line("b", gate="b"), line("c"), line("d")])
    await env.runner(ex)
    await wait_for(lambda: ex.attempts["a"] == 1 and ex.attempts["b"] == 1)
    ex.open_gate("b")
    await wait_for(lambda: env.get(rec.id).completed == 1)
    await asyncio.sleep(0.05)
    assert sorted(c.custom_id for c in ex.calls) == ["a", "b"]
    await env.clock.advance(10)
    done = await env.ended(rec.id)
    assert done.completed == 4 and ex.attempts["a"] == 2


async def test_final_errors_go_to_the_error_file_with_their_status(env: Env) -> None:
    ex = FakeExecutor(default_slots=4)
    rec = env.batch([line("ok"), line("bad", status=400), line("down", status=503),
                     line("bug", crash=True)])
    await env.runner(ex)
    done = await env.ended(rec.id)
    assert done.status == "completed" and (done.completed, done.failed) == (1, 3)
    assert [o["custom_id"] for o in env.content(done.output_file_id)] == ["ok"]
    errs = {e["custom_id"]: e for e in env.content(done.error_file_id)}
    assert errs["bad"]["response"]["status_code"] == 400 and errs["bad"]["error"] is None
    assert errs["bad"]["response"]["body"]["error"]["message"] == "fake 400"
    assert errs["down"]["response"]["status_code"] == 503
    assert errs["bug"]["response"]["status_code"] == 500
    assert errs["bug"]["response"]["body"]["error"]["code"] == "internal_error"
    assert done.prompt_tokens == 3  # only answers report tokens
    assert ex.attempts["bad"] == 1  # a final error is not retried


async def test_cancel_lets_items_in_flight_finish_and_keeps_their_answers(env: Env) -> None:
    ex = FakeExecutor(default_slots=2)
    rec = env.batch([line("a", hold=True), line("b", hold=True), line("c"), line("d")])
    r = await env.runner(ex)
    await wait_for(lambda: ex.total_in_flight == 2)
    assert env.store.request_cancel(rec.id, env.clock.time())[1]
    r.cancel(rec.id)
    await asyncio.sleep(0.05)
    assert env.get(rec.id).status == "cancelling"
    ex.release()
    done = await env.ended(rec.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert (done.total, done.completed, done.failed) == (4, 2, 2)
    assert [o["custom_id"] for o in env.content(done.output_file_id)] == ["a", "b"]
    assert [(e["custom_id"], e["error"]["code"]) for e in env.content(done.error_file_id)] == [
        ("c", "batch_cancelled"), ("d", "batch_cancelled")]
    assert sorted(c.custom_id for c in ex.calls) == ["a", "b"] and not ex.cancelled


async def test_a_cancel_made_by_another_gateway_is_seen_at_the_next_poll(env: Env) -> None:
    ex = FakeExecutor(default_slots=1)
    rec = env.batch([line("a", hold=True), line("b")])
    await env.runner(ex, batch_poll_interval_s=2.0)
    await wait_for(lambda: ex.total_in_flight == 1)
    env.store.request_cancel(rec.id, env.clock.time())  # no runner.cancel(): elsewhere
    await asyncio.sleep(0.05)
    assert env.runners[0].stats()[0]["status"] == "in_progress"
    await wait_for(lambda: env.runners[0].stats()[0]["status"] == "cancelling",
                   clock=env.clock, tick_s=0.5)
    ex.release()
    done = await env.ended(rec.id)
    assert done.status == "cancelled" and (done.completed, done.failed) == (1, 1)


async def test_expiry_aborts_items_in_flight_and_fails_the_rest(env: Env) -> None:
    ex = FakeExecutor(default_slots=2)
    rec = env.batch([line("a"), line("b", hold=True), line("c", hold=True), line("d")],
                    window_h=1)
    r = await env.runner(ex)
    await wait_for(lambda: ex.total_in_flight == 2 and r.stats()[0]["items"]["done"] == 1)
    assert r.stats()[0]["items"] == {"total": 4, "queued": 1, "in_flight": 2, "done": 1,
                                     "failed": 0}
    await env.clock.advance(3599)
    await asyncio.sleep(0.02)
    assert env.get(rec.id).status == "in_progress"
    await env.clock.advance(1)
    done = await env.ended(rec.id)
    assert done.status == "expired" and done.expired_at is not None
    assert (done.completed, done.failed) == (1, 3)
    assert sorted(ex.cancelled) == [f"{rec.id}-2-1", f"{rec.id}-3-1"]
    assert [o["custom_id"] for o in env.content(done.output_file_id)] == ["a"]
    errs = env.content(done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errs] == [
        ("b", "batch_expired", None), ("c", "batch_expired", None),
        ("d", "batch_expired", None)]


async def test_a_restarted_runner_resumes_without_rerunning_finished_items(
        env_any: Env) -> None:
    """Stop mid-job, start a new runner on the same store: finished items are not run
    again and are counted once; the items in flight at the stop run again."""
    env = env_any
    first = FakeExecutor(default_slots=2)
    lines = [line(f"q{i}") for i in range(4)] + [line(f"h{i}", hold=True) for i in range(4)]
    rec = env.batch(lines)
    r1 = await env.runner(first)
    await wait_for(lambda: env.get(rec.id).completed == 4 and first.total_in_flight == 2)
    await r1.stop()
    env.runners.remove(r1)
    assert sorted(first.cancelled) == [f"{rec.id}-5-1", f"{rec.id}-6-1"]
    mid = env.get(rec.id)
    assert mid.status == "in_progress" and mid.completed == 4 and mid.runner_id is None
    second = FakeExecutor(default_slots=2)
    second.release()
    await env.runner(second)
    done = await env.ended(rec.id)
    assert done.status == "completed"
    assert (done.total, done.completed, done.failed) == (8, 8, 0)
    assert sorted(c.custom_id for c in second.calls) == [f"h{i}" for i in range(4)]
    again = {c.custom_id: c.request_id for c in second.calls}
    assert again["h0"] == f"{rec.id}-5-2" and again["h2"] == f"{rec.id}-7-1"
    out = env.content(done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)
    assert done.prompt_tokens == 8 * 3


async def test_a_job_another_runner_holds_is_left_to_it(env: Env) -> None:
    ex1, ex2 = FakeExecutor(default_slots=1), FakeExecutor(default_slots=1)
    rec = env.batch([line("a", hold=True), line("b")])
    r1 = await env.runner(ex1)
    await wait_for(lambda: ex1.total_in_flight == 1)
    await env.runner(ex2)
    await env.clock.advance(5)
    assert not ex2.calls and env.get(rec.id).runner_id == r1.runner_id
    await r1.stop()  # a clean stop releases the lease: the other runner takes over
    env.runners.remove(r1)
    ex2.release()
    done = await env.ended(rec.id, tick_s=0.05)
    assert done.status == "completed" and sorted(c.custom_id for c in ex2.calls) == ["a", "b"]


async def test_invalid_input_fails_the_batch_without_running_anything(env: Env) -> None:
    ex = FakeExecutor()
    rec = env.batch([line("a"), line("a")])
    await env.runner(ex)
    done = await env.ended(rec.id)
    assert done.status == "failed" and done.errors is not None
    assert done.errors[0]["code"] == "duplicate_custom_id" and done.errors[0]["line"] == 2
    assert not ex.calls


async def test_jobs_beyond_the_active_limit_wait_their_turn(env: Env) -> None:
    ex = FakeExecutor(default_slots=1)
    first = env.batch([line("a", hold=True)])
    await env.clock.advance(1)
    second = env.batch([line("b")])
    await env.runner(ex, batch_max_active_jobs=1)
    await wait_for(lambda: ex.total_in_flight == 1)
    await asyncio.sleep(0.05)
    assert env.get(second.id).status == "validating"
    ex.release()
    assert (await env.ended(first.id)).status == "completed"
    # the next poll claims the waiting job
    assert (await env.ended(second.id, tick_s=0.05)).status == "completed"


async def test_stats_estimate_the_time_left_from_recent_completions(env: Env) -> None:
    ex = FakeExecutor(default_slots=1)
    rec = env.batch([line("a", gate="1"), line("b", gate="2"), line("c", gate="3"),
                     line("d", gate="4"), line("e", gate="5")])
    r = await env.runner(ex)
    assert r.stats()[0]["eta_s"] is None
    ex.open_gate("1")
    await wait_for(lambda: r.stats()[0]["items"]["done"] == 1)  # counted, stamped T0
    await env.clock.advance(10)
    ex.open_gate("2")
    await wait_for(lambda: r.stats()[0]["items"]["done"] == 2
                   and r.stats()[0]["items"]["in_flight"] == 1)
    st = r.stats()[0]
    assert st["id"] == rec.id and st["user"] == "alice" and st["endpoint"] == "/v1/chat/completions"
    assert st["started_at"] == T0 and st["paused_until"] is None
    assert st["items"] == {"total": 5, "queued": 2, "in_flight": 1, "done": 2, "failed": 0}
    assert st["eta_s"] == pytest.approx(30.0)  # 3 left at one per 10 s
    assert st["tokens"]["total"] == 16
    # paused (as a key limit pauses it) for ten more minutes: it cannot finish before that
    r._jobs[rec.id].paused_until = env.clock.time() + 600
    st = r.stats()[0]
    assert st["paused_until"] == env.clock.time() + 600
    assert st["eta_s"] == pytest.approx(630.0)


@services
async def test_two_runners_on_one_postgresql_store_share_jobs_without_overlap(
        pg_schema: str, tmp_path: Path) -> None:
    """Two gateways on one PostgreSQL store: each job is run by one of them, every item
    once."""
    from teamgpu.store.db import migrate
    from tests.batch.conftest import pg_engine

    engine = pg_engine(pg_schema)
    migrate(engine)
    env = await make_env(engine, tmp_path)
    recs = [env.batch([line(f"{j}-{i}", delay_s=0.002) for i in range(6)]) for j in range(4)]
    ex1, ex2 = FakeExecutor(default_slots=2), FakeExecutor(default_slots=2)
    r1 = await env.runner(ex1, batch_max_active_jobs=2)
    r2 = await env.runner(ex2, batch_max_active_jobs=2)
    try:
        for rec in recs:
            assert (await env.ended(rec.id, timeout_s=20)).completed == 6
    finally:
        await r1.stop()
        await r2.stop()
        env.runners.clear()
        engine.dispose()
    ids = [c.custom_id for c in ex1.calls + ex2.calls]
    assert sorted(ids) == sorted(f"{j}-{i}" for j in range(4) for i in range(6))
    assert ex1.calls and ex2.calls


async def test_a_revoked_owner_key_cancels_its_jobs(env: Env) -> None:
    env.clock = FakeClock(time.time())  # key changes are stamped with the real time
    ex = FakeExecutor(default_slots=1)
    rec = env.batch([line("a", hold=True), line("b"), line("c")])
    await env.runner(ex)
    await wait_for(lambda: ex.total_in_flight == 1)
    env.keys.revoke(env.alice.key_id)
    await env.clock.advance(60)  # past the revocation
    await wait_for(lambda: env.get(rec.id).status == "cancelling", clock=env.clock,
                   tick_s=0.05)
    ex.release()
    done = await env.ended(rec.id)
    assert done.status == "cancelled" and (done.completed, done.failed) == (1, 2)
    assert [c.custom_id for c in ex.calls] == ["a"]


async def test_a_rotated_owner_key_hands_its_jobs_to_the_new_key(env: Env) -> None:
    """``keys rotate`` with no grace: the old key expires at once and the job goes on with
    the new key (limits as the new key has them)."""
    env.clock = FakeClock(time.time())
    ex = FakeExecutor(default_slots=1)
    rec = env.batch([line("a", gate="a"), line("b"), line("c")])
    r = await env.runner(ex)
    await wait_for(lambda: ex.total_in_flight == 1)
    _, new = env.keys.rotate(env.alice.key_id, grace_hours=0)
    await env.clock.advance(60)  # past the old key's end
    polls = 0
    real_tick = r._tick

    async def counting_tick() -> None:
        nonlocal polls
        await real_tick()
        polls += 1

    r._tick = counting_tick  # type: ignore[method-assign]
    await wait_for(lambda: polls >= 2, clock=env.clock, tick_s=0.05, what="two polls")
    ex.open_gate("a")
    done = await env.ended(rec.id)
    assert done.status == "completed" and done.completed == 3
    assert ex.calls[0].principal.key_id == env.alice.key_id
    assert [c.principal.key_id for c in ex.calls[1:]] == [new.key_id, new.key_id]
