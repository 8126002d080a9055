"""Tool calling through the relay: a chat stream of parallel tool calls (vLLM's chunks:
``delta.tool_calls[{index, id, type, function: {name, arguments}}]``, arguments in pieces,
``finish_reason: "tool_calls"``) reaches the client byte for byte, and the audit row has
the engine's completion tokens (which also count the tool-call markup the parser kept
out of the stream), whether the client asked for the usage chunk or not."""

from __future__ import annotations

import os
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.support.fake_apis import MARKUP_TOKENS_PER_CALL, TOOL_CALLS
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, event_data, sse_events

TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name, _ in TOOL_CALLS]


def body(calls: int = 2, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Weather and time?"}],
            "tools": TOOLS, "stream": True, "fake": {"tool_calls": calls}, **kw}


def read(c: httpx.Client, b: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with c.stream("POST", "/v1/chat/completions", json=b) as r:
        raw = r.read()
    return r, raw


def is_usage(ev: bytes) -> bool:
    d = event_data(ev)
    if not d.startswith(b"{"):
        return False
    obj = orjson.loads(d)
    return obj.get("choices") == [] and bool(obj.get("usage"))


def calls_of(raw: bytes) -> dict[int, tuple[str, str]]:
    """Tool calls assembled from the stream's deltas, by index: (name, arguments)."""
    calls: dict[int, list[str]] = {}
    for ev in sse_events(raw):
        d = event_data(ev)
        if not d.startswith(b"{"):
            continue
        for ch in orjson.loads(d).get("choices") or []:
            for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                entry = calls.setdefault(tc["index"], ["", ""])
                fn = tc.get("function") or {}
                entry[0] += fn.get("name") or ""
                entry[1] += fn.get("arguments") or ""
    return {i: (n, a) for i, (n, a) in calls.items()}


@pytest.mark.parametrize("calls", [2, 3])
def test_parallel_tool_calls_relayed_byte_for_byte(gateway: Harness, client: httpx.Client,
                                                   fake_server: ServerThread,
                                                   calls: int) -> None:
    b = body(calls, stream_options={"include_usage": True})
    r, got = read(client, b)
    with httpx.Client(base_url=fake_server.url, trust_env=False) as direct:
        _, expected = read(direct, b)
    assert r.status_code == 200
    assert got == expected
    assembled = calls_of(got)
    assert sorted(assembled) == list(range(calls))
    for i, (name, pieces) in enumerate(TOOL_CALLS[:calls]):
        assert assembled[i] == (name, "".join(pieces))
        orjson.loads(assembled[i][1])  # whole JSON arguments
    finish = [ch["finish_reason"] for ev in sse_events(got) if event_data(ev).startswith(b"{")
              for ch in orjson.loads(event_data(ev))["choices"] if ch["finish_reason"]]
    assert finish == ["tool_calls"]
    (usage,) = [orjson.loads(event_data(e))["usage"] for e in sse_events(got) if is_usage(e)]
    deltas = sum(1 + len(pieces) for _, pieces in TOOL_CALLS[:calls])
    assert usage["completion_tokens"] == deltas + MARKUP_TOKENS_PER_CALL * calls
    row = gateway.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["stream"]) == (200, "ok", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"])


def test_without_include_usage_the_client_gets_the_engines_bytes_minus_usage(
        gateway: Harness, client: httpx.Client, fake_server: ServerThread) -> None:
    """The gateway asked for the usage chunk on the client's behalf: it is left out, the
    rest is the engine's bytes (each chunk with the ``usage: null`` that asking adds, as
    vLLM sends it), and the row still has the engine's count."""
    r, got = read(client, body(2))
    with httpx.Client(base_url=fake_server.url, trust_env=False) as direct:
        _, engine = read(direct, body(2, stream_options={"include_usage": True}))
    events = sse_events(engine)
    (usage_ev,) = [e for e in events if is_usage(e)]
    assert got == b"".join(e for e in events if e is not usage_ev)
    assert not any(is_usage(e) for e in sse_events(got))
    assert sse_events(got)[-1] == b"data: [DONE]\n\n"
    usage = orjson.loads(event_data(usage_ev))["usage"]
    row = gateway.wait_row(r.headers["x-request-id"])
    assert row["completion_tokens"] == usage["completion_tokens"]
    assert row["completion_tokens"] > sum(1 + len(p) for _, p in TOOL_CALLS[:2])


def test_the_sdk_assembles_the_calls(gateway: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("OPENAI_"):
            monkeypatch.delenv(k)
    sdk = gateway.keep(openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.user_key,
                                     max_retries=0, timeout=10))
    with sdk.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "Weather and time?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            extra_body={"fake": {"tool_calls": 2}}) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    got = [(tc.function.name, orjson.loads(tc.function.arguments))
           for tc in choice.message.tool_calls or []]
    assert got == [(name, orjson.loads("".join(p))) for name, p in TOOL_CALLS[:2]]
