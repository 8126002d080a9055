"""The demo model answers through vLLM directly (no gateway): the engine side works.

The Paris checks guard the conversion trap described in teamgpu/engine/demo_model.py: with
a zero embedding every token has logprob -ln(49152) = -10.80 and answers are empty.

Why the Paris checks hold on every CPU: the engine runs the demo model in float32, as
``teamgpu up`` does (see the ``vllm_engine`` fixture); the closest call on the answer's
greedy path is 0.10 nats, a thousand times the rounding differences between float32
kernels. ``test_greedy_answer_margin_is_far_above_float32_noise`` measures that margin.
"""

from __future__ import annotations

import json

import httpx
import pytest

from .conftest import VllmEngine, saw_answer

QUESTION = "What is the capital of France?"
CHATML_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
UNIFORM_LOGPROB = -10.8  # ln(1 / 49152): what a model with a zero embedding gives


@pytest.fixture
def client(vllm_engine: VllmEngine) -> httpx.Client:
    return httpx.Client(base_url=f"{vllm_engine.base_url}/v1", timeout=60.0)


def test_models_lists_the_served_name(client: httpx.Client, vllm_engine: VllmEngine) -> None:
    with client:
        ids = [model["id"] for model in client.get("/models").json()["data"]]
    assert ids == [vllm_engine.served_model_name]


def test_raw_chatml_completion_says_paris(client: httpx.Client, vllm_engine: VllmEngine) -> None:
    with client:
        response = client.post("/completions", json={
            "model": vllm_engine.served_model_name,
            "prompt": CHATML_PROMPT,
            "max_tokens": 24,
            "temperature": 0,
            "logprobs": 1,
        })
    response.raise_for_status()
    choice = response.json()["choices"][0]
    assert "Paris" in choice["text"]
    # A confident model, not the uniform distribution of a zeroed embedding.
    assert choice["logprobs"]["token_logprobs"][0] > UNIFORM_LOGPROB / 2


def test_chat_completion_says_paris(client: httpx.Client, vllm_engine: VllmEngine) -> None:
    with client:
        response = client.post("/chat/completions", json={
            "model": vllm_engine.served_model_name,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24,
            "temperature": 0,
        })
    response.raise_for_status()
    body = response.json()
    saw_answer("direct chat", body["choices"][0]["message"]["content"])
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


MIN_MARGIN_NATS = 0.05  # measured 0.10 at the first token; float32 noise is about 1e-4


def test_greedy_answer_margin_is_far_above_float32_noise(
    client: httpx.Client, vllm_engine: VllmEngine
) -> None:
    """At every step of the greedy answer, the chosen token beats the runner-up by far
    more than float32 kernels can differ between CPUs (the answer checks rely on it)."""
    with client:
        response = client.post("/chat/completions", json={
            "model": vllm_engine.served_model_name,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
        })
    response.raise_for_status()
    steps = response.json()["choices"][0]["logprobs"]["content"]
    margins = []
    for step in steps:
        top = sorted((t["logprob"] for t in step["top_logprobs"]), reverse=True)
        assert step["logprob"] == top[0]  # greedy: the chosen token is the most likely
        margins.append(top[0] - top[1])
    assert "Paris" in "".join(step["token"] for step in steps)
    assert min(margins) >= MIN_MARGIN_NATS, (
        f"the greedy answer's closest call is {min(margins):.3f} nats (steps: "
        f"{[round(m, 3) for m in margins]}); answer checks are not robust to CPU kernels")


def test_stream_of_64_tokens_arrives_in_many_chunks(
    client: httpx.Client, vllm_engine: VllmEngine
) -> None:
    chunks: list[str] = []
    usage: dict[str, int] = {}
    request = {
        "model": vllm_engine.served_model_name,
        "prompt": CHATML_PROMPT,
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,  # vLLM extension: always generate all 64 tokens
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client, client.stream("POST", "/completions", json=request) as response:
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                usage = event["usage"]
            chunks += [choice["text"] for choice in event["choices"] if choice["text"]]
    assert usage["completion_tokens"] == 64
    assert len(chunks) >= 32, f"only {len(chunks)} chunks"
    assert "Paris" in "".join(chunks)
