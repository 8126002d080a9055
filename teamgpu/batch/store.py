"""Batches and their items in the store: create, list, validate, record results, claim.

A batch is one ``batches`` row; after validation each input line is one ``batch_items``
row (``pending`` -> ``done`` or ``failed``). Recording a result marks the item and appends
its line to the output or error file in one transaction, and only while the item is still
pending, so every custom_id gets exactly one result line and is counted once, whatever
stops the gateway and whoever resumes the job.

Runners claim jobs with a lease (``runner_id``, ``lease_expires_at``), so that several
gateways sharing one PostgreSQL store never run one job twice; a gateway that stops
cleanly releases its leases, one that dies loses them after ``batch_lease_s``.

Every method is synchronous; the runner and the routes call them in a worker thread.
Times are Unix seconds from the caller's clock.
"""

from __future__ import annotations

import builtins  # BatchStore.list shadows the built-in in the class's annotations
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select, update

from teamgpu.auth.keys import Principal
from teamgpu.batch.files import FileStore, aware, new_file_id, unix
from teamgpu.batch.protocol import (
    ACTIVE_STATUSES,
    BatchErrorEntry,
    BatchObject,
    OutputLine,
)
from teamgpu.store.tables import api_keys, batch_items, batches

__all__ = [
    "MAX_CUSTOM_ID_CHARS",
    "MAX_LISTED_ERRORS",
    "BatchRecord",
    "BatchStore",
    "Item",
    "check_line",
    "error_line",
    "new_batch_id",
    "result_line",
    "usage_tokens",
]

MAX_CUSTOM_ID_CHARS = 256
MAX_LISTED_ERRORS = 100
"""Invalid lines listed in a failed batch's ``errors.data``; one more entry says how
many more there were."""
INSERT_ROWS = 500
SHOWN_FILES_STATUSES = ("completed", "cancelled", "expired")


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class BatchRecord:
    """A ``batches`` row."""

    id: str
    user: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict[str, str] | None
    errors: list[BatchErrorEntry] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None
    runner_id: str | None = None
    lease_expires_at: datetime | None = None

    def public(self) -> BatchObject:
        """The OpenAI batch object. The output and error files are shown once the job has
        ended (they are complete only then)."""
        shown = self.status in SHOWN_FILES_STATUSES
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": None if not self.errors else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id if shown else None,
            "error_file_id": self.error_file_id if shown else None,
            "created_at": int(self.created_at.timestamp()),
            "in_progress_at": unix(self.in_progress_at),
            "expires_at": int(self.expires_at.timestamp()),
            "finalizing_at": unix(self.finalizing_at),
            "completed_at": unix(self.completed_at),
            "failed_at": unix(self.failed_at),
            "expired_at": unix(self.expired_at),
            "cancelling_at": unix(self.cancelling_at),
            "cancelled_at": unix(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata,
            "usage": {"input_tokens": self.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": self.prompt_tokens + self.completion_tokens},
        }


_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at",
          "failed_at", "expired_at", "cancelling_at", "cancelled_at", "lease_expires_at")


def _record(row: Any) -> BatchRecord:
    m = dict(row._mapping)
    for k in _TIMES:
        if m[k] is not None:
            m[k] = aware(m[k])
    meta = m.pop("metadata_json")
    errs = m.pop("errors_json")
    for k in ("total", "completed", "failed", "prompt_tokens", "completion_tokens"):
        m[k] = int(m[k])
    return BatchRecord(metadata=orjson.loads(meta) if meta else None,
                       errors=orjson.loads(errs) if errs else None, **m)


@dataclass(frozen=True)
class Item:
    """A pending item as the runner feeds it."""

    line_no: int
    custom_id: str
    model: str
    body: dict[str, Any] = field(repr=False)
    attempts: int = 0


