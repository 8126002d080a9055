"""Tokenizer endpoints (``/tokenize``, ``/detokenize``, also under ``/v1``): authenticated,
resolved for the key and audited, but neither limited nor scheduled, and not usage.
Pooling endpoints (``/v1/score``, ``/v1/rerank``): scheduled like embeddings, their usage
accounted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from teamgpu.cli import main
from teamgpu.metrics.usage_report import UsageGroup, usage_report
from tests.support.fake_backend import MODEL, FakeBackend, ServerThread, prompt_token_count
from tests.support.harness import Harness, assert_openai_error, start_gateway, wait_until

TOKENIZE_PATHS = ["/tokenize", "/v1/tokenize"]
DETOKENIZE_PATHS = ["/detokenize", "/v1/detokenize"]


@dataclass
class Setup:
    fake: FakeBackend
    gateway: Harness
    limited_key: str  # one request a minute, one at a time


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    fake = FakeBackend()
    with ServerThread(fake) as ft, start_gateway(tmp_path_factory.mktemp("tok"), [ft.url]) as h:
        key, _ = h.gw.keys.create("carol", limits={"rpm": 1, "max_concurrent": 1})
        yield Setup(fake, h, key)


def usage_cli(h: Harness) -> list[dict[str, Any]]:
    r = CliRunner().invoke(main, ["usage", "--json", "--since", "all",
                                  "--data-dir", str(h.data_dir)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)  # type: ignore[no-any-return]


def by_user(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["user"]: r for r in rows}


def requests_of(group: UsageGroup | None) -> int:
    return 0 if group is None else group.requests


# --- tokenizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", TOKENIZE_PATHS)
def test_tokenize_answers_as_the_engine_and_its_row_has_no_tokens(setup: Setup,
                                                                  path: str) -> None:
    h = setup.gateway
    body = {"model": MODEL, "prompt": "The capital of France is"}
    r = h.client().post(path, json=body)
    assert r.status_code == 200, r.text
    n = prompt_token_count(body)
    assert r.json() == {"count": n, "max_model_len": 2048, "tokens": list(range(n)),
                        "token_strs": None}
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["user"], row["endpoint"], row["model"], row["status"], row["outcome"]) == (
        "alice", "tokenize", MODEL, 200, "ok")
    assert (row["prompt_tokens"], row["completion_tokens"], row["priority"]) == (0, 0, None)
    assert row["backend"] == h.gw.pool.backends[0].url


@pytest.mark.parametrize("path", DETOKENIZE_PATHS)
def test_detokenize_answers_as_the_engine(setup: Setup, path: str) -> None:
    h = setup.gateway
    r = h.client().post(path, json={"model": MODEL, "tokens": [7, 8, 9]})
    assert (r.status_code, r.json()) == (200, {"prompt": "<7><8><9>"})
    sent = setup.fake.requests[-1]
    assert (sent["path"], sent["body"]) == ("/detokenize", {"model": MODEL,
                                                             "tokens": [7, 8, 9]})
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "detokenize", 200, 0, 0)
    # the engine's own refusal comes back with its status and message
    r = h.client().post(path, json={"model": MODEL, "tokens": [-1]})
    assert_openai_error(r, 400)
    assert h.wait_row(r.headers["x-request-id"])["outcome"] == "backend_rejected"


@pytest.mark.parametrize("path", TOKENIZE_PATHS + DETOKENIZE_PATHS)
def test_tokenizer_refusals(setup: Setup, path: str) -> None:
    h = setup.gateway
    body = {"model": MODEL, "prompt": "x", "tokens": [1]}
    assert_openai_error(h.client(None).post(path, json=body), 401)
    err = assert_openai_error(h.client().post(path, json={**body, "model": "nope"}), 404,
                              param="model", code="model_not_found")
    assert MODEL in err["message"]
    assert_openai_error(h.client().post(path, json={"prompt": "x"}), 400, param="model")
    assert_openai_error(h.client().get(path), 405)


def test_tokenizer_calls_are_neither_limited_nor_scheduled(setup: Setup) -> None:
    """A key at its request rate and at its concurrency bound still tokenizes: a tool
    counting tokens before it sends does not eat into the key's limits."""
    h = setup.gateway
    c = h.client(setup.limited_key)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 50, "fake": {"tokens": 50, "delay_s": 0.02}}
    with c.stream("POST", "/v1/chat/completions", json=chat) as streaming:
        assert streaming.status_code == 200  # the key's one slot is taken, its rpm spent
        for path in TOKENIZE_PATHS:
            r = c.post(path, json={"model": MODEL, "prompt": "count me"})
            assert r.status_code == 200, r.text
        r = c.post("/detokenize", json={"model": MODEL, "tokens": [1]})
        assert r.status_code == 200, r.text
        streaming.read()
    r = c.post("/v1/chat/completions", json={**chat, "stream": False})
    assert_openai_error(r, 429)


