"""A backend that is down, slow, or answers with an error: a clear 5xx in OpenAI's shape
with Retry-After where it helps (F7), never a hang, a too-long prompt is a 400 (F8), and
every request leaves exactly one audit row. Health endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, assert_openai_error, start_gateway, wait_until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def assert_retry_after(r: httpx.Response) -> int:
    value = r.headers.get("retry-after")
    assert value is not None and value.isdigit(), r.headers
    assert int(value) >= 1
    return int(value)


def post(c: httpx.Client, body: dict[str, Any], path: str = "/v1/chat/completions"
         ) -> httpx.Response:
    if body.get("stream"):
        with c.stream("POST", path, json=body) as r:
            r.read()
        return r
    return c.post(path, json=body)


# --- health --------------------------------------------------------------------------------

def test_healthz_and_readyz(gateway: Harness) -> None:
    c = gateway.client(None)
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200
    assert r.json()["backends"][0]["up"] is True


# --- no backend ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def downed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A gateway whose only backend never answered (nothing listens on its port)."""
    from tests.support.fake_backend import free_port

    with start_gateway(tmp_path_factory.mktemp("down"), [f"http://127.0.0.1:{free_port()}"],
                       backend_down_retry_after_s=7) as h:
        yield h


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "x"}),
    ("/v1/embeddings", {"model": MODEL, "input": "x"}),
])
def test_backend_down_is_503_with_retry_after(downed: Harness, path: str,
                                              body: dict[str, Any]) -> None:
    r = post(downed.client(timeout_s=5), body, path)
    err = assert_openai_error(r, 503)
    assert err["type"] == "service_unavailable_error"
    assert assert_retry_after(r) == 7
    row = downed.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (503, "unavailable")


def test_readyz_without_a_backend_is_503(downed: Harness) -> None:
    r = downed.client(None).get("/readyz")
    assert r.status_code == 503
    assert assert_retry_after(r) == 7
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert downed.client(None).get("/healthz").status_code == 200


def test_models_without_a_backend_is_an_empty_list(downed: Harness) -> None:
    r = downed.client().get("/v1/models")
    assert r.status_code == 200 and r.json()["data"] == []


# --- F7: the backend goes away while the gateway runs ---------------------------------------

def test_f7_backend_that_goes_away_gives_503_with_integer_retry_after(tmp_path: Path) -> None:
    fake = FakeBackend()
    ft = ServerThread(fake)
    with ft, start_gateway(tmp_path, [ft.url], backend_down_retry_after_s=3) as gw:
        c = gw.client(timeout_s=5)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        ft.__exit__(None, None, None)  # the backend stops
        for body in (CHAT, {**CHAT, "stream": True}, CHAT):
            r = post(c, body)
            assert_openai_error(r, 503)
            assert assert_retry_after(r) == 3
            gw.wait_row(r.headers["x-request-id"])
        r = c.get("/readyz")
        assert r.status_code == 503 and assert_retry_after(r) == 3
        assert gw.gw.pool.backends[0].in_flight == 0


# --- slow backend ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def impatient(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("slow"), [fake_server.url],
                       read_timeout_s=0.5) as h:
        yield h


@pytest.mark.parametrize("stream", [False, True])
def test_backend_slower_than_the_read_timeout_is_504(impatient: Harness, stream: bool) -> None:
    body = {**CHAT, "stream": stream, "fake": {"tokens": 2, "delay_s": 3}}
    r = post(impatient.client(timeout_s=5), body)  # the client's timeout: no hang
    err = assert_openai_error(r, 504, code="backend_timeout")
    assert "time" in err["message"]
    row = impatient.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (504, "backend_timeout")
    wait_until(lambda: impatient.gw.pool.backends[0].in_flight == 0, what="backend slot")
    # a timeout is not a dead backend
    assert impatient.client(None).get("/readyz").status_code == 200


def test_stream_that_falls_silent_midway_ends_with_an_error_event(impatient: Harness) -> None:
    body = {**CHAT, "stream": True, "fake": {"tokens": 4, "pause_after": 2, "pause_s": 3}}
    r = post(impatient.client(timeout_s=5), body)
    assert r.status_code == 200  # the stream had started: no retry, no second answer
    events = r.content.split(b"\n\n")[:-1]
    assert r.text.count('"content"') == 2
    assert b"data: [DONE]" not in r.content
    err = json.loads(events[-1][len(b"data: "):])
    assert err["error"]["code"] == "backend_timeout"
    row = impatient.wait_row(r.headers["x-request-id"])
    assert (row["outcome"], row["completion_tokens"]) == ("backend_timeout", 2)


def test_a_slow_but_steady_stream_is_not_cut(impatient: Harness) -> None:
    body = {**CHAT, "stream": True, "fake": {"tokens": 4, "delay_s": 0.2}}
    r = post(impatient.client(), body)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


# --- backend errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [500, 502, 504])
def test_backend_5xx_is_502(gateway: Harness, client: httpx.Client, status: int,
                            stream: bool) -> None:
    r = post(client, {**CHAT, "stream": stream, "fake": {"status": status}})
    err = assert_openai_error(r, 502, code="backend_error")
    assert str(status) in err["message"]
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (502, "backend_error")
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("status", [429, 503])
def test_f7_backend_429_and_503_keep_status_with_retry_after(gateway: Harness,
                                                             client: httpx.Client,
                                                             status: int) -> None:
    r = post(client, {**CHAT, "fake": {"status": status}})
    assert_openai_error(r, status)
    assert_retry_after(r)
    gateway.wait_row(r.headers["x-request-id"])


def test_backend_4xx_keeps_status_and_message(gateway: Harness, client: httpx.Client) -> None:
    r = post(client, {**CHAT, "fake": {"status": 422}})
    err = assert_openai_error(r, 422)
    assert "fake error 422" in err["message"]
    assert gateway.wait_row(r.headers["x-request-id"])["outcome"] == "backend_rejected"


def test_backend_refusing_the_gateway_is_502_not_401(client: httpx.Client) -> None:
    r = post(client, {**CHAT, "fake": {"status": 401}})
    assert_openai_error(r, 502)


# --- F8 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_f8_prompt_plus_max_tokens_past_the_context_is_400(gateway: Harness,
                                                           client: httpx.Client,
                                                           stream: bool) -> None:
    r = post(client, {**CHAT, "max_tokens": 5000, "stream": stream})
    err = assert_openai_error(r, 400, code="context_length_exceeded")
    assert "2048" in err["message"]  # names the limit
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (400, "backend_rejected")
    # the backend is not marked unhealthy
    assert gateway.gw.pool.backends[0].up
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_f8_prompt_longer_than_the_context_is_400(client: httpx.Client) -> None:
    long_prompt = "word " * 2000  # about 2500 tokens by the fake's count
    r = post(client, {"model": MODEL, "prompt": long_prompt, "max_tokens": 1},
             "/v1/completions")
    err = assert_openai_error(r, 400, code="context_length_exceeded")
    assert "maximum context length" in err["message"]
    assert client.get("/readyz").status_code == 200
