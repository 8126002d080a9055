"""Who owns each stored Responses API object, and where it lives.

vLLM (0.32, with ``VLLM_ENABLE_RESPONSES_API_STORE=1``, which ``teamgpu up`` sets) keeps
responses in the engine's memory and serves ``GET /v1/responses/{id}`` to anyone who has
the id. The gateway records, for every response it relays with ``store`` on, the user and
key that created it, the backend that holds it, and its input items (for
``GET /v1/responses/{id}/input_items``, which vLLM does not serve). Retrieval, cancel,
delete, input items and ``previous_response_id`` are allowed to that user only; anyone
else gets 404, as for an unknown id. ``DELETE`` marks the row deleted (vLLM has no delete);
the engine forgets the response itself when it restarts. Records older than the
retention (setting ``stored_responses_days``, 30 days as OpenAI's) answer 404 and are
deleted, at start and every hour. See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from teamgpu.store.tables import stored_responses

__all__ = ["ResponseRecord", "ResponseStore"]

log = logging.getLogger(__name__)
PURGE_INTERVAL_S = 3600.0


@dataclass(frozen=True)
class ResponseRecord:
    """One stored response as the gateway knows it.

    Attributes:
        id: the response id (``resp_...``).
        user: the user whose key created it.
        key_id: that key.
        model: the served model name.
        backend: the base URL of the backend that holds it.
        created_at: when the gateway first saw it (UTC).
        deleted_at: when ``DELETE`` was called, else None.
        input_items: the request's input as a list of items.
    """

    id: str
    user: str
    key_id: str
    model: str
    backend: str
    created_at: datetime
    deleted_at: datetime | None
    input_items: builtins.list[dict[str, Any]]


class ResponseStore:
    """The ``responses`` table, with the records this gateway wrote kept in memory.

    Recording is off the request path: :meth:`add` keeps the record in memory at once (so
    the next request of a client, a ``previous_response_id``, finds it) and queues it for
    one writer task that inserts in batches (as the audit writer does). Look-ups check the
    records in memory first (at most ``recent_max`` of them, the newest), then the table
    (records of other replicas, or of before a restart). Records queued when the process
    dies without a clean stop are lost: their responses then answer 404.
    """

    def __init__(self, engine: Engine, *, recent_max: int = 10_000,
                 batch_window_s: float = 0.05, retention_s: float = 30 * 86400.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine = engine
        self._recent: OrderedDict[str, ResponseRecord] = OrderedDict()
        self._recent_max = recent_max
        self._batch_window_s = batch_window_s
        self._retention = timedelta(seconds=retention_s)
        self._clock = clock
        self._queue: asyncio.Queue[ResponseRecord | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the writer task and the hourly purge (inside the event loop that serves
        requests)."""
        self._writer = asyncio.create_task(self._write(), name="teamgpu-responses-writer")
        self._purger = asyncio.create_task(self._purge_every(PURGE_INTERVAL_S),
                                           name="teamgpu-responses-purge")

    async def close(self) -> None:
        """Write everything queued, then stop the writer and the purge."""
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        if self._writer is not None:
            await self._queue.put(None)
            await self._writer
            self._writer = None

    def purge(self) -> int:
        """Delete the records older than the retention, in memory and in the table;
        returns how many rows the table lost (call off the event loop for PostgreSQL)."""
        cutoff = self._clock() - self._retention
        for rid in [r.id for r in self._recent.values() if r.created_at < cutoff]:
            del self._recent[rid]
        with self.engine.begin() as conn:
            gone = conn.execute(delete(stored_responses).where(
                stored_responses.c.created_at < cutoff)).rowcount
        return int(gone or 0)

    async def _purge_every(self, interval_s: float) -> None:
        while True:
            try:
                gone = await asyncio.to_thread(self.purge)
                if gone:
                    log.info("deleted %d stored response records older than %s", gone,
                             self._retention)
            except Exception:  # a store that is down now is tried again next time
                log.exception("purging old stored response records failed")
            await asyncio.sleep(interval_s)

    async def add(self, response_id: str, *, user: str, key_id: str, model: str,
                  backend: str, input_items: builtins.list[dict[str, Any]]) -> None:
        """Record a new response (a second record of the same id is ignored)."""
        if response_id in self._recent:
            return
        rec = ResponseRecord(id=response_id[:128], user=user, key_id=key_id, model=model[:256],
                             backend=backend[:256], created_at=self._clock(),
                             deleted_at=None, input_items=input_items)
        self._remember(rec)
        await self._queue.put(rec)

    def get(self, response_id: str) -> ResponseRecord | None:
        """The record of ``response_id``, deleted or not; None if unknown or older than the
        retention. Reads the table only for a record not written by this process lately
        (call off the event loop for PostgreSQL)."""
        rec = self._recent.get(response_id)
        if rec is not None:
            return rec if not self._expired(rec) else None
        with self.engine.connect() as conn:
            row = conn.execute(select(stored_responses).where(
                stored_responses.c.id == response_id)).first()
        if row is None:
            return None
        m = row._mapping
        rec = ResponseRecord(
            id=m["id"], user=m["user"], key_id=m["key_id"], model=m["model"],
            backend=m["backend"], created_at=_aware(m["created_at"]),
            deleted_at=_aware(m["deleted_at"]) if m["deleted_at"] is not None else None,
            input_items=orjson.loads(m["input_items"] or "[]"))
        return rec if not self._expired(rec) else None

    def _expired(self, rec: ResponseRecord) -> bool:
        return rec.created_at < self._clock() - self._retention

    def delete(self, response_id: str) -> None:
        """Mark ``response_id`` deleted (at once in memory; in the table now, or when its
        queued insert is written)."""
        now = self._clock()
        rec = self._recent.get(response_id)
        if rec is not None:
            self._recent[response_id] = dataclasses.replace(rec, deleted_at=now)
        with self.engine.begin() as conn:
            conn.execute(update(stored_responses).where(stored_responses.c.id == response_id)
                         .values(deleted_at=now))

    def _remember(self, rec: ResponseRecord) -> None:
        self._recent[rec.id] = rec
        self._recent.move_to_end(rec.id)
        while len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    async def _write(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = asyncio.get_running_loop().time() + self._batch_window_s
            while len(batch) < 500:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    item = await asyncio.wait_for(self._queue.get(), max(0.0, timeout))
                except TimeoutError:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            # a delete that came before its insert was written applies here
            rows = [self._recent.get(r.id, r) for r in batch]
            try:
                await asyncio.to_thread(self._insert, rows)
            except Exception:  # the store is down: these records are lost, not the writer
                log.exception("stored response records not written: %s",
                              ", ".join(r.id for r in rows))

    def _insert(self, rows: builtins.list[ResponseRecord]) -> None:
        values = [{"id": r.id, "user": r.user, "key_id": r.key_id, "model": r.model,
                   "backend": r.backend, "created_at": r.created_at, "deleted_at": r.deleted_at,
                   "input_items": orjson.dumps(r.input_items).decode()} for r in rows]
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(stored_responses), values)  # one executemany
        except IntegrityError:  # an id written already (another replica): one at a time
            for v in values:
                with contextlib.suppress(IntegrityError), self.engine.begin() as conn:
                    conn.execute(insert(stored_responses).values(**v))


def _aware(dt: Any) -> datetime:
    value = dt if isinstance(dt, datetime) else datetime.fromisoformat(str(dt))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