def check_line(line_no: int, raw: bytes, endpoint: str, seen: set[str]
               ) -> tuple[str, str, dict[str, Any]] | BatchErrorEntry:
    """Check one input line as OpenAI does: a JSON object with a unique ``custom_id``,
    ``method`` POST, ``url`` equal to the batch's endpoint, and a ``body`` object with a
    ``model`` (and no ``stream: true``: a batch item is answered whole).

    Returns:
        ``(custom_id, model, body)`` (``custom_id`` is added to ``seen``), or the line's
        error in ``errors.data``'s shape.
    """
    def err(code: str, message: str, param: str | None = None) -> BatchErrorEntry:
        return {"code": code, "message": message, "param": param, "line": line_no}

    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return err("invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(obj, dict):
        return err("invalid_json_line", "This line is not a JSON object.")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return err("missing_required_parameter", "custom_id must be a non-empty string.",
                   "custom_id")
    if len(cid) > MAX_CUSTOM_ID_CHARS:
        return err("invalid_value", f"custom_id has more than {MAX_CUSTOM_ID_CHARS} "
                   "characters.", "custom_id")
    if cid in seen:
        return err("duplicate_custom_id", f"The custom_id {cid!r} is used by an earlier "
                   "line; each request needs its own.", "custom_id")
    if obj.get("method") != "POST":
        return err("invalid_method", "method must be 'POST'.", "method")
    if obj.get("url") != endpoint:
        return err("url_mismatch", f"url must be the batch's endpoint {endpoint!r}, got "
                   f"{obj.get('url')!r}.", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return err("missing_required_parameter", "body must be a JSON object.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return err("missing_required_parameter", "body.model must be a non-empty string.",
                   "body.model")
    if len(model) > 256:
        return err("invalid_value", "body.model has more than 256 characters.", "body.model")
    if body.get("stream"):
        return err("invalid_value", "stream is not supported in a batch: each item is "
                   "answered whole.", "body.stream")
    try:  # the decoder takes 1,024 levels, the encoder that stores the body about 250
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        return err("invalid_value", "body is nested too deeply (at most about 250 levels of "
                   "arrays and objects).", "body")
    seen.add(cid)
    return cid, model, body


def result_line(custom_id: str, status: int, request_id: str, body: dict[str, Any]) -> bytes:
    """An output or error file line for an answer (OpenAI's request output object)."""
    line: OutputLine = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
                        "response": {"status_code": status, "request_id": request_id,
                                     "body": body},
                        "error": None}
    return orjson.dumps(line) + b"\n"


def error_line(custom_id: str, code: str, message: str) -> bytes:
    """An error file line for an item that got no answer (``batch_expired``,
    ``batch_cancelled``)."""
    line: OutputLine = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": custom_id,
                        "response": None, "error": {"code": code, "message": message}}
    return orjson.dumps(line) + b"\n"


def usage_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """``(prompt, completion)`` tokens an answer reports (chat, completions and embeddings
    use ``prompt_tokens``/``completion_tokens``; responses ``input_tokens``/
    ``output_tokens``); 0 for what it does not report."""
    u = body.get("usage")
    if not isinstance(u, dict):
        return 0, 0

    def num(*keys: str) -> int:
        for k in keys:
            v = u.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return v
        return 0

    return num("prompt_tokens", "input_tokens"), num("completion_tokens", "output_tokens")


FILL_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window "
                     "expired.",
    "batch_cancelled": "This request was not executed: the batch was cancelled.",
}


