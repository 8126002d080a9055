"""Files of the Batch API, their content kept in the store's database.

A file is one ``batch_files`` row and its content, ``batch_file_chunks`` rows read in
``seq`` order. An upload is cut into 1 MiB chunks. A job's output and error files get one
chunk per result line, written in the same transaction that marks the item done, with
``seq`` = the item's input line number: a line is in the file exactly when its item is
recorded as finished, so a job that stops anywhere resumes without lost or doubled lines.
Their ``batch_files`` rows are added when the job ends (docs/batch.md, "Storage").

Every method is synchronous (SQLAlchemy Core); the routes and the runner call them in a
worker thread.
"""

from __future__ import annotations

import builtins  # FileStore.list shadows the built-in in the class's annotations
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Literal

from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select

from teamgpu.batch.protocol import FileObject
from teamgpu.store.tables import batch_file_chunks, batch_files

__all__ = ["CHUNK_BYTES", "FileStore", "StoredFile", "aware", "new_file_id", "page_chunks",
           "unix"]

CHUNK_BYTES = 1 << 20


def page_chunks(purpose: str) -> int:
    """Chunks to read at a time: uploads have 1 MiB chunks, job results one line each."""
    return 256 if purpose == "batch_output" else 4


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def aware(dt: datetime) -> datetime:
    """``dt`` in UTC (SQLite gives naive datetimes back)."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def unix(dt: datetime | None) -> int | None:
    return None if dt is None else int(aware(dt).timestamp())


@dataclass(frozen=True)
class StoredFile:
    id: str
    user: str
    key_id: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: datetime

    def public(self) -> FileObject:
        """The OpenAI file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": int(aware(self.created_at).timestamp()),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


def _stored(row: Any) -> StoredFile:
    m = row._mapping
    return StoredFile(id=m["id"], user=m["user"], key_id=m["key_id"], purpose=m["purpose"],
                      filename=m["filename"], bytes=int(m["bytes"]),
                      created_at=aware(m["created_at"]))


class FileStore:
    """Files in the store. Safe to call from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, *, user: str, key_id: str | None, purpose: str, filename: str,
               source: IO[bytes], now: datetime) -> StoredFile:
        """Store the bytes read from ``source`` as a new file (one transaction)."""
        file_id = new_file_id()
        size = 0
        with self.engine.begin() as conn:
            seq = 0
            while chunk := source.read(CHUNK_BYTES):
                conn.execute(insert(batch_file_chunks).values(file_id=file_id, seq=seq,
                                                              data=chunk))
                size += len(chunk)
                seq += 1
            conn.execute(insert(batch_files).values(
                id=file_id, user=user, key_id=key_id, purpose=purpose,
                filename=filename[:256], bytes=size, created_at=now))
        got = self.get(file_id)
        assert got is not None
        return got

    def get(self, file_id: str) -> StoredFile | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(batch_files).where(batch_files.c.id == file_id)).first()
        return None if row is None else _stored(row)

    def list(self, *, user: str | None, purpose: str | None = None, after: str | None = None,
             limit: int = 10_000, order: Literal["asc", "desc"] = "desc"
             ) -> tuple[builtins.list[StoredFile], bool]:
        """A page of files (of ``user``, or everyone's for None) by ``created_at``.

        Returns:
            ``(files, has_more)``.

        Raises:
            LookupError: ``after`` is not a file this listing shows.
        """
        t = batch_files
        q = select(t)
        if user is not None:
            q = q.where(t.c.user == user)
        if purpose is not None:
            q = q.where(t.c.purpose == purpose)
        with self.engine.connect() as conn:
            if after is not None:
                cur = conn.execute(q.where(t.c.id == after)).first()
                if cur is None:
                    raise LookupError(after)
                c_at = cur._mapping["created_at"]
                if order == "desc":
                    q = q.where(or_(t.c.created_at < c_at,
                                    and_(t.c.created_at == c_at, t.c.id < after)))
                else:
                    q = q.where(or_(t.c.created_at > c_at,
                                    and_(t.c.created_at == c_at, t.c.id > after)))
            if order == "desc":
                q = q.order_by(t.c.created_at.desc(), t.c.id.desc())
            else:
                q = q.order_by(t.c.created_at, t.c.id)
            rows = conn.execute(q.limit(limit + 1)).all()
        files = [_stored(r) for r in rows[:limit]]
        return files, len(rows) > limit

    def delete(self, file_id: str) -> bool:
        """Delete a file and its content. Returns whether it existed."""
        with self.engine.begin() as conn:
            n = conn.execute(delete(batch_files).where(batch_files.c.id == file_id)).rowcount
            conn.execute(delete(batch_file_chunks).where(batch_file_chunks.c.file_id == file_id))
        return bool(n)

    def read_chunks(self, file_id: str, after_seq: int = -1, limit: int = 16
                    ) -> builtins.list[tuple[int, bytes]]:
        """Up to ``limit`` chunks with ``seq > after_seq``, in order: ``[(seq, data)]``."""
        c = batch_file_chunks.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(c.seq, c.data).where(c.file_id == file_id, c.seq > after_seq)
                .order_by(c.seq).limit(limit)).all()
        return [(int(s), bytes(d)) for s, d in rows]

    def iter_content(self, file_id: str, page: int = 4) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk (``page`` chunks read at a time)."""
        after = -1
        while page_ := self.read_chunks(file_id, after, page):
            for seq, data in page_:
                yield data
                after = seq

    def iter_lines(self, file_id: str) -> Iterator[tuple[int, bytes]]:
        """``(line_no, line)`` of the file's content, 1-based, without the line ending
        (``\\n`` or ``\\r\\n``); a last line without one counts too."""
        rest = b""
        n = 0
        for data in self.iter_content(file_id):
            buf = rest + data
            lines = buf.split(b"\n")
            rest = lines.pop()
            for line in lines:
                n += 1
                yield n, line.removesuffix(b"\r")
        if rest:
            yield n + 1, rest.removesuffix(b"\r")

    # --- used by the batch store, inside its own transactions --------------------------
    @staticmethod
    def append_chunk(conn: Connection, file_id: str, seq: int, data: bytes) -> None:
        conn.execute(insert(batch_file_chunks).values(file_id=file_id, seq=seq, data=data))

    @staticmethod
    def publish(conn: Connection, file_id: str, *, user: str, key_id: str | None,
                purpose: str, filename: str, now: datetime) -> bool:
        """Add the ``batch_files`` row of a file whose chunks were written already; its size
        is the sum of the chunks.

        Returns:
            Whether the file exists now: False when it has no chunk (nothing is added).
        """
        if conn.execute(select(batch_files.c.id).where(batch_files.c.id == file_id)).first():
            return True
        c = batch_file_chunks.c
        n, size = conn.execute(
            select(func.count(), func.coalesce(func.sum(func.length(c.data)), 0))
            .where(c.file_id == file_id)).one()
        if not n:
            return False
        conn.execute(insert(batch_files).values(
            id=file_id, user=user, key_id=key_id, purpose=purpose, filename=filename,
            bytes=int(size), created_at=now))
        return True
