"""The audit writer: one writer, a bounded queue, back-pressure, nothing lost on close."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from teamgpu.store.audit import AuditLog, UsageRow, usage_totals
from teamgpu.store.db import open_store
from teamgpu.store.tables import usage


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'audit.db'}")


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(usage)).scalar_one())


def row(i: int, user: str = "u", prompt: int = 1, completion: int = 2) -> UsageRow:
    return UsageRow(request_id=f"req_{i}", endpoint="chat/completions", status=200,
                    outcome="ok", total_ms=1.5, user=user, prompt_tokens=prompt,
                    completion_tokens=completion)


async def test_close_flushes_many_rows(engine: Engine) -> None:
    log = AuditLog(engine, queue_size=10_000)
    log.start()
    for i in range(2345):
        await log.record(row(i))
    await log.close()
    assert count(engine) == 2345
    with engine.connect() as conn:
        ids = {r[0] for r in conn.execute(select(usage.c.request_id))}
    assert ids == {f"req_{i}" for i in range(2345)}


async def test_back_pressure_when_the_queue_is_full(engine: Engine) -> None:
    log = AuditLog(engine, queue_size=2)
    await log.record(row(0))
    await log.record(row(1))
    # the queue is full and the writer is not running: the next record waits for room
    third = asyncio.ensure_future(log.record(row(2)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not third.done()
    log.start()
    await asyncio.wait_for(third, 5)
    await log.close()
    assert count(engine) == 3


async def test_no_row_lost_under_concurrent_producers(engine: Engine) -> None:
    log = AuditLog(engine, queue_size=8)
    log.start()

    async def producer(p: int) -> None:
        for i in range(100):
            await log.record(row(p * 1000 + i, user=f"user{p}"))

    await asyncio.gather(*(producer(p) for p in range(10)))
    await log.close()
    assert count(engine) == 1000
    totals = usage_totals(engine)
    assert totals["requests"] == 1000
    assert totals["users"]["user3"] == {"requests": 100, "prompt_tokens": 100,
                                        "completion_tokens": 200}


async def test_flush_waits_for_the_rows_queued_so_far(engine: Engine) -> None:
    log = AuditLog(engine)
    log.start()
    for i in range(10):
        await log.record(row(i))
    await asyncio.wait_for(log.flush(), 5)
    assert count(engine) == 10
    await log.close()


async def test_rows_recorded_after_close_are_still_written(engine: Engine) -> None:
    log = AuditLog(engine)
    log.start()
    await log.record(row(0))
    await log.close()
    await log.record(row(1))  # a request that ends during shutdown
    await log.close()
    assert count(engine) == 2


async def test_close_without_start_writes_the_queue(engine: Engine) -> None:
    log = AuditLog(engine)
    await log.record(row(0))
    await log.close()
    assert count(engine) == 1


def test_usage_totals_of_an_empty_store(engine: Engine) -> None:
    assert usage_totals(engine) == {"requests": 0, "users": {}}


async def test_all_fields_round_trip(engine: Engine) -> None:
    log = AuditLog(engine)
    log.start()
    r = UsageRow(request_id="req_x", endpoint="completions", status=499,
                 outcome="client_disconnected", total_ms=12.5, user="u", key_id="key_1",
                 model="m", priority="low", stream=True, prompt_tokens=3,
                 completion_tokens=4, queue_ms=1.0, ttft_ms=2.0, backend="http://b",
                 client_addr="127.0.0.1", error="e", prompt_text="p", completion_text="c",
                 batch_id="batch_1")
    await log.record(r)
    await log.close()
    with engine.connect() as conn:
        got = dict(conn.execute(select(usage)).one()._mapping)
    for k in ("request_id", "endpoint", "status", "outcome", "total_ms", "user", "key_id",
              "model", "priority", "stream", "prompt_tokens", "completion_tokens", "queue_ms",
              "ttft_ms", "backend", "client_addr", "error", "prompt_text", "completion_text",
              "batch_id"):
        assert got[k] == getattr(r, k), k


def test_cached_all_time_totals_match_a_full_scan_across_days(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """UsageTotalsCache sums past days once and today's rows on each call; whatever the
    clock and whenever rows arrive (including a row stamped before midnight but written
    after it), its totals equal a full scan's."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import insert

    from teamgpu.store.audit import UsageTotalsCache

    day0 = datetime(2026, 11, 20, tzinfo=UTC)

    def add(ts: datetime, user: str, prompt: int = 10, completion: int = 3) -> None:
        with engine.begin() as conn:
            conn.execute(insert(usage).values(
                request_id=f"r{ts.timestamp()}-{user}", ts=ts, user=user,
                endpoint="completions", status=200, outcome="ok", prompt_tokens=prompt,
                completion_tokens=completion, total_ms=1.0))

    for d in range(3):
        for h in (1, 12, 23):
            add(day0 + timedelta(days=d, hours=h), f"dev{d % 2}")
    now = {"t": day0 + timedelta(days=3, hours=9)}
    scans: list[tuple[object, object]] = []
    cache = UsageTotalsCache(engine, settle_s=600, clock=lambda: now["t"])
    import teamgpu.store.audit as audit_mod

    def counting(engine: Engine, since: Any = None, until: Any = None) -> dict[str, Any]:
        scans.append((since, until))
        return usage_totals(engine, since=since, until=until)

    monkeypatch.setattr(audit_mod, "usage_totals", counting)
    assert cache.get() == usage_totals(engine)
    add(now["t"], "dev0", 100, 50)  # today's row shows at once
    assert cache.get() == usage_totals(engine)
    # the past was summed once; later calls only read since the boundary
    assert [u for _, u in scans].count(None) == 2 and len(scans) == 3
    # five minutes past midnight: the boundary stays at yesterday's midnight, so a
    # row stamped 23:59:59 and written now is counted
    now["t"] = day0 + timedelta(days=4, minutes=5)
    add(day0 + timedelta(days=3, hours=23, minutes=59, seconds=59), "late")
    assert cache.get() == usage_totals(engine)
    # once the boundary moves, the cache is made again and still agrees
    now["t"] = day0 + timedelta(days=4, hours=1)
    add(now["t"], "dev1")
    assert cache.get() == usage_totals(engine)
    assert cache.get()["users"]["late"]["requests"] == 1
    assert cache.get()["requests"] == 9 + 3
