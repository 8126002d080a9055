"""The fake vLLM's other client APIs, in vLLM 0.32's shapes (its
``entrypoints/openai/responses``, ``entrypoints/anthropic``, ``entrypoints/serve/tokenize``
and ``entrypoints/pooling``):

- ``POST /v1/responses``: a ``response`` object (id ``resp_...``, or the body's
  ``request_id`` as vLLM takes it) with one ``message`` output item holding
  ``output_text``, usage ``input_tokens``/``output_tokens``; streamed as typed events
  (``event: response.created``, ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, one ``response.output_text.delta`` per token,
  ``response.output_text.done``, ``response.content_part.done``,
  ``response.output_item.done``, ``response.completed`` carrying the usage). Responses
  are kept in memory (as with ``VLLM_ENABLE_RESPONSES_API_STORE=1``) unless ``store`` is
  false; ``previous_response_id`` must name one of them, else 404 as vLLM answers; a
  continuation's input tokens include the previous response's input and output.
  ``background: true`` answers ``queued`` at once and completes after the generation
  time (``delay_s`` per token) unless cancelled.
- ``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` (400 "Cannot cancel a
  synchronous response." unless queued or in progress); vLLM has no ``DELETE`` (405).
- ``POST /v1/messages``: a ``message`` with one ``text`` block, usage
  ``input_tokens``/``output_tokens``; streamed as ``message_start`` (usage with the
  input tokens), ``content_block_start``, one ``content_block_delta`` per token,
  ``content_block_stop``, ``message_delta`` (usage with the output tokens),
  ``message_stop``, each with its ``event:`` line. Errors in Anthropic's shape with
  vLLM's type names (``{"type": "error", "error": {"type": "BadRequestError", ...}}``).
- ``POST /v1/messages/count_tokens``: ``{"input_tokens": n, "context_management": ...}``,
  the ``input_tokens`` a message with the same ``system`` and ``messages`` reports.
- ``POST /detokenize``: ``{"prompt": ...}``.
- ``POST /v1/score`` and ``/v1/rerank``: vLLM's pooling answers and usage
  (``prompt_tokens``, ``total_tokens``).
- A chat stream with ``fake.tool_calls: N``: N parallel tool calls as vLLM's tool parsers
  stream them (``delta.tool_calls[{index, id, type, function: {name, arguments}}]``, the
  arguments in pieces, ``finish_reason: "tool_calls"``); its ``completion_tokens`` also
  count the tool-call markup the parser swallowed (2 per call), as on a real engine.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from tests.support.fake_io import (
    Event,
    err,
    prompt_token_count,
    send_json,
    stream_events,
)

if TYPE_CHECKING:
    from tests.support.fake_backend import FakeBackend

__all__ = ["TOOL_CALLS", "anthropic_err", "count_tokens", "detokenize", "messages",
           "messages_input_tokens", "rerank", "responses_create", "responses_item", "score",
           "tool_call_stream"]

# the calls of a tool-call stream, in order: (name, argument pieces)
TOOL_CALLS = [
    ("get_weather", ['{"city": ', '"Paris"', ', "unit": "c"}']),
    ("get_time", ['{"tz": ', '"Europe/Paris"', "}"]),
    ("search", ['{"q": ', '"vLLM"', "}"]),
]
MARKUP_TOKENS_PER_CALL = 2  # <tool_call> ... </tool_call>: generated, never streamed


def _stop(n_tok: int, limit: int) -> bool:
    return n_tok >= limit


# --- Responses ---------------------------------------------------------------------------

def _response_input_tokens(fake: FakeBackend, req: dict[str, Any],
                           prev: dict[str, Any] | None) -> int:
    own = max(1, len(orjson.dumps([req.get("instructions"), req.get("input")])) // 4)
    if prev is None or not isinstance(prev.get("usage"), dict):
        return own
    return own + int(prev["usage"]["input_tokens"]) + int(prev["usage"]["output_tokens"])


def _response_obj(fake: FakeBackend, req: dict[str, Any], rid: str, *, status: str,
                  output: list[dict[str, Any]], usage: dict[str, Any] | None,
                  max_out: int) -> dict[str, Any]:
    return {
        "id": rid, "created_at": 0,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
        else None,
        "instructions": req.get("instructions"), "metadata": req.get("metadata"),
        "model": fake.model, "object": "response", "output": output,
        "parallel_tool_calls": True, "temperature": req.get("temperature", 1.0),
        "tool_choice": "auto", "tools": req.get("tools") or [], "top_p": 1.0,
        "background": bool(req.get("background")), "max_output_tokens": max_out,
        "max_tool_calls": None, "previous_response_id": req.get("previous_response_id"),
        "prompt": None, "reasoning": None, "service_tier": "auto", "status": status,
        "text": None, "top_logprobs": None, "truncation": "disabled", "usage": usage,
        "user": None,
    }


def _usage(inp: int, out: int) -> dict[str, Any]:
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inp + out}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [
        {"annotations": [], "text": text, "type": "output_text", "logprobs": None}] if text else []
    return {"id": item_id, "content": content, "role": "assistant", "status": status,
            "type": "message"}


async def responses_create(fake: FakeBackend, req: dict[str, Any], f: dict[str, Any],
                           send: Any, receive: Any) -> None:
    """``POST /v1/responses``."""
    prev_id = req.get("previous_response_id")
    prev = None
    if prev_id is not None:
        prev = fake.responses.get(prev_id)
        if prev is None:
            await send_json(send, err(f"Response with id '{prev_id}' not found.", 404,
                                      "invalid_request_error", "response_id"), 404)
            return
    rid = req.get("request_id") or f"resp_{secrets.token_hex(16)}"
    max_out = int(req.get("max_output_tokens") or 16)
    n_tok = min(int(f.get("tokens", 4)), max_out)
    text = f.get("text", "tok ")
    inp = _response_input_tokens(fake, req, prev)
    status = "incomplete" if _stop(n_tok, max_out) else "completed"
    item_id = f"msg_{secrets.token_hex(16)}"
    store = fake.responses_store and req.get("store", True) is not False
    final = _response_obj(fake, req, rid, status=status, usage=_usage(inp, n_tok),
                          output=[_message_item(item_id, text * n_tok, "completed")],
                          max_out=max_out)
    if req.get("background"):
        queued = _response_obj(fake, req, rid, status="queued", output=[], usage=None,
                               max_out=max_out)
        fake.responses[rid] = queued
        fake.background[rid] = asyncio.ensure_future(
            _background(fake, rid, final, float(f.get("delay_s", 0)) * n_tok))
        await send_json(send, queued)
        return
    if not req.get("stream"):
        if await fake.generation_aborted(receive, f, n_tok):
            return
        if store:
            fake.responses[rid] = final
        await send_json(send, final)
        return
    initial = _response_obj(fake, req, rid, status="in_progress", output=[], usage=None,
                            max_out=max_out)
    seq = iter(range(10_000))

    def ev(kind: str, token: bool = False, **fields: Any) -> Event:
        return Event({**fields, "sequence_number": next(seq), "type": kind}, kind, token)

    part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
    events = [
        ev("response.created", response=initial),
        ev("response.in_progress", response=initial),
        ev("response.output_item.added", output_index=0,
           item=_message_item(item_id, "", "in_progress")),
        ev("response.content_part.added", content_index=0, item_id=item_id, output_index=0,
           part=part),
        *(ev("response.output_text.delta", True, content_index=0, delta=text,
             item_id=item_id, logprobs=[], output_index=0) for _ in range(n_tok)),
        ev("response.output_text.done", content_index=0, item_id=item_id, logprobs=[],
           output_index=0, text=text * n_tok),
        ev("response.content_part.done", content_index=0, item_id=item_id, output_index=0,
           part={**part, "text": text * n_tok, "logprobs": None}),
        ev("response.output_item.done", output_index=0,
           item=_message_item(item_id, text * n_tok, "completed")),
        ev("response.completed", response=final),
    ]

    def done(aborted: bool) -> None:
        fake.active -= 1
        if aborted:
            fake.aborted += 1
        elif store:
            fake.responses[rid] = final

    await stream_events(send, receive, events, f, on_start=_starter(fake), on_end=done)


def _starter(fake: FakeBackend) -> Callable[[], None]:
    def start() -> None:
        fake.active += 1
    return start


async def _background(fake: FakeBackend, rid: str, final: dict[str, Any], run_s: float) -> None:
    fake.responses[rid] = {**fake.responses[rid], "status": "in_progress"}
    await asyncio.sleep(run_s)
    if fake.responses.get(rid, {}).get("status") != "cancelled":
        fake.responses[rid] = final
    fake.background.pop(rid, None)


async def responses_item(fake: FakeBackend, method: str, path: str, send: Any) -> None:
    """``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel`` (vLLM serves no
    ``DELETE`` and no ``input_items``)."""
    rest = path[len("/v1/responses/"):]
    rid, _, action = rest.partition("/")
    if (method, action) not in (("GET", ""), ("POST", "cancel")):
        await send_json(send, {"detail": "Method Not Allowed" if action == "" else "Not Found"},
                        405 if action == "" else 404)
        return
    resp = fake.responses.get(rid)
    if resp is None:
        await send_json(send, err(f"Response with id '{rid}' not found.", 404,
                                  "invalid_request_error", "response_id"), 404)
        return
    if action == "cancel":
        if resp["status"] not in ("queued", "in_progress"):
            await send_json(send, err("Cannot cancel a synchronous response.", 400,
                                      "invalid_request_error", "response_id"), 400)
            return
        resp = fake.responses[rid] = {**resp, "status": "cancelled"}
        task = fake.background.pop(rid, None)
        if task is not None:
            task.cancel()
    await send_json(send, resp)


# --- Anthropic Messages --------------------------------------------------------------------

def anthropic_err(message: str, status: int, type_: str = "BadRequestError") -> dict[str, Any]:
    """vLLM's translation of its errors on ``/v1/messages``: Anthropic's shape, vLLM's
    type names."""
    return {"type": "error", "error": {"type": type_, "message": message}}


def messages_input_tokens(req: dict[str, Any]) -> int:
    """The input tokens of a Messages request (``system`` and ``messages``), the same
    for ``/v1/messages`` and ``/v1/messages/count_tokens``."""
    return prompt_token_count({"messages": [req.get("system"), req.get("messages")]})


async def messages(fake: FakeBackend, req: dict[str, Any], f: dict[str, Any], send: Any,
                   receive: Any, request_id: str | None) -> None:
    """``POST /v1/messages``."""
    if not isinstance(req.get("max_tokens"), int):
        await send_json(send, anthropic_err("max_tokens: Field required", 400), 400)
        return
    inp = messages_input_tokens(req)
    max_tokens = req["max_tokens"]
    n_tok = min(int(f.get("tokens", 4)), max_tokens)
    text = f.get("text", "tok ")
    stop = "max_tokens" if _stop(n_tok, max_tokens) else "end_turn"
    mid = f"chatcmpl-{request_id or secrets.token_hex(16)}"
    if not req.get("stream"):
        if await fake.generation_aborted(receive, f, n_tok):
            return
        await send_json(send, {
            "id": mid, "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": text * n_tok}], "model": fake.model,
            "stop_reason": stop, "usage": {"input_tokens": inp, "output_tokens": n_tok}})
        return
    if f.get("error_first"):
        events = [Event(anthropic_err("bad parameter", 400, "internal_error"), "error")]
    else:
        events = [
            Event({"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "content": [],
                "model": fake.model, "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": inp, "output_tokens": 0}}}, "message_start"),
            Event({"type": "content_block_start", "content_block": {"type": "text", "text": ""},
                   "index": 0}, "content_block_start"),
            *(Event({"type": "content_block_delta",
                     "delta": {"type": "text_delta", "text": text}, "index": 0},
                    "content_block_delta", token=True) for _ in range(n_tok)),
            Event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            Event({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"input_tokens": inp, "output_tokens": n_tok}}, "message_delta"),
            Event({"type": "message_stop"}, "message_stop"),
        ]

    def done(aborted: bool) -> None:
        fake.active -= 1
        fake.aborted += aborted

    await stream_events(send, receive, events, f, on_start=_starter(fake), on_end=done)


async def count_tokens(fake: FakeBackend, req: dict[str, Any], send: Any) -> None:
    """``POST /v1/messages/count_tokens``."""
    n = messages_input_tokens(req)
    await send_json(send, {"input_tokens": n,
                           "context_management": {"original_input_tokens": n}})


# --- tokenizer and pooling -----------------------------------------------------------------

async def detokenize(fake: FakeBackend, req: dict[str, Any], send: Any) -> None:
    """``POST /detokenize``: each token id ``t`` reads ``<t>``."""
    tokens = req.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
        await send_json(send, err("tokens: a list of non-negative integers", 400), 400)
        return
    await send_json(send, {"prompt": "".join(f"<{t}>" for t in tokens)})


def _texts(v: Any) -> list[str]:
    if isinstance(v, list):
        return [t if isinstance(t, str) else orjson.dumps(t).decode() for t in v]
    return [v if isinstance(v, str) else orjson.dumps(v).decode()]


def _tokens(text: str) -> int:
    return max(1, len(text.encode()) // 4)


async def score(fake: FakeBackend, req: dict[str, Any], send: Any) -> None:
    """``POST /v1/score`` (``text_1``/``text_2``, ``queries``/``documents`` or
    ``data_1``/``data_2``): one score per pair; usage counts both texts of every pair."""
    for a, b in (("text_1", "text_2"), ("queries", "documents"), ("data_1", "data_2"),
                 ("queries", "items")):
        if a in req and b in req:
            left, right = _texts(req[a]), _texts(req[b])
            break
    else:
        await send_json(send, err("score needs text_1 and text_2", 400), 400)
        return
    if len(left) == 1:
        left = left * len(right)
    pairs = list(zip(left, right, strict=False))
    n = sum(_tokens(q) + _tokens(d) for q, d in pairs)
    await send_json(send, {
        "id": f"score-{secrets.token_hex(8)}", "object": "list", "created": 0,
        "model": fake.model,
        "data": [{"index": i, "object": "score", "score": 1.0 / (i + 1)}
                 for i in range(len(pairs))],
        "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                  "prompt_tokens_details": None}})


async def rerank(fake: FakeBackend, req: dict[str, Any], send: Any) -> None:
    """``POST /v1/rerank``: documents in their order, scores falling; usage as vLLM's
    ``RerankUsage`` (``prompt_tokens``, ``total_tokens``)."""
    query, docs = req.get("query"), req.get("documents")
    if not isinstance(query, str) or not isinstance(docs, list):
        await send_json(send, err("rerank needs query and documents", 400), 400)
        return
    texts = _texts(docs)
    n = sum(_tokens(query) + _tokens(d) for d in texts)
    top_n = int(req.get("top_n") or 0) or len(texts)
    await send_json(send, {
        "id": f"rerank-{secrets.token_hex(8)}", "model": fake.model,
        "usage": {"prompt_tokens": n, "total_tokens": n},
        "results": [{"index": i, "document": {"text": t}, "relevance_score": 1.0 / (i + 1)}
                    for i, t in enumerate(texts)][:top_n]})


# --- a chat stream of parallel tool calls --------------------------------------------------

async def tool_call_stream(fake: FakeBackend, req: dict[str, Any], f: dict[str, Any],
                           send: Any, receive: Any, prompt_tokens: int) -> None:
    """A chat stream whose answer is ``f["tool_calls"]`` parallel tool calls (at most 3)."""
    calls = TOOL_CALLS[:max(1, min(int(f["tool_calls"]), len(TOOL_CALLS)))]
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    rid = "chatcmpl-fake-tools"
    base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": 0,
                            "model": fake.model}
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None, token: bool = True) -> Event:
        return Event({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]}, token=token)

    events = [chunk({"role": "assistant", "content": ""}, token=False)]
    last = sum(len(pieces) for _, pieces in calls)
    n = 0
    for i, (name, pieces) in enumerate(calls):
        events.append(chunk({"tool_calls": [{
            "id": f"chatcmpl-tool-fake{i}", "type": "function",
            "index": i, "function": {"name": name, "arguments": ""}}]}))
        for piece in pieces:
            n += 1
            events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]},
                                "tool_calls" if n == last else None))
    completion = len(events) - 1 + MARKUP_TOKENS_PER_CALL * len(calls)
    if include_usage:
        events.append(Event({"id": rid, "object": "chat.completion.chunk", "created": 0,
                             "model": fake.model, "choices": [], "usage": {
                                 "prompt_tokens": prompt_tokens,
                                 "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion}}))
    events.append(Event("[DONE]"))

    def done(aborted: bool) -> None:
        fake.active -= 1
        fake.aborted += aborted

    await stream_events(send, receive, events, f, on_start=_starter(fake), on_end=done)
