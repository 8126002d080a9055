"""The usage audit log: one row per request, written off the request path.

Rows go into a bounded :class:`asyncio.Queue`; one writer task takes them in batches and
inserts each batch in a worker thread, so the request path never waits on the database.
When the queue is full, :meth:`AuditLog.record` waits for room (back-pressure) rather than
drop a row. :meth:`AuditLog.close` flushes everything queued, so a clean stop loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select

from teamgpu.store.tables import LISTING_ENDPOINTS, usage

log = logging.getLogger("teamgpu.audit")

BATCH_ROWS = 500
BATCH_WAIT_S = 0.05  # after the first row, gather more for this long: one commit per batch


@dataclass
class UsageRow:
    """One request as the audit log keeps it. Times in milliseconds."""

    request_id: str
    endpoint: str
    status: int
    outcome: str
    total_ms: float
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    user: str | None = None
    key_id: str | None = None
    model: str | None = None
    priority: str | None = None
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    backend: str | None = None
    client_addr: str | None = None
    error: str | None = None
    prompt_text: str | None = None
    completion_text: str | None = None
    batch_id: str | None = None  # the batch job the request is an item of (teamgpu/batch)


class AuditLog:
    """Bounded queue plus one writer task. Create inside a running event loop."""

    def __init__(self, engine: Engine, *, queue_size: int = 10_000) -> None:
        self.engine = engine
        self._queue: asyncio.Queue[UsageRow | None] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._full = asyncio.Event()  # a producer waits for room: write without delay
        self.rows_written = 0
        self.write_errors = 0

    def start(self) -> None:
        self._closed = False
        self._task = asyncio.create_task(self._run(), name="teamgpu-audit-writer")

    async def record(self, row: UsageRow) -> None:
        """Queue a row; waits only when the queue is full. After :meth:`close` (a request
        that ends during shutdown) the row is written at once."""
        if self._closed:
            await self._write([row])
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self._full.set()
            await self._queue.put(row)

    async def flush(self) -> None:
        """Wait until every row queued so far is written."""
        if self._task is None:
            await self._drain()
            return
        await self._queue.join()

    async def close(self) -> None:
        """Write everything queued, then stop the writer."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._closed = True
        await self._drain()  # rows queued behind the stop marker, or with no writer

    async def _drain(self) -> None:
        """Write what is queued, from the caller's task (no writer task running)."""
        items: list[UsageRow | None] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        batch = [r for r in items if r is not None]
        for i in range(0, len(batch), BATCH_ROWS):
            await self._write(batch[i:i + BATCH_ROWS])
        for _ in items:
            self._queue.task_done()

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            batch: list[UsageRow] = []
            n_items = 1
            if first is None:
                stop = True
            else:
                batch.append(first)
                if self._queue.qsize() < BATCH_ROWS and not self._full.is_set():
                    # gather more rows for one commit, unless producers wait for room
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), BATCH_WAIT_S)
                self._full.clear()
            while len(batch) < BATCH_ROWS and not self._queue.empty():
                item = self._queue.get_nowait()
                n_items += 1
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                await self._write(batch)
            for _ in range(n_items):
                self._queue.task_done()

    async def _write(self, batch: list[UsageRow]) -> None:
        rows = [asdict(r) for r in batch]
        for attempt in range(5):
            try:
                await asyncio.to_thread(self._insert, rows)
                self.rows_written += len(rows)
                return
            except Exception:  # database busy or gone: retry, then keep the rows in the log
                self.write_errors += 1
                log.exception("audit write failed (attempt %d, %d rows)", attempt + 1, len(rows))
                await asyncio.sleep(0.2 * (attempt + 1))
        for r in rows:
            log.error("audit row not written: %s", r)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(usage), rows)


def usage_totals(engine: Engine, since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, Any]:
    """Total requests, and per user: requests, prompt and completion tokens, of the rows
    with ``since <= ts < until`` (either bound optional); model listings are not counted.

    Returns:
        ``{"requests": int, "users": {user: {"requests", "prompt_tokens",
        "completion_tokens"}}}``
    """
    q = select(
        usage.c.user,
        func.count(),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0),
        func.coalesce(func.sum(usage.c.completion_tokens), 0),
    ).where(usage.c.endpoint.not_in(LISTING_ENDPOINTS)).group_by(usage.c.user)
    if since is not None:
        q = q.where(usage.c.ts >= since)
    if until is not None:
        q = q.where(usage.c.ts < until)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    users = {
        (u or "(unauthenticated)"): {
            "requests": int(n),
            "prompt_tokens": int(p),
            "completion_tokens": int(c),
        }
        for u, n, p, c in rows
    }
    return {"requests": sum(v["requests"] for v in users.values()), "users": users}


def _add_totals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    users: dict[str, dict[str, int]] = {u: dict(v) for u, v in a["users"].items()}
    for u, v in b["users"].items():
        mine = users.setdefault(u, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        for k in mine:
            mine[k] += v[k]
    return {"requests": a["requests"] + b["requests"], "users": users}


class UsageTotalsCache:
    """All-time :func:`usage_totals` without scanning the whole audit log on every call.

    ``/stats`` and the dashboard (every 2 s) show all-time totals; a full scan of a month's
    log (a million rows) takes about 0.6 s on SQLite. Here the rows before a day boundary
    are summed once per day and cached; each call adds the rows since the boundary, found
    through the ``ts`` index. The boundary is the latest UTC midnight at least
    ``settle_s`` ago, so a row stamped just before midnight but committed just after it
    (a batch in flight, another replica) is still on the live side when the cache is made.
    Rows are never updated or deleted once written, so cached totals stay true.

    Thread-safe: calls may come from several worker threads at once.
    """

    def __init__(self, engine: Engine, *, settle_s: float = 600.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine = engine
        self._settle = timedelta(seconds=settle_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._boundary: datetime | None = None
        self._before: dict[str, Any] = {"requests": 0, "users": {}}

    def get(self) -> dict[str, Any]:
        """All-time totals, in :func:`usage_totals`'s shape."""
        boundary = (self._clock() - self._settle).replace(hour=0, minute=0, second=0,
                                                          microsecond=0)
        with self._lock:
            if boundary != self._boundary:
                self._before = usage_totals(self.engine, until=boundary)
                self._boundary = boundary
            before = self._before
        return _add_totals(before, usage_totals(self.engine, since=boundary))
