"""Per-key model access (``teamgpu keys create|update NAME --models A,B``): a key sees and
uses only its models (served names or aliases), and any other model gets, on every
endpoint, exactly the answer of a model that does not exist, listing only the key's
models. Changes take effect at the next request (no restart)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner

from teamgpu.cli import main
from tests.support.fake_backend import FakeBackend, ServerThread
from tests.support.harness import (
    Harness,
    assert_anthropic_error,
    assert_openai_error,
    start_gateway,
)

A, B = "model-a", "model-b"
ALIASES = {"small": A, "coder": B}
HI = [{"role": "user", "content": "hi"}]


@dataclass
class Setup:
    fakes: dict[str, FakeBackend]
    gateway: Harness


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Two backends, one model each (as vLLM serves), and an alias for each model."""
    fa, fb = FakeBackend(A), FakeBackend(B)
    with ServerThread(fa) as ta, ServerThread(fb) as tb, \
            start_gateway(tmp_path_factory.mktemp("access"), [ta.url, tb.url],
                          model_aliases=ALIASES) as h:
        yield Setup({A: fa, B: fb}, h)


def keys_cli(h: Harness, *args: str) -> Any:
    r = CliRunner().invoke(main, ["keys", *args, "--data-dir", str(h.data_dir)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def new_key(h: Harness, user: str, models: str) -> str:
    out = json.loads(keys_cli(h, "create", user, "--models", models, "--json"))
    assert out["models"] == models.split(",")
    return out["key"]  # type: ignore[no-any-return]


# one request per endpoint, for a model; (path, body, Anthropic's shape)
def requests_for(model: str) -> list[tuple[str, dict[str, Any], bool]]:
    return [
        ("/v1/chat/completions", {"model": model, "messages": HI}, False),
        ("/v1/chat/completions", {"model": model, "messages": HI, "stream": True}, False),
        ("/v1/completions", {"model": model, "prompt": "hi"}, False),
        ("/v1/embeddings", {"model": model, "input": "hi"}, False),
        ("/v1/responses", {"model": model, "input": "hi"}, False),
        ("/v1/responses", {"model": model, "input": "hi", "stream": True}, False),
        ("/v1/messages", {"model": model, "max_tokens": 4, "messages": HI}, True),
        ("/v1/messages", {"model": model, "max_tokens": 4, "messages": HI, "stream": True},
         True),
        ("/v1/messages/count_tokens", {"model": model, "messages": HI}, True),
        ("/tokenize", {"model": model, "prompt": "hi"}, False),
        ("/v1/tokenize", {"model": model, "prompt": "hi"}, False),
        ("/detokenize", {"model": model, "tokens": [1]}, False),
        ("/v1/detokenize", {"model": model, "tokens": [1]}, False),
        ("/v1/score", {"model": model, "text_1": "a", "text_2": "b"}, False),
        ("/v1/rerank", {"model": model, "query": "a", "documents": ["b"]}, False),
    ]


def ids(c: httpx.Client) -> list[str]:
    r = c.get("/v1/models")
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


# --- /v1/models ------------------------------------------------------------------------------

def test_models_lists_only_the_keys_models(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    assert ids(h.client()) == [A, B, "small", "coder"]  # a key without a list: all
    c = h.client(new_key(h, "dave", A))
    assert ids(c) == [A, "small"]
    assert c.get(f"/v1/models/{A}").json()["id"] == A
    small = c.get("/v1/models/small").json()
    assert (small["id"], small["parent"]) == ("small", A)
    for name in (B, "coder"):
        theirs, unknown = c.get(f"/v1/models/{name}"), c.get("/v1/models/nope")
        err = assert_openai_error(theirs, 404, param="model", code="model_not_found")
        other = assert_openai_error(unknown, 404, param="model", code="model_not_found")
        assert err["message"].replace(repr(name), "X") == other["message"].replace("'nope'", "X")
        assert err["message"].endswith(f"Models available to this key: {A}, small")


# --- every endpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(len(requests_for(A))),
                         ids=[f"{p}{'-stream' if b.get('stream') else ''}"
                              for p, b, _ in requests_for(A)])
def test_another_model_is_answered_as_an_unknown_one(setup: Setup, clean_env: Path,
                                                     i: int) -> None:
    h = setup.gateway
    c = h.client(new_key(h, f"erin{i}", f"{A},coder"))  # model-b only by its alias
    path, body_a, anthropic = requests_for(A)[i]
    _, body_x, _ = requests_for("nope")[i]
    sent_a = len(setup.fakes[A].requests)
    sent_b = len(setup.fakes[B].requests)

    # allowed: the served name and the aliases in the list
    for model in (A, "small"):
        r = c.post(path, json={**body_a, "model": model})
        assert r.status_code == 200, (model, r.text)
    unrecorded = path in ("/tokenize", "/v1/tokenize")  # the fake keeps no record of these
    assert len(setup.fakes[A].requests) == sent_a + (0 if unrecorded else 2)

    # the key's list names model-b by its alias: both of its names are allowed
    _, body_b, _ = requests_for("coder")[i]
    assert c.post(path, json=body_b).status_code == 200
    assert c.post(path, json={**body_b, "model": B}).status_code == 200

    # a key limited to model-a only: model-b by any name is an unknown model
    d = h.client(new_key(h, f"frank{i}", A))
    sent_b = len(setup.fakes[B].requests)
    unknown = d.post(path, json=body_x)
    for name in (B, "coder"):
        theirs = d.post(path, json={**body_x, "model": name})
        assert theirs.status_code == unknown.status_code == 404
        if anthropic:
            e1, e2 = assert_anthropic_error(theirs, 404), assert_anthropic_error(unknown, 404)
        else:
            e1 = assert_openai_error(theirs, 404, param="model", code="model_not_found")
            e2 = assert_openai_error(unknown, 404, param="model", code="model_not_found")
        assert {**e1, "message": ""} == {**e2, "message": ""}
        assert e1["message"].replace(repr(name), "X") == e2["message"].replace("'nope'", "X")
        assert e1["message"].endswith(f"Models available to this key: {A}, small")
        assert B not in e1["message"].replace(repr(name), "")
        row = h.wait_row(theirs.headers["x-request-id"])
        assert (row["status"], row["outcome"], row["model"]) == (404, "not_found", name)
    assert len(setup.fakes[B].requests) == sent_b  # nothing reached model-b's engine


def test_the_sdks_see_the_same_404(setup: Setup, clean_env: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(k)
    h = setup.gateway
    key = new_key(h, "gina", A)
    o = h.keep(openai.OpenAI(base_url=f"{h.url}/v1", api_key=key, max_retries=0, timeout=10))
    for model in (B, "nope"):
        with pytest.raises(openai.NotFoundError):
            o.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            o.responses.create(model=model, input="hi")
        with pytest.raises(openai.NotFoundError):
            o.models.retrieve(model)
    a = h.keep(anthropic.Anthropic(base_url=h.url, api_key=key, max_retries=0, timeout=10))
    for model in (B, "nope"):
        with pytest.raises(anthropic.NotFoundError):
            a.messages.create(model=model, max_tokens=4, messages=HI)  # type: ignore[arg-type]
    assert [m.id for m in o.models.list()] == [A, "small"]


# --- stored responses follow the key's models ---------------------------------------------------

def test_a_stored_response_of_another_model_is_404_for_a_limited_key(
        setup: Setup, clean_env: Path) -> None:
    """Ownership is per user; model access per key: Alice's limited key sees none of her
    model-b responses (as unknown ids), her full key does."""
    h = setup.gateway
    full = h.client()
    limited = h.client(new_key(h, "alice", A))
    rid = full.post("/v1/responses", json={"model": B, "input": "hi"}).json()["id"]
    unknown = limited.get("/v1/responses/resp_nope")
    for method, path in (("GET", f"/v1/responses/{rid}"),
                         ("GET", f"/v1/responses/{rid}/input_items"),
                         ("POST", f"/v1/responses/{rid}/cancel"),
                         ("DELETE", f"/v1/responses/{rid}")):
        r = limited.request(method, path)
        err = assert_openai_error(r, 404, param="response_id", code="response_not_found")
        assert err["message"].replace(rid, "X") == \
            unknown.json()["error"]["message"].replace("resp_nope", "X")
    r = limited.post("/v1/responses", json={"model": A, "input": "go on",
                                            "previous_response_id": rid})
    assert_openai_error(r, 404, param="previous_response_id")
    assert full.get(f"/v1/responses/{rid}").status_code == 200  # not deleted


def test_a_continuation_on_another_model_is_404_not_503(setup: Setup) -> None:
    """A previous response lives on the engine of its model: continuing it with another
    model can never work (that engine does not serve the model asked for). 404, as vLLM's
    engine of the requested model answers, not a 503 that invites retries forever."""
    c = setup.gateway.client()
    rid = c.post("/v1/responses", json={"model": B, "input": "hi"}).json()["id"]
    for stream in (False, True):
        r = c.post("/v1/responses", json={"model": A, "input": "go on", "stream": stream,
                                          "previous_response_id": rid})
        assert_openai_error(r, 404, param="previous_response_id")
        assert "retry-after" not in r.headers
    ok = c.post("/v1/responses", json={"model": "coder", "input": "go on",
                                       "previous_response_id": rid})
    assert ok.status_code == 200, ok.text  # the same model by its alias


# --- the CLI ----------------------------------------------------------------------------------

def test_update_changes_access_at_the_next_request(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    key = new_key(h, "hank", "small")  # an alias in the list
    c = h.client(key)
    chat_b = {"model": B, "messages": HI}
    assert_openai_error(c.post("/v1/chat/completions", json=chat_b), 404)
    assert ids(c) == [A, "small"]
    out = json.loads(keys_cli(h, "update", "hank", "--models", "all", "--json"))
    assert [k["models"] for k in out] == [None]
    assert c.post("/v1/chat/completions", json=chat_b).status_code == 200  # no restart
    assert ids(c) == [A, B, "small", "coder"]
    keys_cli(h, "update", "hank", "--models", f"coder,{B}")
    assert ids(c) == [B, "coder"]
    assert_openai_error(c.post("/v1/chat/completions", json={"model": A, "messages": HI}), 404)
    assert c.post("/v1/chat/completions", json={"model": "coder", "messages": HI}).status_code \
        == 200


def test_a_key_whose_models_are_not_served_is_told_so(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    c = h.client(new_key(h, "lee", "retired-model"))
    assert ids(c) == []
    for r in (c.post("/v1/chat/completions", json={"model": A, "messages": HI}),
              c.get(f"/v1/models/{A}")):
        err = assert_openai_error(r, 404, param="model", code="model_not_found")
        assert err["message"].endswith(
            "Models available to this key: (none: none of this key's models is served now)")


def test_a_rotated_key_keeps_its_models(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    new_key(h, "kim", "coder")
    out = json.loads(keys_cli(h, "rotate", "kim", "--json"))
    assert out["models"] == ["coder"]
    assert ids(h.client(out["key"])) == [B, "coder"]


def test_keys_list_shows_the_models(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    new_key(h, "ivy", f"{A},coder")
    listed = {k["user"]: k for k in json.loads(keys_cli(h, "list", "--json"))}
    assert listed["ivy"]["models"] == [A, "coder"]
    assert listed["root"]["models"] is None
    table = keys_cli(h, "list")
    assert "models" in table
    ivy = next(line for line in table.splitlines() if "ivy" in line)
    assert f"{A},coder" in ivy
    root = next(line for line in table.splitlines() if "root" in line)
    assert " all " in root


def test_an_empty_or_bad_models_list_is_refused(setup: Setup, clean_env: Path) -> None:
    h = setup.gateway
    for value in ("", ",", " , "):
        r = CliRunner().invoke(main, ["keys", "create", "jo", "--models", value,
                                      "--data-dir", str(h.data_dir)])
        assert r.exit_code != 0 and "--models" in r.output, (value, r.output)
