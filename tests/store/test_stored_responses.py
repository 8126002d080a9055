"""Stored Responses API records: kept for the retention, then 404 and deleted (the
``stored_responses_days`` setting), from memory and from the table alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from teamgpu.store.db import open_store
from teamgpu.store.responses import ResponseStore
from teamgpu.store.tables import stored_responses

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return open_store(f"sqlite:///{tmp_path / 'store.db'}")


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(stored_responses)).scalar_one())


async def add(store: ResponseStore, rid: str) -> None:
    await store.add(rid, user="alice", key_id="k1", model="m", backend="http://b",
                    input_items=[{"role": "user", "content": "hi"}])


async def test_a_record_past_the_retention_is_gone(engine: Engine) -> None:
    clock = Clock()
    store = ResponseStore(engine, retention_s=30 * DAY, clock=clock)
    await store.start()
    await add(store, "resp_old")
    clock.now += timedelta(days=20)
    await add(store, "resp_new")
    await store.close()  # both written
    assert rows(engine) == 2

    clock.now += timedelta(days=11)  # resp_old is 31 days old, resp_new 11
    assert store.get("resp_old") is None  # 404 at once, before any purge
    rec = store.get("resp_new")
    assert rec is not None and rec.user == "alice"
    assert store.purge() == 1
    assert rows(engine) == 1

    # another process (a restart, a replica) reads the table only: the same answers
    other = ResponseStore(engine, retention_s=30 * DAY, clock=clock)
    assert other.get("resp_old") is None
    assert other.get("resp_new") is not None
    clock.now += timedelta(days=20)
    assert other.get("resp_new") is None
    assert other.purge() == 1 and rows(engine) == 0


async def test_start_purges_what_an_earlier_run_left(engine: Engine) -> None:
    clock = Clock()
    first = ResponseStore(engine, retention_s=DAY, clock=clock)
    await first.start()
    await add(first, "resp_1")
    await first.close()
    clock.now += timedelta(days=2)
    second = ResponseStore(engine, retention_s=DAY, clock=clock)
    await second.start()  # the hourly purge runs once at start
    try:
        for _ in range(100):
            if rows(engine) == 0:
                break
            await asyncio.sleep(0.01)
        assert rows(engine) == 0
    finally:
        await second.close()


async def test_a_failed_write_loses_its_records_not_the_writer(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResponseStore(engine)
    real = store._insert
    calls: list[int] = []

    def flaky(rows: list[Any]) -> None:
        calls.append(len(rows))
        if len(calls) == 1:
            raise OSError("database is gone")
        real(rows)

    monkeypatch.setattr(store, "_insert", flaky)
    await store.start()
    await add(store, "resp_lost")
    for _ in range(200):  # the first batch is written (and fails) after 50 ms
        if calls:
            break
        await asyncio.sleep(0.01)
    await add(store, "resp_kept")
    await store.close()
    assert len(calls) == 2
    assert rows(engine) == 1
    assert ResponseStore(engine).get("resp_kept") is not None
