"""Bad input: OpenAI's error shape everywhere, X-Request-Id on every response, and what
the backend receives (unknown fields passed through)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, assert_openai_error, start_gateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
JSON = {"content-type": "application/json"}


def backend_request(fake: FakeBackend, r: httpx.Response) -> dict[str, Any]:
    """What the backend received for the gateway's response ``r``."""
    rid = r.headers["x-request-id"]
    got = [q for q in fake.requests if q["request_id"] == rid]
    assert len(got) == 1, got
    return got[0]


@pytest.fixture(scope="module")
def small_gateway(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("small"), [fake_server.url],
                       max_body_bytes=1024) as h:
        yield h


# --- X-Request-Id and the error shape on every kind of response ---------------------------

def test_request_id_on_success_and_on_every_error(gateway: Harness,
                                                  client: httpx.Client) -> None:
    responses = [
        client.post("/v1/chat/completions", json=CHAT),  # 200
        client.get("/healthz"),  # 200, no auth
        client.post("/v1/chat/completions", content=b"{", headers=JSON),  # 400
        gateway.client(None).post("/v1/chat/completions", json=CHAT),  # 401
        client.get("/v1/nothing-here"),  # 404 route
        client.get("/v1/chat/completions"),  # 405
        client.post("/v1/chat/completions", json={**CHAT, "fake": {"status": 500}}),  # 502
    ]
    assert [r.status_code for r in responses] == [200, 200, 400, 401, 404, 405, 502]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(ids), [(r.status_code, r.headers) for r in responses]
    assert len(set(ids)) == len(ids)


def test_a_clean_client_request_id_is_kept_and_a_bad_one_replaced(client: httpx.Client,
                                                                   fake: FakeBackend) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "my-id.42"})
    assert r.headers["x-request-id"] == "my-id.42"
    assert backend_request(fake, r)["request_id"] == "my-id.42"
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "a b<script>"})
    assert r.headers["x-request-id"].startswith("req_")


def test_unknown_route_is_404_in_openai_shape(client: httpx.Client) -> None:
    err = assert_openai_error(client.get("/v1/nothing-here"), 404, code="not_found")
    assert "/v1/nothing-here" in err["message"]
    assert_openai_error(client.post("/v2/chat/completions", json=CHAT), 404)


def test_wrong_method_is_405_in_openai_shape(client: httpx.Client) -> None:
    r = client.get("/v1/chat/completions")
    assert_openai_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers.get("allow", "")
    assert_openai_error(client.post("/v1/models"), 405)


def test_unhandled_error_is_500_with_shape_request_id_and_audit_row(
        gateway: Harness, client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(name: str) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway.gw.pool, "resolve", boom)
    r = client.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(r, 500, code="internal_error")
    assert "a bug" not in err["message"]  # internals are logged, not shown
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["user"]) == (500, "alice")


# --- the request body --------------------------------------------------------------------

def test_malformed_json_is_400(client: httpx.Client) -> None:
    for body in (b"{bad", b'{"model": "x",}', b"", b"\xef\xbb\xbf{}"):
        assert_openai_error(client.post("/v1/chat/completions", content=body, headers=JSON),
                            400, code="invalid_json")


def test_json_that_is_not_an_object_is_400(client: httpx.Client) -> None:
    for body in (b"[1, 2]", b'"text"', b"42", b"null"):
        err = assert_openai_error(
            client.post("/v1/chat/completions", content=body, headers=JSON), 400)
        assert "object" in err["message"] or err["code"] == "invalid_json"


def test_invalid_utf8_is_400(client: httpx.Client) -> None:
    body = (b'{"model": "' + MODEL.encode()
            + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert_openai_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400)


def test_lone_surrogate_escape_is_400(client: httpx.Client) -> None:
    body = (b'{"model": "' + MODEL.encode()
            + b'", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert_openai_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400)


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = client.post("/v1/chat/completions", content=orjson.dumps(CHAT),
                        headers={"content-type": ctype})
        assert_openai_error(r, 415, code="unsupported_media_type")
    # JSON with parameters, and +json types, are fine
    r = client.post("/v1/chat/completions", content=orjson.dumps(CHAT),
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_model_missing_or_not_a_string_is_400_param_model(client: httpx.Client) -> None:
    bodies: list[dict[str, Any]] = [{"messages": []}, {**CHAT, "model": 3}, {**CHAT, "model": ""}]
    for body in bodies:
        assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param="model")


def test_invalid_priority_header_is_400(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-priority": "urgent"})
    assert_openai_error(r, 400, param="X-Priority")


def test_unknown_fields_are_passed_through_unchanged(client: httpx.Client,
                                                     fake: FakeBackend) -> None:
    extra = {"guided_json": {"type": "object", "properties": {"a": {"type": "string"}}},
             "x_custom": [1, "two", None, {"n": 3.5}], "top_k": 7, "seed": 11,
             "logit_bias": {"50256": -100}, "user": "someone", "unicode": "北京🙂"}
    r = client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 200
    got = backend_request(fake, r)
    assert got["path"] == "/v1/chat/completions"
    sent = got["body"]
    for k, v in {**CHAT, **extra}.items():
        assert sent[k] == v, k
    # only the fields the gateway owns were added
    assert set(sent) - set(CHAT) - set(extra) == {"priority"}


# --- body size ---------------------------------------------------------------------------

def big_chat(n: int) -> bytes:
    return orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * n}]})