def test_tokenizer_rows_are_not_usage(setup: Setup, clean_env: Path) -> None:
    """Neither the usage report (``/stats``, the dashboard) nor ``teamgpu usage`` counts
    tokenizer calls, Anthropic's ``count_tokens`` included."""
    h = setup.gateway
    before_report = {g.key: g for g in usage_report(h.gw.store)}
    before_cli = by_user(usage_cli(h))
    rids = []
    for path in TOKENIZE_PATHS:
        rids.append(h.client().post(path, json={"model": MODEL, "prompt": "abc"})
                    .headers["x-request-id"])
    for path in DETOKENIZE_PATHS:
        rids.append(h.client().post(path, json={"model": MODEL, "tokens": [1]})
                    .headers["x-request-id"])
    r = h.client().post("/v1/messages/count_tokens", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    rids.append(r.headers["x-request-id"])
    for rid in rids:
        h.wait_row(rid)
    after_report = {g.key: g for g in usage_report(h.gw.store)}
    after_cli = by_user(usage_cli(h))
    assert requests_of(after_report.get("alice")) == requests_of(before_report.get("alice"))
    assert after_cli.get("alice") == before_cli.get("alice")


def test_no_backend_up_is_503_with_retry_after(tmp_path: Path, closed_port_url: str) -> None:
    with start_gateway(tmp_path / "gw", [closed_port_url]) as h:
        for path in TOKENIZE_PATHS + DETOKENIZE_PATHS + ["/v1/score", "/v1/rerank"]:
            r = h.client().post(path, json={"model": MODEL, "prompt": "x", "tokens": [1],
                                            "text_1": "a", "text_2": "b", "query": "q",
                                            "documents": ["d"]})
            assert_openai_error(r, 503, code="backend_unavailable")
            assert int(r.headers["retry-after"]) >= 1


# --- pooling --------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/v1/score", {"text_1": "What is the capital of France?",
                   "text_2": ["Paris is the capital.", "Bananas are yellow."]}),
    ("/v1/score", {"queries": "capital of France", "documents": ["Paris", "Berlin"]}),
    ("/v1/rerank", {"query": "capital of France",
                    "documents": ["Paris is the capital.", "Bananas are yellow.", "x"]}),
])
def test_pooling_answers_and_its_row_has_the_engines_usage(setup: Setup, path: str,
                                                           body: dict[str, Any]) -> None:
    h = setup.gateway
    r = h.client().post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["endpoint"], row["model"], row["status"], row["outcome"], row["stream"]) == (
        path.removeprefix("/v1/"), MODEL, 200, "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], 0)
    assert row["priority"] == "normal"  # scheduled
    assert row["queue_ms"] is not None
    sent = setup.fake.requests[-1]
    assert sent["path"] == path and "priority" not in sent["body"]  # not generative


def test_pooling_is_usage_and_limited(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    before = by_user(usage_cli(h))
    r = h.client().post("/v1/rerank", json={"model": MODEL, "query": "q",
                                            "documents": ["a", "b"]})
    assert r.status_code == 200
    h.wait_row(r.headers["x-request-id"])
    after = by_user(usage_cli(h))
    was = before.get("alice", {"requests": 0, "prompt_tokens": 0})
    assert after["alice"]["requests"] == was["requests"] + 1
    assert after["alice"]["prompt_tokens"] == was["prompt_tokens"] + \
        r.json()["usage"]["prompt_tokens"]
    # a key over its rate gets 429 on pooling too
    c = h.client(setup.limited_key)
    wait_until(lambda: h.gw.pool.backends[0].in_flight == 0, what="an idle backend")
    for path, body in (("/v1/score", {"text_1": "a", "text_2": "b"}),
                       ("/v1/rerank", {"query": "a", "documents": ["b"]})):
        r = c.post(path, json={"model": MODEL, **body})
        err = assert_openai_error(r, 429)
        assert err["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize("path", ["/v1/score", "/v1/rerank"])
def test_pooling_refusals(setup: Setup, path: str) -> None:
    h = setup.gateway
    body = {"model": MODEL, "text_1": "a", "text_2": "b", "query": "a", "documents": ["b"]}
    assert_openai_error(h.client(None).post(path, json=body), 401)
    assert_openai_error(h.client().post(path, json={**body, "model": "nope"}), 404,
                        param="model", code="model_not_found")
    assert_openai_error(h.client().post(path, json={**body, "stream": "yes"}), 400)