class BatchStore:
    """Batches in the store. Safe to call from any thread."""

    def __init__(self, engine: Engine, files: FileStore | None = None) -> None:
        self.engine = engine
        self.files = files or FileStore(engine)

    # --- the API's side ----------------------------------------------------------------
    def create(self, *, principal: Principal, input_file_id: str, endpoint: str,
               completion_window: str, window_s: int, metadata: dict[str, str] | None,
               now: float) -> BatchRecord:
        """A new batch in ``validating``, expiring ``window_s`` after ``now``."""
        batch_id = new_batch_id()
        with self.engine.begin() as conn:
            conn.execute(insert(batches).values(
                id=batch_id, user=principal.user, key_id=principal.key_id, endpoint=endpoint,
                input_file_id=input_file_id, completion_window=completion_window,
                status="validating",
                metadata_json=orjson.dumps(metadata).decode() if metadata else None,
                total=0, completed=0, failed=0, prompt_tokens=0, completion_tokens=0,
                created_at=_dt(now), expires_at=_dt(now + window_s)))
        got = self.get(batch_id)
        assert got is not None
        return got

    def get(self, batch_id: str) -> BatchRecord | None:
        with self.engine.connect() as conn:
            return self._get(conn, batch_id)

    @staticmethod
    def _get(conn: Connection, batch_id: str) -> BatchRecord | None:
        row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        return None if row is None else _record(row)

    def list(self, *, user: str | None, after: str | None = None, limit: int = 20
             ) -> tuple[builtins.list[BatchRecord], bool]:
        """A page of batches (of ``user``, or everyone's for None), newest first.

        Returns:
            ``(batches, has_more)``.

        Raises:
            LookupError: ``after`` is not a batch this listing shows.
        """
        t = batches
        q = select(t)
        if user is not None:
            q = q.where(t.c.user == user)
        with self.engine.connect() as conn:
            if after is not None:
                cur = conn.execute(q.where(t.c.id == after)).first()
                if cur is None:
                    raise LookupError(after)
                c_at = cur._mapping["created_at"]
                q = q.where(or_(t.c.created_at < c_at,
                                and_(t.c.created_at == c_at, t.c.id < after)))
            rows = conn.execute(q.order_by(t.c.created_at.desc(), t.c.id.desc())
                                .limit(limit + 1)).all()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, batch_id: str, now: float) -> tuple[BatchRecord, bool]:
        """Move a ``validating`` or ``in_progress`` batch to ``cancelling``.

        Returns:
            ``(record, changed)``; ``changed`` is False when it was not in one of those
            statuses (the record tells which it is in).

        Raises:
            LookupError: no such batch.
        """
        with self.engine.begin() as conn:
            n = conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.status.in_(("validating", "in_progress"))
            ).values(status="cancelling", cancelling_at=_dt(now))).rowcount
            rec = self._get(conn, batch_id)
        if rec is None:
            raise LookupError(batch_id)
        return rec, bool(n)

    # --- the runner's side -------------------------------------------------------------
    def claim(self, runner_id: str, now: float, lease_s: float, *, limit: int,
              busy_users: dict[str, int] | None = None) -> builtins.list[BatchRecord]:
        """Take up to ``limit`` active jobs that no runner holds a live lease on.

        The oldest job of a user with the fewest jobs in ``busy_users`` (the caller's
        running jobs per user) goes first, so one user's queue of jobs does not hold
        everyone else's back. The claim is one conditional update per job: of two
        gateways racing for a job, one gets it.
        """
        if limit <= 0:
            return []
        t = batches.c
        free = or_(t.runner_id.is_(None), t.lease_expires_at < _dt(now))
        busy = dict(busy_users or {})
        claimed: builtins.list[BatchRecord] = []
        with self.engine.begin() as conn:
            rows = conn.execute(select(t.id, t.user, t.created_at)
                                .where(t.status.in_(ACTIVE_STATUSES), free)
                                .order_by(t.created_at, t.id).limit(100)).all()
            pending = [(r.id, r.user) for r in rows]
            while pending and len(claimed) < limit:
                pending.sort(key=lambda iu: busy.get(iu[1], 0))  # stable: oldest first
                batch_id, user = pending.pop(0)
                n = conn.execute(update(batches).where(t.id == batch_id, free).values(
                    runner_id=runner_id, lease_expires_at=_dt(now + lease_s))).rowcount
                if n:
                    rec = self._get(conn, batch_id)
                    assert rec is not None
                    claimed.append(rec)
                    busy[user] = busy.get(user, 0) + 1
        return claimed

    def renew(self, runner_id: str, batch_ids: Iterable[str], now: float, lease_s: float
              ) -> dict[str, str]:
        """Extend the leases ``runner_id`` holds on ``batch_ids``.

        Returns:
            ``{batch_id: status}`` of the jobs it still holds (a job missing from it was
            taken over, or ended).
        """
        ids = builtins.list(batch_ids)
        if not ids:
            return {}
        t = batches.c
        with self.engine.begin() as conn:
            conn.execute(update(batches).where(t.runner_id == runner_id, t.id.in_(ids))
                         .values(lease_expires_at=_dt(now + lease_s)))
            rows = conn.execute(select(t.id, t.status)
                                .where(t.runner_id == runner_id, t.id.in_(ids))).all()
        return {r.id: r.status for r in rows}

    def release(self, runner_id: str, batch_ids: Iterable[str]) -> None:
        """Give up the leases on ``batch_ids``: another runner may resume them at once."""
        ids = builtins.list(batch_ids)
        if ids:
            t = batches.c
            with self.engine.begin() as conn:
                conn.execute(update(batches).where(t.runner_id == runner_id, t.id.in_(ids))
                             .values(runner_id=None, lease_expires_at=None))

    def successor_key(self, key_id: str) -> str | None:
        """The newest key made by rotating ``key_id`` (``teamgpu keys rotate``), or None."""
        c = api_keys.c
        with self.engine.connect() as conn:
            row = conn.execute(select(c.id).where(c.rotated_from == key_id)
                               .order_by(c.created_at.desc()).limit(1)).first()
        return None if row is None else str(row[0])

    def validate(self, batch_id: str, *, max_lines: int, now: float) -> BatchRecord:
        """Check the input file of a ``validating`` batch and store its items.

        A first pass reads the file and checks every line (no write); if any line is
        invalid the batch is ``failed`` with ``errors.data``. Otherwise the items are
        inserted in short transactions (the audit writer is never held up for long) and the
        batch goes ``in_progress``, unless it was cancelled meanwhile. Safe to run again
        after a stop half-way: earlier items of the batch are replaced.
        """
        rec = self.get(batch_id)
        if rec is None:
            raise LookupError(batch_id)
        errors = self._check_file(rec, max_lines)
        if errors:
            with self.engine.begin() as conn:
                conn.execute(update(batches).where(
                    batches.c.id == batch_id, batches.c.status.in_(("validating",
                                                                    "cancelling"))
                ).values(status="failed", failed_at=_dt(now), runner_id=None,
                         lease_expires_at=None,
                         errors_json=orjson.dumps(errors).decode()))
            got = self.get(batch_id)
            assert got is not None
            return got
        with self.engine.begin() as conn:
            conn.execute(delete(batch_items).where(batch_items.c.batch_id == batch_id))
        total = 0
        rows: builtins.list[dict[str, Any]] = []
        for line_no, (cid, model, body) in self._valid_lines(rec):
            rows.append({"batch_id": batch_id, "line_no": line_no, "custom_id": cid,
                         "model": model, "body": orjson.dumps(body).decode(),
                         "state": "pending", "attempts": 0})
            total += 1
            if len(rows) >= INSERT_ROWS:
                with self.engine.begin() as conn:
                    conn.execute(insert(batch_items), rows)
                rows = []
        with self.engine.begin() as conn:
            if rows:
                conn.execute(insert(batch_items), rows)
            values: dict[str, Any] = {
                "total": total, "output_file_id": rec.output_file_id or new_file_id(),
                "error_file_id": rec.error_file_id or new_file_id()}
            conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))
            conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.status == "validating"
            ).values(status="in_progress", in_progress_at=_dt(now)))
            got = self._get(conn, batch_id)
        assert got is not None
        return got

    def _lines(self, rec: BatchRecord) -> Iterator[tuple[int, bytes]]:
        for line_no, raw in self.files.iter_lines(rec.input_file_id):
            if raw.strip():
                yield line_no, raw

    def _check_file(self, rec: BatchRecord, max_lines: int) -> builtins.list[BatchErrorEntry]:
        f = self.files.get(rec.input_file_id)
        if f is None or f.user != rec.user:
            return [{"code": "file_not_found", "message": f"The input file "
                     f"{rec.input_file_id!r} no longer exists.", "param": "input_file_id",
                     "line": None}]
        seen: set[str] = set()
        errors: builtins.list[BatchErrorEntry] = []
        n_errors = 0
        n = 0
        for line_no, raw in self._lines(rec):
            n += 1
            if n > max_lines:
                return [{"code": "too_many_tasks", "message": f"The input file has more "
                         f"than batch_max_lines ({max_lines}) requests.", "param": None,
                         "line": line_no}]
            got = check_line(line_no, raw, rec.endpoint, seen)
            if isinstance(got, dict):
                n_errors += 1
                if len(errors) < MAX_LISTED_ERRORS:
                    errors.append(got)
        if n == 0:
            return [{"code": "empty_file", "message": "The input file has no requests.",
                     "param": "input_file_id", "line": None}]
        if n_errors > len(errors):
            errors.append({"code": "too_many_errors", "message": f"{n_errors - len(errors)} "
                           "more invalid lines are not listed.", "param": None, "line": None})
        return errors

    def _valid_lines(self, rec: BatchRecord
                     ) -> Iterator[tuple[int, tuple[str, str, dict[str, Any]]]]:
        seen: set[str] = set()
        for line_no, raw in self._lines(rec):
            got = check_line(line_no, raw, rec.endpoint, seen)
            if isinstance(got, tuple):  # always (files never change): the first pass passed
                yield line_no, got

    def pending(self, batch_id: str, *, after_line: int, limit: int) -> builtins.list[Item]:
        """Pending items after ``after_line``, in line order."""
        c = batch_items.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(c.line_no, c.custom_id, c.model, c.body, c.attempts)
                .where(c.batch_id == batch_id, c.state == "pending", c.line_no > after_line)
                .order_by(c.line_no).limit(limit)).all()
        return [Item(line_no=r.line_no, custom_id=r.custom_id, model=r.model,
                     body=orjson.loads(r.body), attempts=int(r.attempts)) for r in rows]

    def start_attempt(self, batch_id: str, line_no: int) -> None:
        """Count an attempt of an item before it runs (so that a rerun after a stop gets a
        request id of its own)."""
        c = batch_items.c
        with self.engine.begin() as conn:
            conn.execute(update(batch_items).where(c.batch_id == batch_id, c.line_no == line_no)
                         .values(attempts=c.attempts + 1))

    def record(self, rec: BatchRecord, line_no: int, *, status: int, line: bytes,
               prompt_tokens: int, completion_tokens: int, now: float) -> bool:
        """Record an item's final answer: a 2xx goes to the output file and counts as
        completed, anything else to the error file and counts as failed.

        Returns:
            False, and changes nothing, when the item was not pending any more.
        """
        ok = 200 <= status < 300
        file_id = rec.output_file_id if ok else rec.error_file_id
        assert file_id is not None, "a job runs only after validation set its files"
        c = batch_items.c
        with self.engine.begin() as conn:
            n = conn.execute(update(batch_items).where(
                c.batch_id == rec.id, c.line_no == line_no, c.state == "pending"
            ).values(state="done" if ok else "failed", status_code=status,
                     finished_at=_dt(now))).rowcount
            if not n:
                return False
            FileStore.append_chunk(conn, file_id, line_no, line)
            counter = batches.c.completed if ok else batches.c.failed
            conn.execute(update(batches).where(batches.c.id == rec.id).values({
                counter: counter + 1,
                batches.c.prompt_tokens: batches.c.prompt_tokens + prompt_tokens,
                batches.c.completion_tokens: batches.c.completion_tokens + completion_tokens,
            }))
        return True

    def start_finalizing(self, batch_id: str, now: float) -> bool:
        """``in_progress`` -> ``finalizing``; False if the batch is in another status (a
        cancel came first)."""
        with self.engine.begin() as conn:
            n = conn.execute(update(batches).where(
                batches.c.id == batch_id, batches.c.status == "in_progress"
            ).values(status="finalizing", finalizing_at=_dt(now))).rowcount
        return bool(n)

    def finish(self, batch_id: str, status: str, now: float, *,
               fill_code: str | None = None) -> BatchRecord:
        """End a job in ``status`` (``completed``, ``cancelled`` or ``expired``).

        With ``fill_code`` (``batch_cancelled``, ``batch_expired``) every item still
        pending gets an error line with that code and counts as failed, a page of items per
        transaction. Then the output and error files get their rows (a file with no line
        gets none, and the batch shows no id for it) and the batch its status, its
        timestamp and no lease. Safe to run again after a stop half-way.
        """
        rec = self.get(batch_id)
        if rec is None:
            raise LookupError(batch_id)
        if fill_code is not None and rec.error_file_id is not None:
            message = FILL_MESSAGES[fill_code]
            c = batch_items.c
            while True:
                with self.engine.begin() as conn:
                    rows = conn.execute(
                        select(c.line_no, c.custom_id)
                        .where(c.batch_id == batch_id, c.state == "pending")
                        .order_by(c.line_no).limit(INSERT_ROWS)).all()
                    if not rows:
                        break
                    for r in rows:
                        FileStore.append_chunk(conn, rec.error_file_id, r.line_no,
                                               error_line(r.custom_id, fill_code, message))
                    conn.execute(update(batch_items).where(
                        c.batch_id == batch_id, c.line_no.in_([r.line_no for r in rows])
                    ).values(state="failed", finished_at=_dt(now)))
                    conn.execute(update(batches).where(batches.c.id == batch_id).values(
                        failed=batches.c.failed + len(rows)))
        with self.engine.begin() as conn:
            values: dict[str, Any] = {"status": status, f"{status}_at": _dt(now),
                                      "runner_id": None, "lease_expires_at": None}
            for col, kind in (("output_file_id", "output"), ("error_file_id", "error")):
                fid = getattr(rec, col)
                if fid is not None and not FileStore.publish(
                        conn, fid, user=rec.user, key_id=rec.key_id, purpose="batch_output",
                        filename=f"{batch_id}_{kind}.jsonl", now=_dt(now)):
                    values[col] = None
            conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))
            got = self._get(conn, batch_id)
        assert got is not None
        return got

    def item_counts(self, batch_id: str) -> dict[str, int]:
        """Items per state: ``{"pending": n, "done": n, "failed": n}``."""
        c = batch_items.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(c.state, func.count()).where(c.batch_id == batch_id)
                                .group_by(c.state)).all()
        out = {"pending": 0, "done": 0, "failed": 0}
        out.update({s: int(n) for s, n in rows})
        return out