def test_oversized_body_with_content_length_is_413(small_gateway: Harness) -> None:
    c = small_gateway.client()
    r = c.post("/v1/chat/completions", content=big_chat(4000), headers=JSON)
    assert_openai_error(r, 413, code="payload_too_large")
    assert small_gateway.wait_row(r.headers["x-request-id"])["status"] == 413
    assert c.post("/v1/chat/completions", content=big_chat(100), headers=JSON).status_code == 200


def test_oversized_chunked_body_is_413(small_gateway: Harness) -> None:
    body = big_chat(4000)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 500):
            yield body[i:i + 500]

    r = small_gateway.client().post("/v1/chat/completions", content=chunks(), headers=JSON)
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(r, 413, code="payload_too_large")


def test_chunked_body_under_the_limit_is_fine(small_gateway: Harness) -> None:
    body = big_chat(100)
    r = small_gateway.client().post("/v1/chat/completions", content=iter([body[:10], body[10:]]),
                                    headers=JSON)
    assert r.status_code == 200


def test_body_over_the_limit_by_one_byte(small_gateway: Harness, tmp_path: Path) -> None:
    body = big_chat(1)
    pad = 1024 - len(body)
    exact = big_chat(1 + pad)
    assert len(exact) == 1024
    c = small_gateway.client()
    assert c.post("/v1/chat/completions", content=exact, headers=JSON).status_code == 200
    over = big_chat(2 + pad)
    assert_openai_error(c.post("/v1/chat/completions", content=over, headers=JSON), 413)


# --- fields the gateway must read exactly as the engine does (found by an adversarial
# --- trial: a truthy non-boolean "stream" streamed past the usage accounting) ----------

@pytest.mark.parametrize("value", [1, "true", "yes", 0, [], {}])
def test_stream_must_be_a_boolean(gateway: Harness, client: httpx.Client, value: Any) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": value})
    assert_openai_error(r, 400, param="stream")
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"]) == (400, "bad_request")


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", "900"), ("max_tokens", 900.0),
    ("max_tokens", True), ("max_completion_tokens", "x"), ("n", 0), ("n", "2"),
    ("stream_options", "yes"), ("max_tokens", 10**20),
])
def test_token_and_sequence_fields_must_be_positive_integers(client: httpx.Client,
                                                             field: str, value: Any) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert_openai_error(r, 400, param=field)


def test_null_fields_are_absent_fields(client: httpx.Client, fake: FakeBackend) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "stream": None, "max_tokens": None,
                                                  "n": None, "stream_options": None})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [260, 1000])
def test_json_nested_deeper_than_the_gateway_forwards_is_400(gateway: Harness,
                                                             client: httpx.Client,
                                                             depth: int) -> None:
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [], "x": ' + \
        b"[" * depth + b"]" * depth + b"}"
    r = client.post("/v1/chat/completions", content=body, headers=JSON)
    err = assert_openai_error(r, 400, code="invalid_json")
    assert "nested too deeply" in err["message"]
    assert gateway.wait_row(r.headers["x-request-id"])["status"] == 400


def test_many_brackets_but_shallow_nesting_is_fine(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "x": [[i] for i in range(300)]})
    assert r.status_code == 200, r.text


def test_a_client_that_leaves_while_sending_the_body_is_a_499_row(gateway: Harness) -> None:
    """Headers with a Content-Length, part of the body, then the connection closes: the
    row says client_disconnected (499), not a gateway error."""
    import socket
    import time

    host, port = gateway.url.removeprefix("http://").split(":")
    rid = "req-left-mid-body"
    with socket.create_connection((host, int(port))) as s:
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {gateway.user_key}\r\n"
                   f"Content-Type: application/json\r\nX-Request-Id: {rid}\r\n"
                   f"Content-Length: 1000\r\n\r\n" + '{"model": "').encode())
        time.sleep(0.3)
    row = gateway.wait_row(rid)
    assert (row["status"], row["outcome"]) == (499, "client_disconnected"), row


def test_a_client_priority_field_on_embeddings_does_not_reach_the_engine(
        client: httpx.Client, fake: FakeBackend) -> None:
    """vLLM's own ``priority`` field would let a client skip its key's ceiling; on the
    generative routes the gateway sets it, elsewhere it removes it."""
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": "hi", "priority": -100})
    assert r.status_code == 200, r.text
    assert "priority" not in backend_request(fake, r)["body"]
    r = client.post("/v1/chat/completions", json={**CHAT, "priority": -100})
    assert backend_request(fake, r)["body"]["priority"] == 1  # the key's default: normal


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "n"),
                                             ("/v1/completions", "n"),
                                             ("/v1/completions", "best_of")])
def test_more_sequences_than_allowed_is_400_before_the_engine(
        gateway: Harness, client: httpx.Client, fake: FakeBackend, path: str,
        field: str) -> None:
    """``n`` sequences hold ``n`` engine slots while admission counts the request once:
    above ``max_sequences_per_request`` (4) the request never reaches the engine, where
    it would take the slots kept for interactive work."""
    body = ({**CHAT} if path.endswith("chat/completions")
            else {"model": MODEL, "prompt": "def f():"})
    before = len(fake.requests)
    r = client.post(path, json={**body, field: 5, "max_tokens": 4})
    err = assert_openai_error(r, 400, param=field)
    assert "at most 4" in err["message"] and "max_sequences_per_request" in err["message"]
    assert len(fake.requests) == before
    assert gateway.wait_row(r.headers["x-request-id"])["outcome"] == "bad_request"
    ok = client.post(path, json={**body, field: 4, "max_tokens": 4})
    assert ok.status_code == 200, ok.text
