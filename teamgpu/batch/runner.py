"""The batch runner: works through batch jobs in the GPU's idle time.

One task per job. A job is validated, then its items are fed to the
:class:`~teamgpu.batch.executor.BatchExecutor` as slots free: at most
``executor.slots(principal, model)`` items of one model in flight per job (the model is
each line's ``body.model``), read from the store a page at a time, never the whole file.
The executor runs them at the key's batch class through the gateway's scheduler, so
interactive work always goes first and the fair share holds between users.

* A result is recorded the moment it arrives (the item is marked and its line appended
  to the output or error file in one transaction), so a job survives a restart.
* A :class:`~teamgpu.batch.executor.CallResult` with ``retry_after_s`` (a key limit that
  frees with time) pauses the whole job until then; the same item is retried, not failed.
* Any other answer is final: 2xx to the output file, anything else to the error file with
  its ``response.status_code`` (as OpenAI's Batch API does).
* Cancel: nothing more is fed, the items in flight finish (their answers are kept), the
  rest get a ``batch_cancelled`` error line, and the job is ``cancelled``.
* Expiry at ``created_at + completion_window``: the items in flight are aborted, every
  item not answered gets a ``batch_expired`` error line, and the job is ``expired``.

:meth:`BatchRunner.stop` cancels the job tasks (aborting the items in flight, which stay
pending and run again on resume) and releases the jobs' leases;
:meth:`BatchRunner.start` claims every active job no other runner holds and resumes it.
All timing goes through an injected :class:`~teamgpu.batch.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import logging
import os
import secrets
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine

from teamgpu.auth.keys import KeyError_, KeyStore, Principal
from teamgpu.batch.clock import Clock, SystemClock
from teamgpu.batch.executor import BatchCall, BatchExecutor, CallResult
from teamgpu.batch.files import FileStore
from teamgpu.batch.protocol import JobStats
from teamgpu.batch.store import BatchRecord, BatchStore, Item, result_line, usage_tokens
from teamgpu.settings import Settings

__all__ = ["BatchRunner"]

log = logging.getLogger("teamgpu.batch")

PAGE_ITEMS = 256            # pending items read from the store at a time
RATE_WINDOW_ITEMS = 50      # recent completions the ETA is estimated from
RECENT_JOBS = 20            # finished jobs stats() still shows
RECENT_JOBS_S = 3600.0      # ... for this long after they ended
T = TypeVar("T")


async def _finish_once_started(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run ``fn`` in a worker thread. Once started it is finished even if the caller is
    cancelled meanwhile (then the cancel goes on), so a recorded result is never
    half-known to the runner."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await fut
        raise


def _internal_error() -> dict[str, Any]:
    return {"error": {"message": "internal gateway error while running this item; see the "
                      "gateway log", "type": "server_error", "param": None,
                      "code": "internal_error"}}


@dataclass
class _Job:
    """A job this runner works on, and its live counters."""

    record: BatchRecord
    principal: Principal | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = ""
    queue: deque[Item] = field(default_factory=deque)
    retries: list[Item] = field(default_factory=list)  # items to run again, by line
    last_line: int = 0
    exhausted: bool = False
    in_flight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    in_flight_models: Counter[str] = field(default_factory=Counter)
    paused_until: float | None = None
    cancel_requested: bool = False
    total: int = 0
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    completions: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW_ITEMS))

    def sync(self, rec: BatchRecord) -> None:
        self.record = rec
        self.status = rec.status
        self.total, self.done, self.failed = rec.total, rec.completed, rec.failed
        self.prompt_tokens, self.completion_tokens = rec.prompt_tokens, rec.completion_tokens
        if rec.in_progress_at is not None:
            self.started_at = rec.in_progress_at.timestamp()

    def request_cancel(self) -> None:
        self.cancel_requested = True
        if self.status in ("validating", "in_progress"):
            self.status = "cancelling"
        self.wake.set()

    def next_item(self) -> Item | None:
        if self.retries:
            return self.retries[0]
        return self.queue[0] if self.queue else None

    def take(self) -> Item:
        if self.retries:
            return self.retries.pop(0)
        return self.queue.popleft()

    def retry(self, item: Item) -> None:
        bisect.insort(self.retries, item, key=lambda i: i.line_no)

    def stats(self, now: float) -> JobStats:
        in_flight = len(self.in_flight)
        queued = max(0, self.total - self.done - self.failed - in_flight)
        eta: float | None = None
        if len(self.completions) >= 2:
            span = self.completions[-1] - self.completions[0]
            if span > 0:
                rate = (len(self.completions) - 1) / span
                eta = (queued + in_flight) / rate
        if self.finished_at is not None:
            eta = None
        paused = self.paused_until if self.paused_until and self.paused_until > now else None
        if eta is not None and paused is not None:
            eta += paused - now  # a paused job resumes only when its pause ends
        return {
            "id": self.record.id, "user": self.record.user, "endpoint": self.record.endpoint,
            "status": self.status,
            "items": {"total": self.total, "queued": queued, "in_flight": in_flight,
                      "done": self.done, "failed": self.failed},
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "total": self.prompt_tokens + self.completion_tokens},
            "started_at": self.started_at, "finished_at": self.finished_at,
            "eta_s": eta, "paused_until": paused,
        }


class BatchRunner:
    """Runs the store's batch jobs through ``executor``. Create and use it inside a
    running event loop; the app's lifespan calls :meth:`start` and :meth:`stop`.

    Args:
        engine: the store.
        executor: runs one item (the gateway's pipeline; a fake in tests).
        keys: where a job's owner key is read (limits and ceiling as they are now).
        settings: ``batch_max_lines``, ``batch_max_active_jobs``,
            ``batch_poll_interval_s``, ``batch_lease_s``.
        clock: time and waiting (default: the system clock).
        runner_id: this runner's name in job leases (default: host, pid and a random part).
    """

    def __init__(self, engine: Engine, executor: BatchExecutor, keys: KeyStore,
                 settings: Settings, *, clock: Clock | None = None,
                 files: FileStore | None = None, runner_id: str | None = None) -> None:
        self.store = BatchStore(engine, files)
        self.executor = executor
        self.keys = keys
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.runner_id = runner_id or (
            f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(4)}")
        self._jobs: dict[str, _Job] = {}
        self._recent: deque[_Job] = deque(maxlen=RECENT_JOBS)
        self._poll_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._job_ended: dict[str, asyncio.Event] = {}

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Claim and resume every active job no other runner holds (``validating``,
        ``in_progress``, ``finalizing``, ``cancelling``), up to ``batch_max_active_jobs``,
        and start looking for more every ``batch_poll_interval_s``."""
        self._stop.clear()
        await self._tick()
        self._poll_task = asyncio.create_task(self._poll(), name="teamgpu-batch-poll")

    async def stop(self) -> None:
        """Stop every job task and release the leases. Items in flight are aborted and
        stay pending: the next runner runs them again; everything recorded stays."""
        self._stop.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        jobs = list(self._jobs.values())
        for job in jobs:
            if job.task is not None:
                job.task.cancel()
        for job in jobs:
            if job.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await job.task
        ids = [j.record.id for j in jobs]
        self._jobs.clear()
        await asyncio.to_thread(self.store.release, self.runner_id, ids)

    def submit(self, batch_id: str) -> None:
        """A batch was created: look for it now rather than at the next poll."""
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        """The batch was moved to ``cancelling`` in the store: act on it now if it is one of
        this runner's jobs (other gateways see it at their next poll)."""
        job = self._jobs.get(batch_id)
        if job is not None:
            job.request_cancel()
        else:
            self._wake.set()

    async def join(self, batch_id: str) -> None:
        """Wait until this runner has no task for ``batch_id`` any more (it ended, or was
        stopped). Returns at once for a job this runner does not run."""
        ev = self._job_ended.get(batch_id)
        if ev is not None and batch_id in self._jobs:
            await ev.wait()

    def stats(self) -> list[JobStats]:
        """The jobs this runner works on, then those it finished in the last hour (at most
        20), newest first (docs/batch.md, "Stats")."""
        now = self.clock.time()
        active = [j.stats(now) for j in self._jobs.values()]
        recent = [j.stats(now) for j in reversed(self._recent)
                  if j.finished_at is not None and now - j.finished_at <= RECENT_JOBS_S]
        return active + recent

    # --- finding jobs ------------------------------------------------------------------
    def _renew_every_s(self) -> float:
        return min(self.settings.batch_poll_interval_s, self.settings.batch_lease_s / 3)

    async def _poll(self) -> None:
        while not self._stop.is_set():
            await self.clock.wait(self._wake, self._renew_every_s())
            self._wake.clear()
            try:
                await self._tick()
            except Exception:  # the store is briefly unreachable: try again next time
                log.exception("batch runner poll failed")

    async def _tick(self) -> None:
        now = self.clock.time()
        lease = self.settings.batch_lease_s
        mine = await asyncio.to_thread(self.store.renew, self.runner_id, list(self._jobs),
                                       now, lease)
        for batch_id, job in list(self._jobs.items()):
            status = mine.get(batch_id)
            if status is None:  # taken over after our lease ran out: stop, change nothing
                log.warning("batch %s: lease lost, leaving it to the runner that took it",
                            batch_id)
                if job.task is not None:
                    job.task.cancel()
                continue
            if status == "cancelling" and not job.cancel_requested:
                job.request_cancel()
            if job.principal is not None and status == "in_progress":
                # limits and ceiling as they are now; a revoked key stops its jobs
                p = await asyncio.to_thread(self._owner_key, job.record.key_id)
                if p is None:
                    await self._cancel_for_key(job)
                else:
                    job.principal = p
        room = self.settings.batch_max_active_jobs - len(self._jobs)
        if room <= 0 or self._stop.is_set():
            return
        busy = Counter(j.record.user for j in self._jobs.values())
        claimed = await asyncio.to_thread(self.store.claim, self.runner_id, now, lease,
                                          limit=room, busy_users=dict(busy))
        for rec in claimed:
            if self._stop.is_set():
                await asyncio.to_thread(self.store.release, self.runner_id, [rec.id])
                continue
            job = _Job(record=rec)
            job.sync(rec)
            self._jobs[rec.id] = job
            self._job_ended[rec.id] = asyncio.Event()
            job.task = asyncio.create_task(self._run(job), name=f"teamgpu-batch-{rec.id}")

    def _owner_key(self, key_id: str) -> Principal | None:
        """The key a job runs with: the owner's key, or once that has expired the key it was
        rotated into (``teamgpu keys rotate``, followed to the newest); None when none of
        them is active (revoked, expired, or gone)."""
        now = datetime.fromtimestamp(self.clock.time(), UTC)
        seen: set[str] = set()
        current: str | None = key_id
        while current is not None and current not in seen:
            seen.add(current)
            try:
                p = self.keys.get(current)
            except KeyError_:
                return None
            if p.status(now) == "active":
                return p
            current = self.store.successor_key(current)
        return None

    async def _cancel_for_key(self, job: _Job) -> None:
        log.warning("batch %s: the owner key %s is no longer active (revoked or expired, "
                    "and not rotated into an active key); cancelling", job.record.id,
                    job.record.key_id)
        job.request_cancel()
        await self._db(self.store.request_cancel, job.record.id, self.clock.time())

    # --- running a job -----------------------------------------------------------------
    async def _db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a store write in a worker thread, one at a time (SQLite has one writer)."""
        async with self._write_lock:
            return await _finish_once_started(fn, *args, **kw)

    async def _run(self, job: _Job) -> None:
        batch_id = job.record.id
        try:
            await self._run_job(job)
        except asyncio.CancelledError:
            pass
        except Exception:
            # a bug or a store outage: the job stays as recorded, its lease runs out and a
            # runner (this one at its next poll) resumes it
            log.exception("batch %s: runner failed; it will be resumed", batch_id)
        finally:
            tasks = list(job.in_flight.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._jobs.get(batch_id) is job:
                del self._jobs[batch_id]
            if job.finished_at is not None:
                self._recent.append(job)
            ended = self._job_ended.pop(batch_id, None)
            if ended is not None:
                ended.set()

    async def _run_job(self, job: _Job) -> None:
        batch_id = job.record.id
        job.principal = await asyncio.to_thread(self._owner_key, job.record.key_id)
        if job.status == "validating":
            # not under the write lock: a large file takes seconds, and other jobs go on
            rec = await _finish_once_started(self.store.validate, batch_id,
                                             max_lines=self.settings.batch_max_lines,
                                             now=self.clock.time())
            job.sync(rec)
            if rec.status == "failed":
                job.finished_at = self.clock.time()
                return
        if job.status == "cancelling":
            job.cancel_requested = True
        if job.principal is None and job.status == "in_progress":
            await self._cancel_for_key(job)
        if job.status == "finalizing":
            await self._finish(job, "completed")
            return
        expires_at = job.record.expires_at.timestamp()
        while True:
            now = self.clock.time()
            if not job.cancel_requested and now >= expires_at:
                await self._expire(job)
                return
            if job.cancel_requested:
                if not job.in_flight:
                    await self._finish(job, "cancelled", fill_code="batch_cancelled")
                    return
            else:
                await self._feed(job)
                if not job.in_flight and job.next_item() is None and job.exhausted:
                    if await self._db(self.store.start_finalizing, batch_id,
                                      self.clock.time()):
                        job.status = "finalizing"
                        await self._finish(job, "completed")
                        return
                    job.cancel_requested = True  # a cancel came first
                    continue
            now = self.clock.time()
            deadline = expires_at if not job.cancel_requested else None
            if job.paused_until is not None and not job.cancel_requested:
                deadline = min(expires_at, job.paused_until)
            await self.clock.wait(job.wake, None if deadline is None else deadline - now)
            job.wake.clear()

    async def _feed(self, job: _Job) -> None:
        """Launch items while the job is not paused and their model has a free slot."""
        assert job.principal is not None
        if job.paused_until is not None:
            if self.clock.time() < job.paused_until:
                return
            job.paused_until = None
        while True:
            if job.next_item() is None and not job.exhausted:
                page = await asyncio.to_thread(self.store.pending, job.record.id,
                                               after_line=job.last_line, limit=PAGE_ITEMS)
                known = job.in_flight.keys()
                job.queue.extend(i for i in page if i.line_no not in known)
                if page:
                    job.last_line = page[-1].line_no
                job.exhausted = len(page) < PAGE_ITEMS
            item = job.next_item()
            if item is None or job.cancel_requested or job.paused_until is not None:
                return
            cap = max(1, self.executor.slots(job.principal, item.model))
            if job.in_flight_models[item.model] >= cap:
                return
            job.take()
            job.in_flight_models[item.model] += 1
            job.in_flight[item.line_no] = asyncio.create_task(
                self._run_item(job, item), name=f"teamgpu-batch-{job.record.id}-{item.line_no}")

    async def _run_item(self, job: _Job, item: Item) -> None:
        rec = job.record
        assert job.principal is not None
        try:
            await self._db(self.store.start_attempt, rec.id, item.line_no)
            attempt = item.attempts + 1
            # a copy per attempt: the pipeline may add fields to what it sends on
            call = BatchCall(principal=job.principal, endpoint=rec.endpoint,
                             body=copy.deepcopy(item.body),
                             batch_id=rec.id, custom_id=item.custom_id,
                             request_id=f"{rec.id}-{item.line_no}-{attempt}")
            try:
                result = await self.executor.execute(call)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch %s line %d: executor failed", rec.id, item.line_no)
                result = CallResult(status=500, body=_internal_error())
            if result.retry_after_s is not None:
                until = self.clock.time() + max(0.0, result.retry_after_s)
                job.paused_until = max(job.paused_until or 0.0, until)
                job.retry(replace(item, attempts=attempt))
                return
            prompt, completion = usage_tokens(result.body) if 200 <= result.status < 300 \
                else (0, 0)
            line = result_line(item.custom_id, result.status, call.request_id, result.body)
            if await self._db(self.store.record, rec, item.line_no, status=result.status,
                              line=line, prompt_tokens=prompt,
                              completion_tokens=completion, now=self.clock.time()):
                if 200 <= result.status < 300:
                    job.done += 1
                else:
                    job.failed += 1
                job.prompt_tokens += prompt
                job.completion_tokens += completion
                job.completions.append(self.clock.time())
        finally:
            job.in_flight.pop(item.line_no, None)
            job.in_flight_models[item.model] -= 1
            job.wake.set()

    async def _expire(self, job: _Job) -> None:
        tasks = list(job.in_flight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._finish(job, "expired", fill_code="batch_expired")

    async def _finish(self, job: _Job, status: str, *, fill_code: str | None = None) -> None:
        rec = await self._db(self.store.finish, job.record.id, status, self.clock.time(),
                             fill_code=fill_code)
        job.sync(rec)
        job.paused_until = None
        job.finished_at = self.clock.time()
        log.info("batch %s %s: %d completed, %d failed", rec.id, status, rec.completed,
                 rec.failed)
