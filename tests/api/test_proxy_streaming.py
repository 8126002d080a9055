"""Streaming relay: no buffering (F1), exact bytes across split reads (F2, F3), the usage
chunk (include_usage), and errors before and during a stream (F13)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, assert_openai_error, event_data, sse_events

MESSAGES = [{"role": "user", "content": "Say something in Chinese"}]
TEXT = "北京🙂é"  # 3-byte CJK, a 4-byte emoji, a 2-byte Latin letter


def stream_body(fake: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "stream": True, "fake": fake or {}, **kw}


def read_stream(c: httpx.Client, body: dict[str, Any], path: str = "/v1/chat/completions"
                ) -> tuple[httpx.Response, bytes]:
    with c.stream("POST", path, json=body) as r:
        raw = r.read()
    return r, raw


def direct(fake_server: ServerThread, body: dict[str, Any],
           path: str = "/v1/chat/completions") -> bytes:
    """What the fake backend itself streams for ``body``."""
    with httpx.Client(base_url=fake_server.url, timeout=10, trust_env=False) as c:
        _, raw = read_stream(c, body, path)
    return raw


def is_usage_event(ev: bytes) -> bool:
    if not ev.startswith(b"data: {"):
        return False
    obj = orjson.loads(event_data(ev))
    return obj.get("choices") == [] and bool(obj.get("usage"))


def usage_of(raw: bytes) -> dict[str, int]:
    (u,) = [orjson.loads(event_data(e))["usage"] for e in sse_events(raw) if is_usage_event(e)]
    return u  # type: ignore[no-any-return]


def content_of(raw: bytes) -> str:
    out = []
    for e in sse_events(raw):
        d = event_data(e)
        if d.startswith(b"{"):
            for ch in orjson.loads(d).get("choices") or []:
                out.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
    return "".join(out)


# --- F1 ------------------------------------------------------------------------------------

def test_f1_streaming_headers(client: httpx.Client) -> None:
    r, raw = read_stream(client, stream_body())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    assert "content-length" not in r.headers
    assert r.headers["x-request-id"]
    assert sse_events(raw)[-1] == b"data: [DONE]\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_f1_events_arrive_with_the_backends_timing(client: httpx.Client,
                                                   include_usage: bool) -> None:
    body = stream_body({"tokens": 5, "delay_s": 0.2})
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    arrivals: list[tuple[float, bytes]] = []
    buf = b""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for chunk in r.iter_raw():
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                arrivals.append((now, ev))
    content = [t for t, ev in arrivals if b'"content"' in ev]
    assert len(content) == 5
    gaps = [b - a for a, b in itertools.pairwise(content)]
    # each token arrives on its own, about 0.2 s after the previous one (not in one lump)
    assert all(0.1 < g < 0.6 for g in gaps), gaps
    assert content[-1] - content[0] > 0.6


# --- F2 / F3 -------------------------------------------------------------------------------

def test_f2_f3_split_events_and_characters_relayed_exactly(
        gateway: Harness, client: httpx.Client, fake_server: ServerThread) -> None:
    """The fake writes every event in two writes, cut inside a multi-byte character. The
    client did not ask for usage: it gets the backend's bytes minus the usage chunk that
    the gateway asked for on its behalf."""
    fake = {"split": True, "text": TEXT, "tokens": 4}
    r, got = read_stream(client, stream_body(fake))
    assert r.status_code == 200
    backend = direct(fake_server, stream_body(fake, stream_options={"include_usage": True}))
    expected = b"".join(e for e in sse_events(backend) if not is_usage_event(e))
    assert got == expected
    text = got.decode("utf-8")  # strict: raises on any broken character
    assert "\ufffd" not in text
    assert content_of(got) == TEXT * 4
    row = gateway.wait_row(r.headers["x-request-id"])
    u = usage_of(backend)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (u["prompt_tokens"], 4)
    assert row["outcome"] == "ok"


def test_f2_f3_with_include_usage_the_bytes_are_the_backends(
        gateway: Harness, client: httpx.Client, fake_server: ServerThread) -> None:
    body = stream_body({"split": True, "text": TEXT, "tokens": 3},
                       stream_options={"include_usage": True})
    r, got = read_stream(client, body)
    assert got == direct(fake_server, body)
    assert "\ufffd" not in got.decode("utf-8")
    row = gateway.wait_row(r.headers["x-request-id"])
    assert row["completion_tokens"] == usage_of(got)["completion_tokens"] == 3


def test_f3_completions_stream_split_characters(client: httpx.Client,
                                                fake_server: ServerThread) -> None:
    body = {"model": MODEL, "prompt": "北京", "stream": True,
            "fake": {"split": True, "text": "🙂北", "tokens": 3}}
    _, got = read_stream(client, body, "/v1/completions")
    backend = direct(fake_server, {**body, "stream_options": {"include_usage": True}},
                     "/v1/completions")
    assert got == b"".join(e for e in sse_events(backend) if not is_usage_event(e))
    assert content_of(got) == "🙂北" * 3


# --- include_usage ---------------------------------------------------------------------------

def test_client_that_did_not_ask_gets_no_usage_chunk(gateway: Harness, client: httpx.Client,
                                                     fake: FakeBackend) -> None:
    r, raw = read_stream(client, stream_body({"tokens": 5}))
    events = sse_events(raw)
    assert not any(is_usage_event(e) for e in events)
    assert events[-1] == b"data: [DONE]\n\n"
    assert events.count(b"data: [DONE]\n\n") == 1
    # the gateway asked the backend for usage on the client's behalf, and recorded it
    (sent,) = [q["body"] for q in fake.requests if q["request_id"] == r.headers["x-request-id"]]
    assert sent["stream_options"] == {"include_usage": True}
    row = gateway.wait_row(r.headers["x-request-id"])
    prompt_tokens = max(1, len(orjson.dumps(MESSAGES)) // 4)  # the fake's count
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, 5)


def test_client_that_asked_gets_the_usage_chunk_exactly_once(gateway: Harness,
                                                            client: httpx.Client) -> None:
    body = stream_body({"tokens": 5}, stream_options={"include_usage": True})
    r, raw = read_stream(client, body)
    events = sse_events(raw)
    assert sum(is_usage_event(e) for e in events) == 1
    assert events[-1] == b"data: [DONE]\n\n"
    u = usage_of(raw)
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (u["prompt_tokens"],
                                                                u["completion_tokens"])


def test_client_stream_options_are_kept(client: httpx.Client, fake: FakeBackend) -> None:
    body = stream_body({"tokens": 2}, stream_options={"include_usage": False,
                                                       "continuous_usage_stats": False})
    r, raw = read_stream(client, body)
    assert not any(is_usage_event(e) for e in sse_events(raw))
    (sent,) = [q["body"] for q in fake.requests if q["request_id"] == r.headers["x-request-id"]]
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


# --- F13 -----------------------------------------------------------------------------------

def test_f13_rejected_parameter_is_a_json_error_not_a_200_stream(gateway: Harness,
                                                                client: httpx.Client) -> None:
    r, _ = read_stream(client, stream_body(top_p=0))
    err = assert_openai_error(r, 400)
    assert "top_p" in err["message"]
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (400, "backend_rejected")


def test_f13_error_as_first_event_is_a_json_error(gateway: Harness,
                                                  client: httpx.Client) -> None:
    r, _ = read_stream(client, stream_body({"error_first": True}))
    assert r.status_code != 200
    err = assert_openai_error(r, 400)
    assert err["message"] == "bad parameter"
    row = gateway.wait_row(r.headers["x-request-id"])
    assert row["status"] == 400


def test_f13_stream_broken_midway_ends_with_an_error_event(gateway: Harness,
                                                           client: httpx.Client) -> None:
    r, raw = read_stream(client, stream_body({"tokens": 6, "break_after": 2}))
    assert r.status_code == 200
    events = sse_events(raw)
    assert b"data: [DONE]" not in raw
    assert content_of(raw) == "tok " * 2
    err = orjson.loads(event_data(events[-1]))
    assert set(err) == {"error"}
    assert set(err["error"]) == {"message", "type", "param", "code"}
    row = gateway.wait_row(r.headers["x-request-id"])
    assert row["outcome"] == "backend_error"
    assert row["completion_tokens"] == 2
    assert gateway.gw.pool.backends[0].in_flight == 0


def test_f13_stream_without_done_gets_an_error_event(gateway: Harness,
                                                     client: httpx.Client) -> None:
    r, raw = read_stream(client, stream_body({"tokens": 3, "no_done": True}))
    events = sse_events(raw)
    assert b"data: [DONE]" not in raw
    assert content_of(raw) == "tok " * 3
    assert set(orjson.loads(event_data(events[-1]))) == {"error"}
    assert gateway.wait_row(r.headers["x-request-id"])["outcome"] == "backend_error"


def test_f13_a_good_stream_ends_with_done(gateway: Harness, client: httpx.Client) -> None:
    for path, body in (("/v1/chat/completions", stream_body({"tokens": 3})),
                       ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True})):
        r, raw = read_stream(client, body, path)
        assert sse_events(raw)[-1] == b"data: [DONE]\n\n"
        assert gateway.wait_row(r.headers["x-request-id"])["outcome"] == "ok"


@pytest.mark.parametrize("include_usage", [False, True])
def test_f13_stream_broken_inside_an_event_still_ends_with_a_clean_error_event(
        gateway: Harness, client: httpx.Client, include_usage: bool) -> None:
    body = stream_body({"tokens": 6, "break_after": 2, "break_mid_event": True})
    if include_usage:  # raw reads are relayed: the half event reaches the client
        body["stream_options"] = {"include_usage": True}
    r, raw = read_stream(client, body)
    events = sse_events(raw)
    err = orjson.loads(event_data(events[-1]))  # the error event is whole and parsable
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert content_of(b"".join(e for e in events[:2])) == "tok " * 2
    if not include_usage:  # whole events only: the half event is not relayed
        assert len(events) == 3
    assert gateway.wait_row(r.headers["x-request-id"])["outcome"] == "backend_error"
