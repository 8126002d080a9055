"""The Batch API through the real gateway (issue 10): items run down the pipeline at the
batch class, with the owner's limits and fair share, one audit row each with the batch id;
the official ``openai`` SDK for every call; ownership; a limit pauses a job instead of
failing its items; a job survives a gateway restart without re-running finished items.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from teamgpu.auth.keys import KeyStore
from teamgpu.store.db import open_store
from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, start_gateway, wait_until

FAST: dict[str, Any] = {"batch_poll_interval_s": 0.1}
Backend = tuple[FakeBackend, ServerThread]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def chat_line(custom_id: str, *, tokens: int = 3, delay_s: float = 0.0,
              model: str = MODEL) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 8,
                     "messages": [{"role": "user", "content": custom_id}],
                     "fake": {"tokens": tokens, "delay_s": delay_s}}}


class Clients:
    """The SDK clients a test made, closed at its end."""

    def __init__(self) -> None:
        self.made: list[openai.OpenAI] = []

    def __call__(self, h: Harness, key: str) -> openai.OpenAI:
        c = openai.OpenAI(base_url=h.url + "/v1", api_key=key, max_retries=0,
                          http_client=openai.DefaultHttpxClient(trust_env=False, timeout=10.0))
        self.made.append(c)
        return c


@pytest.fixture
def sdk() -> Iterator[Clients]:
    clients = Clients()
    yield clients
    for c in clients.made:
        c.close()


def wait_done(client: openai.OpenAI, batch_id: str, timeout_s: float = 20.0
              ) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.05)


def submit(client: openai.OpenAI, lines: list[dict[str, Any]]) -> openai.types.Batch:
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


@pytest.fixture
def backend() -> Iterator[Backend]:
    fake = FakeBackend()
    with ServerThread(fake) as t:
        yield fake, t


def test_a_batch_runs_through_the_pipeline_at_the_batch_class(
        tmp_path: Path, backend: Backend, sdk: Clients) -> None:
    fake, server = backend
    with start_gateway(tmp_path / "gw", [server.url], **FAST) as h:
        c = sdk(h, h.user_key)
        b = submit(c, [chat_line(f"item-{i}") for i in range(5)]
                   + [chat_line("bad-model", model="no-such-model")])
        done = wait_done(c, b.id)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
        assert done.output_file_id is not None and done.error_file_id is not None
        out = {o["custom_id"]: o for o in map(json.loads, c.files.content(
            done.output_file_id).text.splitlines())}
        assert sorted(out) == [f"item-{i}" for i in range(5)]
        assert all(o["response"]["status_code"] == 200 for o in out.values())
        errs = [json.loads(x) for x in c.files.content(done.error_file_id).text.splitlines()]
        assert [(e["custom_id"], e["response"]["status_code"]) for e in errs] == [
            ("bad-model", 404)]
        # the backend saw each item once, sent by the gateway at vLLM priority 2 (low)
        items = [r for r in fake.requests if r["path"] == "/v1/chat/completions"]
        assert len(items) == 5 and {r["body"]["priority"] for r in items} == {2}
        h.flush()
        rows = [r for r in h.rows() if r["batch_id"] == b.id]
        assert len(rows) == 6  # one per item, the refused one included
        ok = [r for r in rows if r["outcome"] == "ok"]
        assert len(ok) == 5 and {r["priority"] for r in ok} == {"low"}
        assert all(r["user"] == "alice" and r["completion_tokens"] == 3 for r in ok)
        # the Batch API's own requests are audited too, but are not usage
        assert {r["endpoint"] for r in h.rows() if r["batch_id"] is None} >= {
            "files.create", "batches.create", "batches.retrieve", "files.content"}


def test_another_user_gets_404_everywhere(
        tmp_path: Path, backend: Backend, sdk: Clients) -> None:
    _, server = backend
    with start_gateway(tmp_path / "gw", [server.url], **FAST) as h:
        bob_key, _ = KeyStore(h.gw.store).create("bob")
        alice, bob = sdk(h, h.user_key), sdk(h, bob_key)
        b = submit(alice, [chat_line("x")])
        done = wait_done(alice, b.id)
        assert done.output_file_id is not None
        for call in (lambda: bob.batches.retrieve(b.id),
                     lambda: bob.batches.cancel(b.id),
                     lambda: bob.files.retrieve(b.input_file_id),
                     lambda: bob.files.content(b.input_file_id),
                     lambda: bob.files.content(done.output_file_id or ""),
                     lambda: bob.files.delete(b.input_file_id)):
            with pytest.raises(openai.NotFoundError):
                call()
        assert [x.id for x in bob.batches.list()] == []
        assert [x.id for x in bob.files.list()] == []


def test_a_limit_pauses_the_job_instead_of_failing_items(
        tmp_path: Path, backend: Backend, sdk: Clients) -> None:
    """A key allowed one request at a time: the job keeps more in flight than that, the
    extra ones are refused (429 with Retry-After) and retried after the pause; no item
    fails and the backend never sees two at once."""
    fake, server = backend
    with start_gateway(tmp_path / "gw", [server.url], **FAST) as h:
        key, _ = KeyStore(h.gw.store).create("one-at-a-time", limits={"max_concurrent": 1})
        c = sdk(h, key)
        peak = {"n": 0}
        b = submit(c, [chat_line(f"i{i}", tokens=2, delay_s=0.05) for i in range(4)])
        deadline = time.monotonic() + 30
        while (st := c.batches.retrieve(b.id)).status not in ("completed", "failed"):
            peak["n"] = max(peak["n"], fake.active)
            assert time.monotonic() < deadline, st
            time.sleep(0.01)
        assert st.status == "completed"
        assert st.request_counts is not None
        assert (st.request_counts.completed, st.request_counts.failed) == (4, 0)
        assert peak["n"] <= 1
        h.flush()
        rows = [r for r in h.rows() if r["batch_id"] == b.id]
        assert len(rows) == 4 and {r["outcome"] for r in rows} == {"ok"}  # one per item


def test_a_job_survives_a_gateway_restart(
        tmp_path: Path, backend: Backend, sdk: Clients) -> None:
    """Stopped mid-job, a new gateway on the same store resumes it: items answered before
    the stop are not sent again; the ones in flight at the stop run again."""
    fake, server = backend
    data = tmp_path / "gw"
    lines = [chat_line(f"i{i:02d}", tokens=2, delay_s=0.1) for i in range(12)]
    with start_gateway(data, [server.url], max_inflight_per_backend=5,
                       reserved_slots_high=1, reserved_slots_normal=1, **FAST) as h:
        alice_key = h.user_key
        c = sdk(h, alice_key)
        b = submit(c, lines)
        wait_until(lambda: (c.batches.retrieve(b.id).request_counts or
                            openai.types.BatchRequestCounts(completed=0, failed=0, total=0)
                            ).completed >= 4, 20, "some items done")
    sent_before = {r["body"]["messages"][0]["content"] for r in fake.requests
                   if r["path"] == "/v1/chat/completions"}
    store = open_store(f"sqlite:///{data / 'teamgpu.db'}")
    done_before = _answered(store, b.id)
    assert 4 <= len(done_before) < 12
    n_before = len(fake.requests)
    # a new gateway on the same data directory (its own keys fixture is not used)
    from teamgpu.app import create_app
    from teamgpu.settings import Settings
    from tests.support.harness import Harness as H

    s = Settings(data_dir=data, backends=[server.url], **FAST)
    with ServerThread(create_app(s, store=open_store(s.db_url))) as thread:
        h2 = H(app=thread.server.config.app, thread=thread, settings=s, admin_key="",
               user_key=alice_key)
        c2 = sdk(h2, alice_key)
        done = wait_done(c2, b.id, 30)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (12, 0)
        assert done.output_file_id is not None
        out = [json.loads(x) for x in c2.files.content(done.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in out) == [f"i{i:02d}" for i in range(12)]
    resent = [r["body"]["messages"][0]["content"] for r in fake.requests[n_before:]
              if r["path"] == "/v1/chat/completions"]
    assert not set(resent) & done_before  # nothing answered before the stop ran again
    assert set(resent) | done_before == {f"i{i:02d}" for i in range(12)}
    assert sent_before >= done_before


def _answered(store: Any, batch_id: str) -> set[str]:
    """The custom ids of the items answered so far (the store's own table)."""
    from sqlalchemy import text

    with store.connect() as conn:
        rows = conn.execute(text("SELECT custom_id FROM batch_items WHERE batch_id = :b "
                                 "AND state = 'done'"), {"b": batch_id}).all()
    return {r[0] for r in rows}


def test_invalid_lines_fail_the_batch_with_line_errors(
        tmp_path: Path, backend: Backend, sdk: Clients) -> None:
    fake, server = backend
    with start_gateway(tmp_path / "gw", [server.url], **FAST) as h:
        c = sdk(h, h.user_key)
        bad = dict(chat_line("dup"))
        f = c.files.create(file=("in.jsonl", jsonl([chat_line("dup"), bad]) + b"not json\n"),
                           purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        done = wait_done(c, b.id)
        assert done.status == "failed"
        assert done.errors is not None and done.errors.data
        assert {e.line for e in done.errors.data} == {2, 3}
        assert not [r for r in fake.requests if r["path"] == "/v1/chat/completions"]
