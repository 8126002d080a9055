"""``/v1/responses`` (OpenAI Responses) through a real gateway, with the ``openai`` SDK:
create, stream, retrieve, delete, cancel, input items and ``previous_response_id``; a
stored response belongs to the user whose key created it (404 for everyone else); one
audit row per request with the engine's usage; disconnects abort the engine's work."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import orjson
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseErrorEvent,
    ResponseInputMessageItem,
    ResponseInputText,
    ResponseTextDeltaEvent,
)

from teamgpu.metrics.usage_report import usage_report
from teamgpu.scheduler import PriorityClass
from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import (
    Harness,
    assert_openai_error,
    disconnect_mid_stream,
    start_gateway,
    wait_until,
)

STREAM_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", *["response.output_text.delta"] * 3,
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed",
]


@dataclass
class Setup:
    fake: FakeBackend
    gateway: Harness
    bob_key: str  # another user's key


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs read OPENAI_* variables (base URL, key, org); none of the runner's apply."""
    for k in list(os.environ):
        if k.startswith("OPENAI_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Its own fake and gateway: the counters and stored responses are this module's."""
    fake = FakeBackend()
    with ServerThread(fake) as ft, start_gateway(tmp_path_factory.mktemp("resp"), [ft.url]) as h:
        bob_key, _ = h.gw.keys.create("bob")
        yield Setup(fake, h, bob_key)


def sdk(h: Harness, key: str | None = None) -> openai.OpenAI:
    return h.keep(openai.OpenAI(base_url=f"{h.url}/v1", api_key=key or h.user_key,
                                max_retries=0, timeout=10))


def rid_of(exc: openai.APIStatusError) -> str:
    return exc.response.headers["x-request-id"]


def texts_of(item: object) -> list[str]:
    """The texts of an input message item (OpenAI's shape: ``input_text`` parts)."""
    assert isinstance(item, ResponseInputMessageItem), item
    parts = item.content
    assert all(isinstance(p, ResponseInputText) for p in parts), parts
    return [p.text for p in parts if isinstance(p, ResponseInputText)]


# --- create ---------------------------------------------------------------------------------

def test_create_answers_and_its_row_has_the_engines_usage(setup: Setup) -> None:
    h = setup.gateway
    raw = sdk(h).responses.with_raw_response.create(
        model=MODEL, input="Say hello", extra_body={"fake": {"tokens": 3, "text": "hi "}})
    resp = raw.parse()
    assert resp.id.startswith("resp_")
    assert resp.output_text == "hi hi hi "
    assert resp.usage is not None and resp.usage.output_tokens == 3
    row = h.wait_row(raw.headers["x-request-id"])
    assert (row["user"], row["endpoint"], row["model"], row["status"], row["outcome"],
            row["stream"]) == ("alice", "responses", MODEL, 200, "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        resp.usage.input_tokens, resp.usage.output_tokens)
    sent = setup.fake.requests[-1]
    assert sent["path"] == "/v1/responses" and sent["body"]["model"] == MODEL
    assert sent["body"]["priority"] == int(PriorityClass.NORMAL)  # the class reaches vLLM


def test_stream_relays_typed_events_and_counts_the_final_usage(setup: Setup) -> None:
    h = setup.gateway
    with sdk(h).responses.with_streaming_response.create(
            model=MODEL, input="Count", stream=True,
            extra_body={"fake": {"tokens": 3, "text": "一 "}}) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    assert [e.type for e in events] == STREAM_EVENTS
    deltas = [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert deltas == ["一 "] * 3
    assert isinstance(events[-1], ResponseCompletedEvent)
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "一 一 一 "
    assert final.usage is not None
    row = h.wait_row(rid)
    assert (row["endpoint"], row["stream"], row["status"], row["outcome"]) == (
        "responses", 1, 200, "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        final.usage.input_tokens, final.usage.output_tokens)
    assert row["ttft_ms"] is not None


def test_stream_keeps_each_events_name_line(setup: Setup) -> None:
    """The relay passes vLLM's ``event:`` lines on unchanged (clients dispatch on them)."""
    with setup.gateway.client().stream("POST", "/v1/responses", json={
            "model": MODEL, "input": "x", "stream": True, "fake": {"tokens": 3}}) as r:
        raw = r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    names = []
    for ev in raw.decode().split("\n\n")[:-1]:
        head, data = ev.split("\n", 1)
        assert head.startswith("event: ") and data.startswith("data: {")
        names.append(head[len("event: "):])
        assert f'"type":"{names[-1]}"' in data
    assert names == STREAM_EVENTS


def test_sdk_stream_helper_gets_the_final_response(setup: Setup) -> None:
    with sdk(setup.gateway).responses.stream(
            model=MODEL, input="hi", extra_body={"fake": {"tokens": 2}}) as stream:
        text = "".join(e.delta for e in stream if isinstance(e, ResponseTextDeltaEvent))
        final = stream.get_final_response()
    assert text == final.output_text == "tok tok "
    assert final.usage is not None and final.usage.output_tokens == 2


# --- the owner's stored responses -------------------------------------------------------------

def test_retrieve_input_items_cancel_and_delete_for_the_owner(setup: Setup) -> None:
    h, c = setup.gateway, sdk(setup.gateway)
    created = c.responses.create(model=MODEL, input="Remember me")
    raw = c.responses.with_raw_response.retrieve(created.id)
    got = raw.parse()
    assert (got.id, got.output_text, got.status) == (created.id, created.output_text,
                                                     "completed")
    row = h.wait_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["outcome"], row["model"]) == (
        "responses.retrieve", 200, "ok", MODEL)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)

    raw_items = c.responses.input_items.with_raw_response.list(created.id)
    items = raw_items.parse()
    assert [texts_of(i) for i in items.data] == [["Remember me"]]
    assert isinstance(items.data[0], ResponseInputMessageItem)
    assert items.data[0].role == "user"
    assert h.wait_row(raw_items.headers["x-request-id"])["endpoint"] == "responses.input_items"

    # a synchronous response cannot be cancelled: vLLM's 400 comes back as it is
    with pytest.raises(openai.BadRequestError) as bad:
        c.responses.cancel(created.id)
    assert "Cannot cancel a synchronous response" in bad.value.message
    row = h.wait_row(rid_of(bad.value))
    assert (row["endpoint"], row["status"]) == ("responses.cancel", 400)

    raw_del = c.responses.with_raw_response.delete(created.id)
    assert raw_del.http_response.json() == {"id": created.id, "object": "response",
                                            "deleted": True}
    assert h.wait_row(raw_del.headers["x-request-id"])["endpoint"] == "responses.delete"
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="go on", previous_response_id=created.id)


def test_input_items_pages(setup: Setup) -> None:
    c = sdk(setup.gateway)
    created = c.responses.create(model=MODEL, input=[
        {"role": "user", "content": f"message {i}"} for i in range(5)])
    desc = c.responses.input_items.list(created.id, limit=2)
    assert [texts_of(i) for i in desc.data] == [["message 4"], ["message 3"]]
    assert desc.has_more
    # the SDK's auto-pagination follows ``after``
    every = [texts_of(i) for i in c.responses.input_items.list(created.id, limit=2, order="asc")]
    assert every == [[f"message {i}"] for i in range(5)]


def test_previous_response_id_chains_on_the_engine(setup: Setup) -> None:
    h, c = setup.gateway, sdk(setup.gateway)
    first = c.responses.create(model=MODEL, input="My name is Ada.")
    raw = c.responses.with_raw_response.create(model=MODEL, input="What is my name?",
                                               previous_response_id=first.id)
    second = raw.parse()
    assert second.previous_response_id == first.id
    assert setup.fake.requests[-1]["body"]["previous_response_id"] == first.id
    # the engine counted the conversation so far, and the row has the engine's count
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    row = h.wait_row(raw.headers["x-request-id"])
    assert row["prompt_tokens"] == second.usage.input_tokens
    # a streamed continuation of a streamed response
    with c.responses.stream(model=MODEL, input="again", previous_response_id=second.id) as s:
        third = s.get_final_response()
    assert c.responses.retrieve(third.id).previous_response_id == second.id


def test_store_false_is_neither_kept_nor_retrievable(setup: Setup) -> None:
    c = sdk(setup.gateway)
    resp = c.responses.create(model=MODEL, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(resp.id)


# --- everyone else ------------------------------------------------------------------------------

def test_another_users_key_gets_404_for_everything(setup: Setup) -> None:
    """Bob has Alice's response id: every path answers as for an id that does not exist,
    and Alice's response is untouched by his tries."""
    h, alice, bob = setup.gateway, sdk(setup.gateway), sdk(setup.gateway, setup.bob_key)
    created = alice.responses.create(model=MODEL, input="Alice's secret")
    sent = len(setup.fake.requests)
    calls: dict[str, Callable[[str], object]] = {
        "retrieve": bob.responses.retrieve,
        "input_items": bob.responses.input_items.list,
        "delete": bob.responses.delete,
        "cancel": bob.responses.cancel,
    }
    for name, call in calls.items():
        with pytest.raises(openai.NotFoundError) as theirs:
            call(created.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            call("resp_does_not_exist")
        a, b = theirs.value.response.json(), unknown.value.response.json()
        assert a["error"]["message"].replace(created.id, "ID") == \
            b["error"]["message"].replace("resp_does_not_exist", "ID"), name
        assert {**a["error"], "message": None} == {**b["error"], "message": None}, name
        assert_openai_error(theirs.value.response, 404, param="response_id",
                            code="response_not_found")
        row = h.wait_row(rid_of(theirs.value))
        assert (row["user"], row["status"], row["outcome"]) == ("bob", 404, "not_found")
        assert row["endpoint"] == f"responses.{name}"
    with pytest.raises(openai.NotFoundError) as prev:
        bob.responses.create(model=MODEL, input="continue", previous_response_id=created.id)
    assert_openai_error(prev.value.response, 404, param="previous_response_id")
    with pytest.raises(openai.NotFoundError) as prev_stream, \
            bob.responses.stream(model=MODEL, input="x", previous_response_id=created.id):
        pass
    assert prev_stream.value.status_code == 404
    row = h.wait_row(rid_of(prev.value))
    assert (row["endpoint"], row["status"], row["completion_tokens"]) == ("responses", 404, 0)
    assert len(setup.fake.requests) == sent  # nothing of Bob's reached the engine
    # Alice's response is still hers, not deleted
    assert alice.responses.retrieve(created.id).output_text == created.output_text
    assert alice.responses.input_items.list(created.id).data


def test_a_clients_request_id_cannot_take_over_another_users_response(setup: Setup) -> None:
    """vLLM names a response after the body's ``request_id`` when one is sent and stores it
    under that name, replacing what was there: Bob must not be able to overwrite Alice's
    response (nor give his own the id of hers)."""
    h, alice, bob = setup.gateway, sdk(setup.gateway), sdk(setup.gateway, setup.bob_key)
    created = alice.responses.create(model=MODEL, input="Alice's plan",
                                     extra_body={"fake": {"text": "alice "}})
    sent = len(setup.fake.requests)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            bob.responses.create(model=MODEL, input="Bob's text", stream=stream,
                                 extra_body={"request_id": created.id,
                                             "fake": {"text": "bob "}})
        assert_openai_error(exc.value.response, 400, param="request_id")
        row = h.wait_row(rid_of(exc.value))
        assert (row["user"], row["status"], row["outcome"]) == ("bob", 400, "bad_request")
    assert len(setup.fake.requests) == sent
    assert alice.responses.retrieve(created.id).output_text == created.output_text


def test_background_responses_are_refused(setup: Setup) -> None:
    """A background response is generated after the answer: its tokens would escape the
    key's limits, the fair share and the audit row. 400, and nothing reaches the engine."""
    h = setup.gateway
    sent = len(setup.fake.requests)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk(h).responses.create(model=MODEL, input="later", background=True)
    assert_openai_error(exc.value.response, 400, param="background")
    assert len(setup.fake.requests) == sent
    row = h.wait_row(rid_of(exc.value))
    assert (row["endpoint"], row["status"], row["outcome"]) == ("responses", 400, "bad_request")


# --- usage, disconnects, errors -------------------------------------------------------------------

def test_lookups_are_audited_but_not_usage(setup: Setup) -> None:
    h, c = setup.gateway, sdk(setup.gateway)
    h.flush()
    before = {g.key: g for g in usage_report(h.gw.store)}
    created = c.responses.create(model=MODEL, input="count me once")
    c.responses.retrieve(created.id)
    c.responses.input_items.list(created.id)
    c.responses.delete(created.id)
    wait_until(lambda: len(h.rows()) >= 4, what="the rows")
    h.flush()
    after = {g.key: g for g in usage_report(h.gw.store)}
    assert after["alice"].requests == before["alice"].requests + 1
    assert created.usage is not None
    assert after["alice"].prompt_tokens - before["alice"].prompt_tokens == \
        created.usage.input_tokens


def test_client_disconnect_mid_stream_aborts_the_generation(setup: Setup) -> None:
    fake, h = setup.fake, setup.gateway
    body = {"model": MODEL, "input": "a long essay", "stream": True, "max_output_tokens": 500,
            "fake": {"tokens": 500, "delay_s": 0.1}}
    _, buf = disconnect_mid_stream(h, fake, "/v1/responses", body, b"response.output_text.delta")
    # the response never completed: neither the engine nor the gateway keeps it
    created = orjson.loads(buf.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    resp_id = created["response"]["id"]
    assert resp_id not in fake.responses
    assert h.gw.responses.store.get(resp_id) is None


def test_a_stream_that_breaks_ends_with_an_error_event(setup: Setup) -> None:
    """The Responses API's own error event (``type``, ``code``, ``message``, ``param``),
    named by an ``event:`` line like every other event; the SDK reads it as such."""
    h = setup.gateway
    body = {"model": MODEL, "input": "x", "stream": True, "fake": {"tokens": 6, "break_after": 2}}
    with h.client().stream("POST", "/v1/responses", json=body) as r:
        raw = r.read()
    head, data = raw.split(b"\n\n")[-2].split(b"\n", 1)
    assert head == b"event: error"
    obj = orjson.loads(data[len(b"data: "):])
    assert obj["type"] == "error" and obj["code"] == "backend_error" and obj["message"]
    assert "error" not in obj  # not chat's {"error": {...}}
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["completion_tokens"]) == (200, "backend_error", 2)
    events = list(sdk(h).responses.create(model=MODEL, input="x", stream=True,
                                          extra_body={"fake": {"tokens": 6, "break_after": 2}}))
    assert isinstance(events[-1], ResponseErrorEvent), events[-1]
    assert events[-1].code == "backend_error"
    assert sum(isinstance(e, ResponseTextDeltaEvent) for e in events) == 2


def test_a_rate_limited_key_gets_429_with_retry_after(setup: Setup) -> None:
    h = setup.gateway
    key, _ = h.gw.keys.create("rationed", limits={"rpm": 1})
    c = sdk(h, key)
    c.responses.create(model=MODEL, input="one")
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as exc:
            c.responses.create(model=MODEL, input="two", stream=stream)
        err = assert_openai_error(exc.value.response, 429)
        assert err["type"] == "rate_limit_error"
        assert int(exc.value.response.headers["retry-after"]) >= 1
        row = h.wait_row(rid_of(exc.value))
        assert (row["endpoint"], row["status"], row["outcome"]) == ("responses", 429,
                                                                    "rate_limited")


def test_no_backend_up_is_503_with_retry_after(tmp_path: Path, closed_port_url: str) -> None:
    with start_gateway(tmp_path / "gw", [closed_port_url]) as h:
        for stream in (False, True):
            r = h.client().post("/v1/responses",
                                json={"model": MODEL, "input": "x", "stream": stream})
            assert_openai_error(r, 503, code="backend_unavailable")
            assert int(r.headers["retry-after"]) >= 1


def test_a_continuation_goes_to_the_backend_holding_the_previous_response(
        tmp_path: Path) -> None:
    """Two backends serve the model; each response lives on one. A continuation goes to
    the one holding its previous response (not the first, which wins a tie of load
    otherwise), and fails with 503 and Retry-After while that one is down (never to the
    other, which would answer 404)."""
    fakes = [FakeBackend(), FakeBackend()]
    with ServerThread(fakes[0]) as t0, ServerThread(fakes[1]) as t1, \
            start_gateway(tmp_path / "gw", [t0.url, t1.url], health_interval_s=60) as h:
        c = sdk(h)
        first_backend = h.gw.pool.backends[0]
        first_backend.up = False  # the first response is made on the second backend
        first = c.responses.create(model=MODEL, input="start")
        first_backend.up = True
        assert first.id in fakes[1].responses
        fresh = c.responses.create(model=MODEL, input="unrelated")
        assert fresh.id in fakes[0].responses  # without a previous response: the first
        for _ in range(3):
            nxt = c.responses.create(model=MODEL, input="go on", previous_response_id=first.id)
            assert nxt.id in fakes[1].responses
        with c.responses.stream(model=MODEL, input="and on",
                                previous_response_id=first.id) as s:
            assert s.get_final_response().id in fakes[1].responses
        assert not any(q["body"].get("previous_response_id") for q in fakes[0].requests)
        raw = c.responses.with_raw_response.create(model=MODEL, input="once more",
                                                   previous_response_id=first.id)
        assert h.wait_row(raw.headers["x-request-id"])["backend"] == t1.url
        assert c.responses.retrieve(first.id).id == first.id  # retrieved from the holder
        # the holder goes down: 503 with Retry-After, not the other backend's 404
        h.gw.pool.backends[1].up = False
        with pytest.raises(openai.InternalServerError) as exc:
            c.responses.create(model=MODEL, input="now", previous_response_id=first.id)
        assert_openai_error(exc.value.response, 503, code="backend_unavailable")
        assert int(exc.value.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.InternalServerError) as exc:
            c.responses.retrieve(first.id)
        assert_openai_error(exc.value.response, 503, code="backend_unavailable")
        assert not any(q["body"].get("previous_response_id") for q in fakes[0].requests)


def test_a_retrieve_the_engine_forgot_is_404(setup: Setup) -> None:
    """vLLM keeps responses in memory: after an engine restart the gateway's record
    remains, and the owner gets 404 rather than an error that invites a retry."""
    c = sdk(setup.gateway)
    created = c.responses.create(model=MODEL, input="x")
    del setup.fake.responses[created.id]
    with pytest.raises(openai.NotFoundError) as exc:
        c.responses.retrieve(created.id)
    assert "restarted" in exc.value.message


def test_retrieve_with_stream_true_is_refused(setup: Setup) -> None:
    c = setup.gateway.client()
    created = sdk(setup.gateway).responses.create(model=MODEL, input="x")
    r = c.get(f"/v1/responses/{created.id}", params={"stream": "true"})
    assert_openai_error(r, 400, param="stream")
