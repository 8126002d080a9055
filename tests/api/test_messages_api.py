"""``/v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages) through a real
gateway, with the ``anthropic`` SDK: the key as ``x-api-key`` or Bearer, answers and
streams relayed as the engine sends them, usage from ``message_start``/``message_delta``,
and every error in Anthropic's shape with Anthropic's types (never OpenAI's), Retry-After
on 429 and 503.

What "every error" covers: the routes the gateway serves for Anthropic's API (the
``/v1/messages`` path and everything under it, so a wrong method or an Anthropic endpoint
the gateway lacks, such as ``/v1/messages/batches``, answers in Anthropic's shape too);
other unknown routes keep OpenAI's shape, as the rest of the gateway's API.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import RawContentBlockDeltaEvent, RawMessageStartEvent, TextDelta

from teamgpu.scheduler import PriorityClass
from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import (
    Harness,
    assert_anthropic_error,
    disconnect_mid_stream,
    sse_events,
    start_gateway,
)

MESSAGES = [{"role": "user", "content": "Bonjour, ça va ?"}]
STREAM_EVENTS = ["message_start", "content_block_start", *["content_block_delta"] * 3,
                 "content_block_stop", "message_delta", "message_stop"]
_Refusal = TypeVar("_Refusal", bound=anthropic.APIStatusError)


@dataclass
class Setup:
    fake: FakeBackend
    fake_url: str
    gateway: Harness
    slow_key: str  # a key allowed one request per minute


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads ANTHROPIC_* variables (key, token, base URL); none of the runner's
    apply."""
    for k in list(os.environ):
        if k.startswith("ANTHROPIC_"):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    fake = FakeBackend()
    with ServerThread(fake) as ft, start_gateway(tmp_path_factory.mktemp("msg"), [ft.url],
                                                 max_body_bytes=64 * 1024) as h:
        slow_key, _ = h.gw.keys.create("slowpoke", limits={"rpm": 1})
        yield Setup(fake, ft.url, h, slow_key)


def sdk(h: Harness, *, api_key: str | None = None, auth_token: str | None = None
        ) -> anthropic.Anthropic:
    if api_key is None and auth_token is None:
        api_key = h.user_key
    return h.keep(anthropic.Anthropic(base_url=h.url, api_key=api_key, auth_token=auth_token,
                                      max_retries=0, timeout=10))


def rid_of(exc: anthropic.APIStatusError) -> str:
    return exc.response.headers["x-request-id"]


def post(c: httpx.Client, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return c.post(path, json=body, **kw)


def refused_with_retry_after(c: anthropic.Anthropic, error: type[_Refusal],
                             status: int) -> list[_Refusal]:
    """Create a message with ``c``, not streamed then streamed: each raises ``error``, with
    Anthropic's error for ``status`` and a Retry-After of at least 1 s; returns the two."""
    refusals = []
    for stream in (False, True):
        with pytest.raises(error) as exc:
            c.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES,  # type: ignore[arg-type]
                              stream=stream)
        assert_anthropic_error(exc.value.response, status)
        assert int(exc.value.response.headers["retry-after"]) >= 1
        refusals.append(exc.value)
    return refusals


