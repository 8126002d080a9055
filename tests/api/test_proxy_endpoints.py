"""The OpenAI endpoints: completions go to the backend's completions (F10) and record usage
streamed or not (F5); embeddings; model names, aliases and /v1/models (F12)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, assert_openai_error, sse_events, start_gateway

OWNED = {"priority"}  # fields the gateway adds to every generative request


def sent_to_backend(fake: FakeBackend, r: httpx.Response) -> dict[str, Any]:
    got = [q for q in fake.requests if q["request_id"] == r.headers["x-request-id"]]
    assert len(got) == 1, got
    return got[0]


# --- F10 -----------------------------------------------------------------------------------

FIM_PROMPT = "def fib(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    "


def test_f10_raw_completion_goes_to_the_backends_completions(client: httpx.Client,
                                                             fake: FakeBackend) -> None:
    body = {"model": MODEL, "prompt": FIM_PROMPT, "stop": ["\ndef ", "\n\n", "```"],
            "max_tokens": 32, "temperature": 0.2, "echo": False, "logprobs": None,
            "x_editor": {"file": "fib.py"}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.json()["object"] == "text_completion"
    got = sent_to_backend(fake, r)
    assert got["path"] == "/v1/completions"
    sent = got["body"]
    assert {k: v for k, v in sent.items() if k not in OWNED} == body
    assert sent["prompt"] == FIM_PROMPT  # byte for byte: no chat template, no rewrite


def test_f10_streamed_raw_completion(client: httpx.Client, fake: FakeBackend) -> None:
    body = {"model": MODEL, "prompt": FIM_PROMPT, "stop": ["\n\n"], "stream": True,
            "max_tokens": 8}
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.read()
    got = sent_to_backend(fake, r)
    assert got["path"] == "/v1/completions"
    sent = got["body"]
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k not in OWNED | {"stream_options"}} == body


def test_f10_prompt_as_token_ids_and_lists(client: httpx.Client, fake: FakeBackend) -> None:
    for prompt in ([1, 2, 3], ["a", "b"], [[1, 2], [3]]):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200
        assert sent_to_backend(fake, r)["body"]["prompt"] == prompt


def test_chat_goes_to_the_backends_chat(client: httpx.Client, fake: FakeBackend) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", json=body)
    got = sent_to_backend(fake, r)
    assert got["path"] == "/v1/chat/completions"
    assert {k: v for k, v in got["body"].items() if k not in OWNED} == body
    assert got["body"]["priority"] == 1  # the default class, normal


def test_embeddings(gateway: Harness, client: httpx.Client, fake: FakeBackend) -> None:
    body = {"model": MODEL, "input": ["a", "b"], "encoding_format": "float"}
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 200
    assert len(r.json()["data"]) == 2
    got = sent_to_backend(fake, r)
    assert got["path"] == "/v1/embeddings"
    assert got["body"] == body  # no priority field for embeddings
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["endpoint"], row["prompt_tokens"], row["completion_tokens"]) == (
        "embeddings", 6, 0)


def test_stream_true_on_embeddings_is_not_relayed_as_a_stream(client: httpx.Client) -> None:
    r = client.post("/v1/embeddings", json={"model": MODEL, "input": "a", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")


# --- F5 ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "capital of France?"}],
                              "max_tokens": 16}),
])
def test_f5_stream_and_non_stream_record_equal_usage(gateway: Harness, client: httpx.Client,
                                                     path: str, body: dict[str, Any]) -> None:
    req = {"model": MODEL, **body, "fake": {"tokens": 16}}
    plain = client.post(path, json=req)
    usage = plain.json()["usage"]
    with client.stream("POST", path, json={**req, "stream": True}) as r:
        raw = r.read()
    assert sse_events(raw)[-1] == b"data: [DONE]\n\n"
    row_plain = gateway.wait_row(plain.headers["x-request-id"])
    row_stream = gateway.wait_row(r.headers["x-request-id"])
    for row in (row_plain, row_stream):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"])
        assert row["completion_tokens"] == 16
    assert (row_plain["stream"], row_stream["stream"]) == (0, 1)


# --- F12 -----------------------------------------------------------------------------------

@dataclass
class Named:
    fake: FakeBackend
    gateway: Harness


SERVED = "org/Org-Model-1B"


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Named]:
    fake = FakeBackend(model=SERVED)
    aliases = {"short": SERVED, "dangling": "not-served-anywhere"}
    with ServerThread(fake) as ft, start_gateway(tmp_path_factory.mktemp("f12"), [ft.url],
                                                 model_aliases=aliases) as gw:
        yield Named(fake, gw)


def test_f12_models_lists_exactly_served_names_and_aliases(named: Named) -> None:
    r = named.gateway.client().get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED, "short"]
    alias = body["data"][1]
    assert alias["parent"] == SERVED and alias["object"] == "model"
    assert_openai_error(named.gateway.client(None).get("/v1/models"), 401)


@pytest.mark.parametrize("asked", ["short", SERVED, "Org-Model-1B"])
def test_f12_alias_and_short_name_map_to_the_served_name(named: Named, asked: str) -> None:
    r = named.gateway.client().post("/v1/chat/completions", json={
        "model": asked, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert sent_to_backend(named.fake, r)["body"]["model"] == SERVED
    assert named.gateway.wait_row(r.headers["x-request-id"])["model"] == SERVED


@pytest.mark.parametrize("asked", ["gpt-4o", "dangling", "org/other", "org"])
def test_f12_unknown_model_is_404_naming_the_available_models(named: Named, asked: str) -> None:
    r = named.gateway.client().post("/v1/completions", json={"model": asked, "prompt": "x"})
    err = assert_openai_error(r, 404, param="model", code="model_not_found")
    assert asked in err["message"]
    available = err["message"].split("available", 1)[1]
    assert SERVED in available and "short" in available
    assert "dangling" not in available
    assert not [q for q in named.fake.requests if q["request_id"] == r.headers["x-request-id"]]


def test_f12_unknown_model_stream_is_a_json_404(named: Named) -> None:
    with named.gateway.client().stream("POST", "/v1/chat/completions", json={
            "model": "nope", "stream": True, "messages": []}) as r:
        r.read()
    assert_openai_error(r, 404, param="model")


def test_models_cards_come_from_the_backend(client: httpx.Client) -> None:
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["max_model_len"] == 2048
    assert orjson.loads(orjson.dumps(card))  # JSON-able


def test_model_card_by_id(gateway: Harness, client: httpx.Client) -> None:
    """``GET /v1/models/{id}`` (the SDK's ``models.retrieve``) answers the same card as the
    list, and 404 ``model_not_found`` with param ``model`` for an unknown name."""
    listed = client.get("/v1/models").json()["data"][0]
    r = client.get(f"/v1/models/{listed['id']}")
    assert r.status_code == 200 and r.json() == listed
    err = assert_openai_error(client.get("/v1/models/nope"), 404, param="model")
    assert err["code"] == "model_not_found"
