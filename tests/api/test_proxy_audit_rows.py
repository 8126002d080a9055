"""One audit row per request, with its fields filled; text only when store_prompts is on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, start_gateway, wait_until

SECRET_PROMPT = "my secret plan is 42"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": SECRET_PROMPT}]}


def request(c: httpx.Client, stream: bool, path: str = "/v1/chat/completions",
            body: dict[str, Any] | None = None) -> httpx.Response:
    body = {**(body or CHAT), "fake": {"tokens": 3, "text": "ans "}}
    if stream:
        body["stream"] = True
        with c.stream("POST", path, json=body) as r:
            r.read()
        return r
    return c.post(path, json=body)


@pytest.mark.parametrize("stream", [False, True])
def test_row_fields_are_filled(gateway: Harness, client: httpx.Client,
                               fake_server: ServerThread, stream: bool) -> None:
    r = request(client, stream, body=CHAT)
    assert r.status_code == 200
    row = gateway.wait_row(r.headers["x-request-id"])
    key = gateway.gw.keys.verify(gateway.user_key)
    assert key is not None
    assert row["user"] == "alice" and row["key_id"] == key.key_id
    assert row["endpoint"] == "chat/completions"
    assert row["model"] == MODEL
    assert row["priority"] == "normal"
    assert (row["status"], row["outcome"], row["stream"]) == (200, "ok", int(stream))
    assert row["prompt_tokens"] >= 1 and row["completion_tokens"] == 3
    assert row["ttft_ms"] is not None and row["ttft_ms"] > 0
    assert row["total_ms"] >= row["ttft_ms"]
    assert row["backend"] == fake_server.url
    assert row["client_addr"] == "127.0.0.1"
    assert row["ts"]
    assert row["error"] is None
    assert row["prompt_text"] is None and row["completion_text"] is None


def test_prompt_text_is_not_stored_by_default(gateway: Harness, client: httpx.Client) -> None:
    for stream in (False, True):
        request(client, stream)
    gateway.flush()
    raw = b"".join(f.read_bytes() for f in gateway.data_dir.glob("teamgpu.db*"))
    assert SECRET_PROMPT.encode() not in raw


def test_error_rows_carry_the_error(gateway: Harness, client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["user"]) == (404, "not_found", "alice")
    assert "nope" in row["error"]


def test_x_forwarded_for_is_ignored_by_default(gateway: Harness, client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-forwarded-for": "1.2.3.4"})
    assert gateway.wait_row(r.headers["x-request-id"])["client_addr"] == "127.0.0.1"


@pytest.fixture(scope="module")
def storing(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("prompts"), [fake_server.url],
                       store_prompts=True, trust_forwarded_for=True) as h:
        yield h


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": MODEL, "prompt": SECRET_PROMPT}),
])
def test_prompt_and_completion_stored_when_enabled(storing: Harness, stream: bool, path: str,
                                                   body: dict[str, Any]) -> None:
    r = request(storing.client(), stream, path, body)
    assert r.status_code == 200
    row = storing.wait_row(r.headers["x-request-id"])
    assert SECRET_PROMPT in row["prompt_text"]
    assert row["completion_text"] == "ans " * 3


def test_x_forwarded_for_when_trusted(storing: Harness) -> None:
    r = storing.client().post("/v1/chat/completions", json=CHAT,
                              headers={"x-forwarded-for": "6.6.6.6, 10.1.2.3"})
    # one trusted proxy appends the address it saw: the rightmost entry; the leftmost is
    # whatever the client claimed and is ignored
    assert storing.wait_row(r.headers["x-request-id"])["client_addr"] == "10.1.2.3"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_request_cut_by_the_server_stopping_keeps_its_row(
        fake_server: ServerThread, tmp_path: Any, stream: bool) -> None:
    """uvicorn cancels requests still running when its graceful-shutdown timeout runs
    out; each still gets its one audit row, written by the flush at shutdown."""
    import threading

    with start_gateway(tmp_path / "gw", [fake_server.url]) as h:
        # uvicorn annotates this int, but waits any number of seconds (asyncio.wait_for)
        h.thread.server.config.timeout_graceful_shutdown = 0.5  # type: ignore[assignment]
        c = h.client(timeout_s=30.0)
        got: dict[str, Any] = {}

        def slow() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream, "fake": {"tokens": 200, "delay_s": 0.05}}
            try:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    got["status"] = r.status_code
                    r.read()
            except httpx.HTTPError as exc:
                got["error"] = exc

        t = threading.Thread(target=slow)
        t.start()
        # the request is at the backend, generating for 10 s
        wait_until(lambda: h.gw.admissions.admissions.get(MODEL) is not None
                   and h.gw.admissions.admissions[MODEL].in_flight == 1,
                   5.0, "the request in flight")
        h.thread.server.should_exit = True  # as on SIGTERM; the client stays connected
        h.thread.thread.join(10)
        assert not h.thread.thread.is_alive()
        t.join(10)
        rows = h.rows()
        assert len(rows) == 1, rows
        assert rows[0]["outcome"] == "gateway_stopped"
        assert rows[0]["status"] == (200 if stream else 503)
        assert rows[0]["total_ms"] < 5000
        assert "gateway stopped" in rows[0]["error"]


def test_model_listing_is_audited_refusals_included(gateway: Harness) -> None:
    """/v1/models and /v1/models/{id} write one row each, like the other /v1 routes, so a
    guessed key there leaves a trace too."""
    ok = gateway.client("user").get("/v1/models")
    assert ok.status_code == 200
    card = gateway.client("user").get(f"/v1/models/{MODEL}")
    missing = gateway.client("user").get("/v1/models/nope")
    guess = gateway.client("tg-guessed").get("/v1/models")
    rows = {name: gateway.wait_row(r.headers["x-request-id"])
            for name, r in (("ok", ok), ("card", card), ("missing", missing), ("guess", guess))}
    assert {k: (v["endpoint"], v["status"], v["outcome"], v["user"]) for k, v in rows.items()} \
        == {"ok": ("models", 200, "ok", "alice"), "card": ("models", 200, "ok", "alice"),
            "missing": ("models", 404, "not_found", "alice"),
            "guess": ("models", 401, "unauthorized", None)}
    # kept for the audit trail, but listing models is not usage: reports leave it out
    from teamgpu.metrics.usage_report import usage_report
    from teamgpu.store.audit import usage_totals

    ids = {r["request_id"] for r in rows.values()}
    assert len(ids) == 4
    gateway.flush()
    all_rows = gateway.rows()
    inference = [r for r in all_rows if r["endpoint"] != "models"]
    assert len(inference) < len(all_rows)
    assert usage_totals(gateway.gw.store)["requests"] == len(inference)
    assert sum(g.requests for g in usage_report(gateway.gw.store)) == len(inference)
