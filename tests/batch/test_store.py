"""The batch store on SQLite and PostgreSQL: files in chunks, validation as OpenAI does
it, results recorded exactly once, job leases between runners, the end of a job."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, select

from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.batch.files import CHUNK_BYTES, FileStore
from teamgpu.batch.store import MAX_LISTED_ERRORS, BatchRecord, BatchStore, result_line
from teamgpu.store.tables import batch_file_chunks, batch_items, metadata
from tests.batch.fakes import jsonl, line, parse_jsonl

T0 = 1_750_000_000.0
DAY = 86_400


def dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def upload(files: FileStore, p: Principal, data: bytes, *, at: float = T0,
           purpose: str = "batch", name: str = "in.jsonl") -> str:
    return files.create(user=p.user, key_id=p.key_id, purpose=purpose, filename=name,
                        source=io.BytesIO(data), now=dt(at)).id


def new_batch(store: BatchStore, p: Principal, data: bytes, *, at: float = T0,
              endpoint: str = "/v1/chat/completions") -> BatchRecord:
    fid = upload(store.files, p, data, at=at)
    return store.create(principal=p, input_file_id=fid, endpoint=endpoint,
                        completion_window="24h", window_s=DAY, metadata={"k": "v"}, now=at)


def test_migrations_give_the_tables_module_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_file_is_stored_in_chunks_and_read_back_whole(engine: Engine,
                                                        alice: Principal) -> None:
    files = FileStore(engine)
    # lines that straddle chunk boundaries, CRLF endings, and no newline at the end
    data = b"".join(b"%d:" % i + b"x" * 9000 + b"\r\n" for i in range(300)) + b"last"
    assert len(data) > 2 * CHUNK_BYTES
    fid = upload(files, alice, data)
    f = files.get(fid)
    assert f is not None and f.bytes == len(data) and f.user == "alice"
    assert f.public()["object"] == "file" and f.public()["created_at"] == int(T0)
    assert b"".join(files.iter_content(fid)) == data
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(batch_file_chunks)
                         .where(batch_file_chunks.c.file_id == fid)).scalar_one()
    assert n == 3
    lines = list(files.iter_lines(fid))
    assert len(lines) == 301 and lines[0][0] == 1 and lines[-1] == (301, b"last")
    assert lines[299] == (300, b"299:" + b"x" * 9000)
    assert files.delete(fid) and files.get(fid) is None and not list(files.iter_content(fid))
    assert not files.delete(fid)


def test_file_listing_filters_and_pages(engine: Engine, alice: Principal) -> None:
    files = FileStore(engine)
    bob = KeyStore(engine).create("bob")[1]
    mine = [upload(files, alice, b"{}", at=T0 + i) for i in range(5)]
    same_second = [upload(files, alice, b"{}", at=T0 + 10) for _ in range(3)]
    upload(files, bob, b"{}", at=T0 + 3)
    out = upload(files, alice, b"{}", at=T0 + 20, purpose="batch_output")
    got, more = files.list(user="alice")
    assert got[0].id == out and len(got) == 9 and not more
    assert all(f.user == "alice" for f in got)
    assert len(files.list(user=None)[0]) == 10
    assert [f.id for f in files.list(user="alice", purpose="batch_output")[0]] == [out]
    # pages of 2, oldest first, through ties in created_at: every file once, in order
    seen: list[str] = []
    after = None
    while True:
        page, more = files.list(user="alice", purpose="batch", after=after, limit=2,
                                order="asc")
        seen += [f.id for f in page]
        if not more:
            break
        after = page[-1].id
    assert seen[:5] == mine and sorted(seen[5:]) == sorted(same_second) and len(seen) == 8
    desc = [f.id for f in files.list(user="alice", purpose="batch", limit=100)[0]]
    assert desc == seen[::-1]
    with pytest.raises(LookupError):
        files.list(user="bob", after=mine[0])  # alice's file is no cursor for bob


def test_a_valid_file_becomes_pending_items(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    data = jsonl([line("a"), line("b", model="other")]) + b"\n  \n" + jsonl([line("c")])
    rec = new_batch(store, alice, data)
    assert rec.status == "validating" and rec.metadata == {"k": "v"}
    assert rec.expires_at == dt(T0 + DAY)
    got = store.validate(rec.id, max_lines=10, now=T0 + 1)
    assert got.status == "in_progress" and got.total == 3
    assert got.in_progress_at == dt(T0 + 1)
    assert got.output_file_id and got.error_file_id
    items = store.pending(got.id, after_line=0, limit=10)
    assert [(i.line_no, i.custom_id, i.model) for i in items] == [
        (1, "a", "m"), (2, "b", "other"), (5, "c", "m")]  # physical line numbers
    assert items[0].body["messages"][0]["content"] == "a"
    assert [i.line_no for i in store.pending(got.id, after_line=2, limit=10)] == [5]
    # validating again (a runner stopped half-way) replaces the items, adds none
    store.validate(rec.id, max_lines=10, now=T0 + 2)
    assert store.item_counts(rec.id) == {"pending": 3, "done": 0, "failed": 0}


def test_invalid_lines_fail_the_batch_with_errors_per_line(engine: Engine,
                                                           alice: Principal) -> None:
    store = BatchStore(engine)
    bad = [
        b"not json",
        b"[1, 2]",
        orjson.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        orjson.dumps(line("dup")),
        orjson.dumps(line("dup")),
        orjson.dumps({**line("g"), "method": "GET"}),
        orjson.dumps(line("u", url="/v1/embeddings")),
        orjson.dumps({**line("nb"), "body": "text"}),
        orjson.dumps({**line("nm"), "body": {"messages": []}}),
        orjson.dumps({**line("st"), "body": {"model": "m", "stream": True}}),
        # decodes (orjson reads 1,024 levels) but cannot be stored (it writes about 250)
        orjson.dumps({**line("deep"), "body": {"model": "m"}})[:-2]
        + b', "x": ' + b"[" * 300 + b"]" * 300 + b"}}",
    ]
    rec = new_batch(store, alice, b"\n".join(bad) + b"\n")
    got = store.validate(rec.id, max_lines=100, now=T0 + 1)
    assert got.status == "failed" and got.failed_at == dt(T0 + 1) and got.total == 0
    assert got.errors is not None
    assert [(e["line"], e["code"], e["param"]) for e in got.errors] == [
        (1, "invalid_json_line", None),
        (2, "invalid_json_line", None),
        (3, "missing_required_parameter", "custom_id"),
        (5, "duplicate_custom_id", "custom_id"),
        (6, "invalid_method", "method"),
        (7, "url_mismatch", "url"),
        (8, "missing_required_parameter", "body"),
        (9, "missing_required_parameter", "body.model"),
        (10, "invalid_value", "body.stream"),
        (11, "invalid_value", "body"),
    ]
    assert all(e["message"] for e in got.errors)
    pub = got.public()
    assert pub["errors"] == {"object": "list", "data": got.errors}
    assert pub["output_file_id"] is None and pub["error_file_id"] is None
    assert store.item_counts(rec.id)["pending"] == 0


@pytest.mark.parametrize(("data", "code"), [
    (b"", "empty_file"), (b"\n\n", "empty_file"),
    (jsonl([line(str(i)) for i in range(4)]), "too_many_tasks")])
def test_whole_file_errors(engine: Engine, alice: Principal, data: bytes, code: str) -> None:
    store = BatchStore(engine)
    rec = new_batch(store, alice, data)
    got = store.validate(rec.id, max_lines=3, now=T0)
    assert got.status == "failed" and got.errors is not None
    assert [e["code"] for e in got.errors] == [code]


def test_many_invalid_lines_are_listed_up_to_a_bound(engine: Engine,
                                                     alice: Principal) -> None:
    store = BatchStore(engine)
    rec = new_batch(store, alice, b"x\n" * (MAX_LISTED_ERRORS + 30))
    got = store.validate(rec.id, max_lines=1000, now=T0)
    assert got.errors is not None and len(got.errors) == MAX_LISTED_ERRORS + 1
    assert got.errors[-1]["code"] == "too_many_errors" and "30 more" in got.errors[-1]["message"]


def test_a_result_is_recorded_once(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    rec = store.validate(new_batch(store, alice, jsonl([line("a"), line("b")])).id,
                         max_lines=10, now=T0)
    ok = result_line("a", 200, "rid-1", {"usage": {"prompt_tokens": 3}})
    assert store.record(rec, 1, status=200, line=ok, prompt_tokens=3, completion_tokens=5,
                        now=T0 + 1)
    # a second answer for the same item (a rerun, another runner) changes nothing
    assert not store.record(rec, 1, status=200, line=ok, prompt_tokens=3,
                            completion_tokens=5, now=T0 + 2)
    err = result_line("b", 400, "rid-2", {"error": {"message": "no"}})
    assert store.record(rec, 2, status=400, line=err, prompt_tokens=0, completion_tokens=0,
                        now=T0 + 3)
    got = store.get(rec.id)
    assert got is not None
    assert (got.completed, got.failed, got.prompt_tokens, got.completion_tokens) == (1, 1, 3, 5)
    assert rec.output_file_id and rec.error_file_id
    assert b"".join(store.files.iter_content(rec.output_file_id)) == ok
    assert b"".join(store.files.iter_content(rec.error_file_id)) == err
    with engine.connect() as conn:
        states = dict(conn.execute(select(batch_items.c.custom_id, batch_items.c.state)
                                   .where(batch_items.c.batch_id == rec.id)).all())
    assert states == {"a": "done", "b": "failed"}


def test_finishing_fills_unanswered_items_and_publishes_the_files(
        engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    rec = store.validate(new_batch(store, alice, jsonl([line(c) for c in "abcd"])).id,
                         max_lines=10, now=T0)
    store.record(rec, 2, status=200, line=result_line("b", 200, "r", {}), prompt_tokens=0,
                 completion_tokens=0, now=T0 + 1)
    got, changed = store.request_cancel(rec.id, T0 + 2)
    assert changed and got.status == "cancelling" and got.cancelling_at == dt(T0 + 2)
    assert store.request_cancel(rec.id, T0 + 3)[1] is False  # already cancelling
    done = store.finish(rec.id, "cancelled", T0 + 4, fill_code="batch_cancelled")
    assert done.status == "cancelled" and done.cancelled_at == dt(T0 + 4)
    assert (done.total, done.completed, done.failed) == (4, 1, 3)
    assert done.runner_id is None
    pub = done.public()
    assert pub["output_file_id"] == rec.output_file_id
    assert pub["error_file_id"] == rec.error_file_id
    assert rec.output_file_id and rec.error_file_id
    out = store.files.get(rec.output_file_id)
    assert out is not None and out.purpose == "batch_output" and out.user == "alice"
    errs = parse_jsonl(b"".join(store.files.iter_content(rec.error_file_id)))
    assert [(e["custom_id"], e["error"]["code"], e["response"]) for e in errs] == [
        ("a", "batch_cancelled", None), ("c", "batch_cancelled", None),
        ("d", "batch_cancelled", None)]
    err_file = store.files.get(rec.error_file_id)
    assert err_file is not None
    assert err_file.bytes == len(b"".join(store.files.iter_content(rec.error_file_id)))
    # finishing again (a stop half-way) adds nothing
    again = store.finish(rec.id, "cancelled", T0 + 5, fill_code="batch_cancelled")
    assert (again.completed, again.failed) == (1, 3)
    assert store.request_cancel(rec.id, T0 + 6)[1] is False


def test_a_job_with_no_errors_shows_no_error_file(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    rec = store.validate(new_batch(store, alice, jsonl([line("a")])).id, max_lines=10, now=T0)
    store.record(rec, 1, status=200, line=result_line("a", 200, "r", {}), prompt_tokens=0,
                 completion_tokens=0, now=T0)
    assert store.start_finalizing(rec.id, T0 + 1)
    assert not store.start_finalizing(rec.id, T0 + 1)
    done = store.finish(rec.id, "completed", T0 + 2)
    assert done.status == "completed" and done.finalizing_at == dt(T0 + 1)
    assert done.completed_at == dt(T0 + 2)
    assert done.error_file_id is None and done.output_file_id == rec.output_file_id
    assert rec.error_file_id is not None and store.files.get(rec.error_file_id) is None


def test_leases_keep_a_job_with_one_runner(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    rec = new_batch(store, alice, jsonl([line("a")]))
    assert [r.id for r in store.claim("A", T0, 30, limit=4)] == [rec.id]
    assert store.claim("B", T0 + 1, 30, limit=4) == []
    assert store.renew("A", [rec.id], T0 + 20, 30) == {rec.id: "validating"}
    assert store.claim("B", T0 + 40, 30, limit=4) == []      # renewed until T0 + 50
    taken = store.claim("B", T0 + 51, 30, limit=4)            # A stopped renewing
    assert [r.id for r in taken] == [rec.id] and taken[0].runner_id == "B"
    assert store.renew("A", [rec.id], T0 + 52, 30) == {}      # A learns it lost the job
    store.release("B", [rec.id])
    assert [r.id for r in store.claim("A", T0 + 53, 30, limit=4)] == [rec.id]


def test_claims_go_to_the_least_busy_users_first(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    bob = KeyStore(engine).create("bob")[1]
    a1 = new_batch(store, alice, jsonl([line("a")]), at=T0)
    a2 = new_batch(store, alice, jsonl([line("a")]), at=T0 + 1)
    b1 = new_batch(store, bob, jsonl([line("b")]), at=T0 + 2)
    got = store.claim("A", T0 + 3, 30, limit=2)
    assert [r.id for r in got] == [a1.id, b1.id]  # bob's job before alice's second one
    assert [r.id for r in store.claim("A", T0 + 3, 30, limit=2)] == [a2.id]
    assert store.claim("A", T0 + 3, 30, limit=0) == []


def test_batches_are_listed_newest_first_in_pages(engine: Engine, alice: Principal) -> None:
    store = BatchStore(engine)
    bob = KeyStore(engine).create("bob")[1]
    ids = [new_batch(store, alice, jsonl([line("a")]), at=T0 + i // 2).id for i in range(7)]
    new_batch(store, bob, jsonl([line("a")]))
    seen: list[str] = []
    after = None
    while True:
        page, more = store.list(user="alice", after=after, limit=3)
        seen += [b.id for b in page]
        if not more:
            break
        after = page[-1].id
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    created = [store.get(i).created_at for i in seen]  # type: ignore[union-attr]
    assert created == sorted(created, reverse=True)
    assert len(store.list(user=None, limit=100)[0]) == 8
    with pytest.raises(LookupError):
        store.list(user="bob", after=ids[0])
    assert store.get("batch_none") is None
    assert dt(T0) + timedelta(seconds=DAY) == store.get(ids[0]).expires_at  # type: ignore[union-attr]