# --- answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_create_with_either_key_header_and_its_row(setup: Setup, how: str) -> None:
    h = setup.gateway
    c = sdk(h) if how == "x-api-key" else sdk(h, auth_token=h.user_key)
    raw = c.messages.with_raw_response.create(
        model=MODEL, max_tokens=16, messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"fake": {"tokens": 3, "text": "oui "}})
    msg = raw.parse()
    assert [b.text for b in msg.content if b.type == "text"] == ["oui oui oui "]
    assert msg.stop_reason == "end_turn"
    row = h.wait_row(raw.headers["x-request-id"])
    assert (row["user"], row["endpoint"], row["model"], row["status"], row["outcome"],
            row["stream"]) == ("alice", "messages", MODEL, 200, "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        msg.usage.input_tokens, msg.usage.output_tokens) == (row["prompt_tokens"], 3)
    sent = setup.fake.requests[-1]
    assert (sent["path"], sent["body"]["model"], sent["body"]["messages"]) == (
        "/v1/messages", MODEL, MESSAGES)


def test_stream_helper_and_its_row(setup: Setup) -> None:
    h = setup.gateway
    with sdk(h).messages.with_streaming_response.create(
            model=MODEL, max_tokens=16, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
            extra_body={"fake": {"tokens": 3, "text": "北京 "}}) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    assert [e.type for e in events if not isinstance(e, tuple)] == STREAM_EVENTS
    assert isinstance(events[0], RawMessageStartEvent)
    input_tokens = events[0].message.usage.input_tokens
    texts = [e.delta.text for e in events
             if isinstance(e, RawContentBlockDeltaEvent) and isinstance(e.delta, TextDelta)]
    assert texts == ["北京 "] * 3
    row = h.wait_row(rid)
    assert (row["endpoint"], row["stream"], row["status"], row["outcome"]) == (
        "messages", 1, 200, "ok")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (input_tokens, 3)
    assert row["ttft_ms"] is not None

    with sdk(h).messages.stream(model=MODEL, max_tokens=16, messages=MESSAGES,  # type: ignore[arg-type]
                                extra_body={"fake": {"tokens": 2}}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok tok "
    assert (final.usage.input_tokens, final.usage.output_tokens) == (input_tokens, 2)


def test_stream_bytes_are_the_engines(setup: Setup) -> None:
    """Event names, data and the split of characters across reads all pass unchanged (the
    message id is the request id, so both requests carry the same one)."""
    body = {"model": MODEL, "max_tokens": 16, "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 4, "text": "🙂é", "split": True}}
    headers = {"x-request-id": "same-id-for-both"}
    with setup.gateway.client().stream("POST", "/v1/messages", json=body,
                                       headers=headers) as r:
        got = r.read()
    with httpx.Client(base_url=setup.fake_url, trust_env=False) as direct, \
            direct.stream("POST", "/v1/messages", json=body, headers=headers) as d:
        expected = d.read()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert got == expected
    names = [ev.split(b"\n", 1)[0] for ev in sse_events(got)]
    assert names == [f"event: {n}".encode() for n in STREAM_EVENTS[:2]] + \
        [b"event: content_block_delta"] * 4 + [f"event: {n}".encode() for n in STREAM_EVENTS[-3:]]


def test_count_tokens_matches_the_messages_input_and_is_not_usage(setup: Setup) -> None:
    h, c = setup.gateway, sdk(setup.gateway)
    msg = c.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES,  # type: ignore[arg-type]
                            system="Be brief.")
    raw = c.messages.with_raw_response.count_tokens(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                    system="Be brief.")
    assert raw.parse().input_tokens == msg.usage.input_tokens
    row = h.wait_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["outcome"], row["model"]) == (
        "messages.count_tokens", 200, "ok", MODEL)
    assert (row["prompt_tokens"], row["completion_tokens"], row["priority"]) == (0, 0, None)


def test_the_requests_class_reaches_the_engine(setup: Setup) -> None:
    """vLLM's Messages request model has no ``priority`` field (it drops unknown fields):
    the engine reads the priority of a Messages request from ``X-Vllm-Priority`` only."""
    sdk(setup.gateway).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES,  # type: ignore[arg-type]
                                       extra_headers={"x-priority": "low"})
    sent = setup.fake.requests[-1]
    assert sent["path"] == "/v1/messages"
    assert sent["vllm_priority"] == str(int(PriorityClass.LOW))


