"""The agents' APIs through the gateway in front of a real vLLM (CPU, demo model), with the
official SDKs: OpenAI Responses (create, stream, retrieve, another user's 404) and
Anthropic Messages (create, stream, count_tokens), and the tokenizer. Each audit row has
the tokens the engine itself reported."""

from __future__ import annotations

import os
from collections.abc import Iterator

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.responses import ResponseCompletedEvent, ResponseTextDeltaEvent

from tests.support.harness import Harness, assert_openai_error, start_gateway

from .conftest import VllmEngine

QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant. Answer in one short sentence."
USER: list[MessageParam] = [{"role": "user", "content": QUESTION}]
GREEDY = {"temperature": 0}  # the anthropic SDK here has no temperature parameter


@pytest.fixture(autouse=True)
def _no_sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("OPENAI_", "ANTHROPIC_")):
            monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def gw(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("e2e-agents"), [vllm_engine.base_url]) as h:
        yield h


@pytest.fixture
def oa(gw: Harness) -> openai.OpenAI:
    return gw.keep(openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.user_key, max_retries=0,
                                 timeout=120))


@pytest.fixture
def an(gw: Harness) -> anthropic.Anthropic:
    return gw.keep(anthropic.Anthropic(base_url=gw.url, auth_token=gw.user_key,
                                       max_retries=0, timeout=120))


def test_responses_create_and_its_row(oa: openai.OpenAI, gw: Harness,
                                      vllm_engine: VllmEngine) -> None:
    raw = oa.responses.with_raw_response.create(
        model=vllm_engine.served_model_name, instructions=SYSTEM, input=QUESTION,
        temperature=0, max_output_tokens=24)
    resp = raw.parse()
    assert resp.id.startswith("resp_") and resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens > 0
    row = gw.wait_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["outcome"], row["stream"]) == (
        "responses", 200, "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        resp.usage.input_tokens, resp.usage.output_tokens)


def test_responses_stream_and_its_row(oa: openai.OpenAI, gw: Harness,
                                      vllm_engine: VllmEngine) -> None:
    with oa.responses.with_streaming_response.create(
            model=vllm_engine.served_model_name, instructions=SYSTEM, input=QUESTION,
            temperature=0, max_output_tokens=24, stream=True) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent) and final.response.usage is not None
    assert text and text == final.response.output_text
    row = gw.wait_row(rid)
    assert (row["endpoint"], row["status"], row["outcome"], row["stream"]) == (
        "responses", 200, "ok", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        final.response.usage.input_tokens, final.response.usage.output_tokens)


def test_responses_retrieve_chain_and_another_users_404(oa: openai.OpenAI, gw: Harness,
                                                        vllm_engine: VllmEngine) -> None:
    model = vllm_engine.served_model_name
    first = oa.responses.create(model=model, input="My name is Ada.", temperature=0,
                                max_output_tokens=16)
    got = oa.responses.retrieve(first.id)  # the engine keeps it (VLLM_ENABLE_RESPONSES_API_STORE)
    assert (got.id, got.output_text) == (first.id, first.output_text)
    second = oa.responses.create(model=model, input="What is my name?", temperature=0,
                                 max_output_tokens=16, previous_response_id=first.id)
    assert second.usage is not None and first.usage is not None
    # the engine prepended the first turn to the second's prompt
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    bob_key, _ = gw.gw.keys.create("bob-e2e")
    bob = gw.keep(openai.OpenAI(base_url=f"{gw.url}/v1", api_key=bob_key, max_retries=0,
                                timeout=120))
    with pytest.raises(openai.NotFoundError) as exc:
        bob.responses.retrieve(first.id)
    assert_openai_error(exc.value.response, 404, param="response_id")
    with pytest.raises(openai.NotFoundError) as exc:
        bob.responses.create(model=model, input="x", max_output_tokens=4,
                             previous_response_id=first.id)
    assert_openai_error(exc.value.response, 404, param="previous_response_id")
    assert oa.responses.retrieve(first.id).id == first.id


def test_messages_create_and_its_row(an: anthropic.Anthropic, gw: Harness,
                                     vllm_engine: VllmEngine) -> None:
    raw = an.messages.with_raw_response.create(
        model=vllm_engine.served_model_name, system=SYSTEM, max_tokens=24, messages=USER,
        extra_body=GREEDY)
    msg = raw.parse()
    assert msg.type == "message" and msg.role == "assistant"
    assert any(b.type == "text" and b.text for b in msg.content)
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0
    row = gw.wait_row(raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["outcome"], row["stream"]) == (
        "messages", 200, "ok", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        msg.usage.input_tokens, msg.usage.output_tokens)

    counted = an.messages.with_raw_response.count_tokens(
        model=vllm_engine.served_model_name, system=SYSTEM, messages=USER)
    assert counted.parse().input_tokens == msg.usage.input_tokens
    row = gw.wait_row(counted.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "messages.count_tokens", 200, 0, 0)


def test_messages_stream_and_its_row(an: anthropic.Anthropic, gw: Harness,
                                     vllm_engine: VllmEngine) -> None:
    with an.messages.with_streaming_response.create(
            model=vllm_engine.served_model_name, system=SYSTEM, max_tokens=24, messages=USER,
            stream=True, extra_body=GREEDY) as raw:
        rid = raw.headers["x-request-id"]
        events = list(raw.parse())
    types = [e.type for e in events if not isinstance(e, tuple)]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_delta" in types and "message_delta" in types
    row = gw.wait_row(rid)
    assert (row["endpoint"], row["status"], row["outcome"], row["stream"]) == (
        "messages", 200, "ok", 1)
    with an.messages.stream(model=vllm_engine.served_model_name, system=SYSTEM, max_tokens=24,
                            messages=USER, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-request-id"]
    assert text
    row = gw.wait_row(rid)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        final.usage.input_tokens, final.usage.output_tokens)
    assert final.usage.output_tokens > 0


def test_tokenize_and_its_row(gw: Harness, vllm_engine: VllmEngine) -> None:
    c = gw.client(timeout_s=60)
    model = vllm_engine.served_model_name
    r = c.post("/tokenize", json={"model": model, "prompt": "The capital of France is"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == len(out["tokens"]) > 0
    row = gw.wait_row(r.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["prompt_tokens"], row["completion_tokens"]) == (
        "tokenize", 200, 0, 0)
    back = c.post("/v1/detokenize", json={"model": model, "tokens": out["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json()["prompt"].strip().endswith("The capital of France is")
