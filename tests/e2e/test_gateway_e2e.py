"""The gateway in front of a real vLLM on the CPU with the demo model, through the
official OpenAI SDK: what a developer on the team sees."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.harness import Harness, start_gateway, wait_until

from .conftest import VllmEngine

QUESTION = "What is the capital of France?"
CHATML_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def gw(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("e2e-gw"), [vllm_engine.base_url]) as h:
        yield h


@pytest.fixture
def sdk(gw: Harness) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.user_key, max_retries=0,
                       timeout=120) as client:
        yield client


def test_models_lists_the_served_model(sdk: openai.OpenAI, vllm_engine: VllmEngine) -> None:
    assert [m.id for m in sdk.models.list().data] == [vllm_engine.served_model_name]


def test_chat_answers_paris_and_audit_matches_vllm_usage(
    sdk: openai.OpenAI, gw: Harness, vllm_engine: VllmEngine
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=vllm_engine.served_model_name, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": QUESTION}])
    resp = raw.parse()
    assert "Paris" in (resp.choices[0].message.content or "")
    row = gw.wait_row(raw.headers["x-request-id"])
    assert (row["user"], row["endpoint"], row["status"], row["outcome"]) == (
        "alice", "chat/completions", 200, "ok")
    assert resp.usage is not None
    assert row["prompt_tokens"] == resp.usage.prompt_tokens > 0
    assert row["completion_tokens"] == resp.usage.completion_tokens > 0
    assert row["prompt_text"] is None


def test_streaming_chat_counts_the_usage_vllm_reports(
    sdk: openai.OpenAI, gw: Harness, vllm_engine: VllmEngine
) -> None:
    # The client asks for usage itself, so it can compare with the audit row.
    with sdk.chat.completions.with_streaming_response.create(
        model=vllm_engine.served_model_name, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": QUESTION}],
    ) as raw:
        request_id = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert "Paris" in text
    assert len(usage) == 1
    row = gw.wait_row(request_id)
    assert row["outcome"] == "ok" and row["stream"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage[0].prompt_tokens, usage[0].completion_tokens)
    assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["total_ms"]


def test_streaming_without_include_usage_hides_the_usage_chunk_but_records_it(
    sdk: openai.OpenAI, gw: Harness, vllm_engine: VllmEngine
) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model=vllm_engine.served_model_name, temperature=0, max_tokens=16, stream=True,
        messages=[{"role": "user", "content": QUESTION}],
    ) as raw:
        request_id = raw.headers["x-request-id"]
        chunks = list(raw.parse())
    assert chunks and all(c.choices for c in chunks)  # no choices-less usage chunk
    row = gw.wait_row(request_id)
    assert row["prompt_tokens"] > 0
    content_chunks = sum(1 for c in chunks if c.choices[0].delta.content)
    assert row["completion_tokens"] >= content_chunks > 0


def test_raw_completion_is_forwarded_as_is(sdk: openai.OpenAI, vllm_engine: VllmEngine) -> None:
    out = sdk.completions.create(model=vllm_engine.served_model_name, prompt=CHATML_PROMPT,
                                 max_tokens=24, temperature=0, stop=["<|im_end|>"])
    assert "Paris" in out.choices[0].text


def test_f5_streamed_completion_usage_equals_non_streamed(
    sdk: openai.OpenAI, gw: Harness, vllm_engine: VllmEngine
) -> None:
    model = vllm_engine.served_model_name
    plain = sdk.completions.with_raw_response.create(
        model=model, prompt=CHATML_PROMPT, max_tokens=16, temperature=0)
    with sdk.completions.with_streaming_response.create(
            model=model, prompt=CHATML_PROMPT, max_tokens=16, temperature=0, stream=True) as raw:
        list(raw.parse())
        streamed_id = raw.headers["x-request-id"]
    a = gw.wait_row(plain.headers["x-request-id"])
    b = gw.wait_row(streamed_id)
    assert ((a["prompt_tokens"], a["completion_tokens"])
            == (b["prompt_tokens"], b["completion_tokens"]))
    assert a["completion_tokens"] > 0


def test_rejected_key(gw: Harness, vllm_engine: VllmEngine) -> None:
    bad = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="tg-not-a-key", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as exc:
        bad.chat.completions.create(model=vllm_engine.served_model_name,
                                    messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 401


def test_f8_prompt_past_max_model_len_is_a_400_and_backend_stays_up(
    sdk: openai.OpenAI, gw: Harness, vllm_engine: VllmEngine
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.completions.create(model=vllm_engine.served_model_name, prompt="hello " * 3000,
                               max_tokens=16)
    assert "2048" in str(exc.value)  # the message names the limit
    with httpx.Client() as c:
        assert c.get(f"{gw.url}/readyz").status_code == 200


def _running(engine: VllmEngine) -> float:
    with httpx.Client(timeout=5) as c:
        text = c.get(f"{engine.base_url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_f4_client_disconnect_aborts_generation_in_vllm(
    gw: Harness, vllm_engine: VllmEngine
) -> None:
    wait_until(lambda: _running(vllm_engine) == 0, 30, "an idle engine")
    with httpx.Client(base_url=gw.url, timeout=60) as c, c.stream(
        "POST", "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gw.user_key}"},
        json={"model": vllm_engine.served_model_name, "stream": True, "max_tokens": 1500,
              "ignore_eos": True, "messages": [{"role": "user", "content": "Count to 1000."}]},
    ) as r:
        request_id = r.headers["x-request-id"]
        chunks = r.iter_raw()
        next(chunks)
        # vLLM's gauges follow its engine steps; read them while tokens keep coming.
        wait_until(lambda: next(chunks) and _running(vllm_engine) == 1, 10, "a running request")
    closed = time.monotonic()
    wait_until(lambda: _running(vllm_engine) == 0, 5, "vLLM to abort the request")
    assert time.monotonic() - closed < 1.5
    row = gw.wait_row(request_id)
    assert row["outcome"] == "client_disconnected"
    assert 1 <= row["completion_tokens"] < 1500


def test_audit_db_holds_no_secret(gw: Harness) -> None:
    db: Path = gw.db_path
    assert gw.user_key.encode() not in db.read_bytes()