# --- errors in Anthropic's shape ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_a_bad_key_is_authentication_error(setup: Setup, how: str) -> None:
    h = setup.gateway
    c = sdk(h, api_key="tg-not-a-key") if how == "x-api-key" else sdk(h, auth_token="tg-nope")
    with pytest.raises(anthropic.AuthenticationError) as exc:
        c.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)  # type: ignore[arg-type]
    err = assert_anthropic_error(exc.value.response, 401)
    assert err["message"] == "Invalid API key"
    row = h.wait_row(rid_of(exc.value))
    assert (row["endpoint"], row["status"], row["outcome"], row["user"]) == (
        "messages", 401, "unauthorized", None)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        c.messages.count_tokens(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    assert_anthropic_error(exc.value.response, 401)
    r = post(h.client(None), "/v1/messages", {"model": MODEL, "max_tokens": 4,
                                              "messages": MESSAGES})
    assert_anthropic_error(r, 401)


def test_a_rate_limited_key_gets_rate_limit_error_with_retry_after(setup: Setup) -> None:
    h = setup.gateway
    c = sdk(h, api_key=setup.slow_key)
    c.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)  # type: ignore[arg-type]
    for e in refused_with_retry_after(c, anthropic.RateLimitError, 429):
        row = h.wait_row(rid_of(e))
        assert (row["status"], row["outcome"], row["user"]) == (429, "rate_limited", "slowpoke")
    # tokenizer calls are not scheduled nor limited
    assert c.messages.count_tokens(model=MODEL, messages=MESSAGES).input_tokens > 0  # type: ignore[arg-type]


def test_an_unknown_model_is_not_found_error(setup: Setup) -> None:
    c = sdk(setup.gateway)
    with pytest.raises(anthropic.NotFoundError) as exc:
        c.messages.create(model="claude-unknown", max_tokens=4, messages=MESSAGES)  # type: ignore[arg-type]
    err = assert_anthropic_error(exc.value.response, 404)
    assert "'claude-unknown'" in err["message"] and MODEL in err["message"]
    row = setup.gateway.wait_row(rid_of(exc.value))
    assert (row["status"], row["outcome"], row["model"]) == (404, "not_found",
                                                             "claude-unknown")
    with pytest.raises(anthropic.NotFoundError) as exc:
        c.messages.count_tokens(model="claude-unknown", messages=MESSAGES)  # type: ignore[arg-type]
    assert_anthropic_error(exc.value.response, 404)


def test_missing_max_tokens_is_bad_request_error(setup: Setup) -> None:
    """The SDK's types insist on max_tokens; a client that skips them gets Anthropic's 400."""
    c = sdk(setup.gateway)
    sent = len(setup.fake.requests)
    with pytest.raises(anthropic.BadRequestError) as exc:
        c.post("/v1/messages", cast_to=httpx.Response,
               body={"model": MODEL, "messages": MESSAGES})
    err = assert_anthropic_error(exc.value.response, 400)
    assert "max_tokens" in err["message"]
    assert len(setup.fake.requests) == sent
    row = setup.gateway.wait_row(rid_of(exc.value))
    assert (row["status"], row["outcome"]) == (400, "bad_request")


@pytest.mark.parametrize(("body", "status"), [
    ({"model": MODEL, "max_tokens": 4, "messages": "hi"}, 400),  # not a list
    ({"model": MODEL, "max_tokens": 0, "messages": MESSAGES}, 400),
    ({"max_tokens": 4, "messages": MESSAGES}, 400),  # no model
    ({"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "stream": "yes"}, 400),
    ({"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "fake": {"status": 400}}, 400),
    ({"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "fake": {"status": 500}}, 502),
    ({"model": MODEL, "max_tokens": 4, "messages": MESSAGES, "stream": True,
      "fake": {"error_first": True}}, 502),
])
def test_every_refusal_is_in_anthropics_shape(setup: Setup, body: dict[str, Any],
                                              status: int) -> None:
    r = post(setup.gateway.client(), "/v1/messages", body)
    assert_anthropic_error(r, status)
    assert setup.gateway.wait_row(r.headers["x-request-id"])["status"] == status


def test_an_engines_refusal_keeps_its_message(setup: Setup) -> None:
    with pytest.raises(anthropic.BadRequestError) as exc:
        sdk(setup.gateway).messages.create(model=MODEL, max_tokens=4, messages=MESSAGES,  # type: ignore[arg-type]
                                           extra_body={"fake": {"status": 400}})
    assert assert_anthropic_error(exc.value.response, 400)["message"] == "fake error 400"


def test_a_body_too_large_is_request_too_large(setup: Setup) -> None:
    big = [{"role": "user", "content": "x" * 70_000}]
    r = post(setup.gateway.client(), "/v1/messages", {"model": MODEL, "max_tokens": 4,
                                                      "messages": big})
    assert_anthropic_error(r, 413)
    r = setup.gateway.client().post("/v1/messages", content=b"model=x",
                                    headers={"content-type": "text/plain"})
    assert_anthropic_error(r, 415)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/messages"),
    ("DELETE", "/v1/messages/count_tokens"),
    ("POST", "/v1/messages/batches"),
    ("GET", "/v1/messages/batches/msgbatch_1"),
])
def test_routes_under_v1_messages_answer_in_anthropics_shape(setup: Setup, method: str,
                                                             path: str) -> None:
    r = setup.gateway.client().request(method, path, json={})
    assert r.status_code in (404, 405)
    assert_anthropic_error(r, r.status_code)


def test_a_gateway_bug_on_messages_is_api_error_500(setup: Setup,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = setup.gateway

    def boom(name: str) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(h.gw.pool, "resolve", boom)
    for path, body in (("/v1/messages", {"model": MODEL, "max_tokens": 4,
                                         "messages": MESSAGES}),
                       ("/v1/messages/count_tokens", {"model": MODEL, "messages": MESSAGES})):
        r = post(h.client(), path, body)
        err = assert_anthropic_error(r, 500)
        assert "a bug" not in err["message"]
        row = h.wait_row(r.headers["x-request-id"])
        assert (row["status"], row["outcome"]) == (500, "gateway_error")


def test_no_backend_up_is_overloaded_error_with_retry_after(tmp_path: Path,
                                                             closed_port_url: str) -> None:
    with start_gateway(tmp_path / "gw", [closed_port_url]) as h:
        c = sdk(h)
        refused_with_retry_after(c, anthropic.InternalServerError, 503)
        with pytest.raises(anthropic.InternalServerError) as exc:
            c.messages.count_tokens(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert_anthropic_error(exc.value.response, 503)
        assert int(exc.value.response.headers["retry-after"]) >= 1


# --- streams that end early ----------------------------------------------------------------------

def test_a_stream_that_breaks_ends_with_an_anthropic_error_event(setup: Setup) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 6, "break_after": 2}}
    with setup.gateway.client().stream("POST", "/v1/messages", json=body) as r:
        raw = r.read()
    last = sse_events(raw)[-1]
    head, data = last.split(b"\n", 1)
    assert head == b"event: error"
    obj = orjson.loads(data[len(b"data: "):])
    assert set(obj) == {"type", "error"} and obj["type"] == "error"
    assert obj["error"]["type"] == "api_error"
    row = setup.gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["completion_tokens"]) == (200, "backend_error", 2)
    stream = sdk(setup.gateway).messages.stream(
        model=MODEL, max_tokens=16, messages=MESSAGES,  # type: ignore[arg-type]
        extra_body={"fake": {"tokens": 6, "break_after": 2}})
    with pytest.raises(anthropic.APIStatusError), stream as events:  # raised on the event
        for _ in events:
            pass


def test_client_disconnect_mid_stream_aborts_the_generation(setup: Setup) -> None:
    body = {"model": MODEL, "max_tokens": 500, "messages": MESSAGES, "stream": True,
            "fake": {"tokens": 500, "delay_s": 0.1}}
    row, buf = disconnect_mid_stream(setup.gateway, setup.fake, "/v1/messages", body,
                                     b"content_block_delta")
    # the message's own input count, from message_start, not the gateway's estimate
    start = orjson.loads(buf.split(b"\n\n", 1)[0].split(b"data: ", 1)[1])
    assert start["type"] == "message_start"
    assert row["prompt_tokens"] == start["message"]["usage"]["input_tokens"]
