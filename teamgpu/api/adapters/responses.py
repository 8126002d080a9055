"""OpenAI's Responses API (``POST /v1/responses``) as a protocol adapter, for Codex CLI and
the ``openai`` SDKs' ``client.responses``.

vLLM (0.32) answers ``/v1/responses`` itself; the body goes to the backend unchanged but
for ``model`` and ``priority``. Streams are relayed unchanged with their event names
(``event: response.created`` ... ``event: response.completed``); usage is the final
response's ``usage.input_tokens`` / ``output_tokens``. Errors are in OpenAI's shape.

Two request fields are refused (400): ``request_id`` (vLLM names the response after it and
stores it under that name, replacing a response of that name, which may be another
user's) and ``background`` (a background response is generated after the answer, so its
tokens would escape the key's limits, the fair share and the audit row).

A response created with ``store`` on (the API's default) belongs to the user whose key
created it: the gateway records it (:class:`teamgpu.store.responses.ResponseStore`) when
the answer names its id, and a ``previous_response_id`` of another user, of another model
than the request's, or an unknown one, is 404 (param ``previous_response_id``). A request
that continues a stored response goes to the backend that holds it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

import orjson

from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec, estimate_tokens
from teamgpu.api.body import check_stream_fields, positive_int
from teamgpu.api.context import RequestCtx
from teamgpu.auth.keys import Principal
from teamgpu.errors import BadRequest, NotFound
from teamgpu.store.responses import ResponseStore
from teamgpu.upstream.sse import SSEEvent
from teamgpu.upstream.usage import EventAccount, Usage

__all__ = ["Responses", "ResponsesAccount", "input_items"]

P = ParamSpec("P")
T = TypeVar("T")

_DONE_EVENTS = ("response.completed", "response.incomplete", "response.failed")
# the named events whose data the account reads (the response's id, usage, errors)
_PARSED_EVENTS = frozenset({"response.created", *_DONE_EVENTS, "error"})


def input_items(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items, as ``GET .../input_items`` lists them
    (OpenAI's shape): a string becomes one user message; a message whose ``content`` is a
    string gets it as one ``input_text`` part (``output_text`` for the assistant's); items
    without an ``id`` get one (``msg_...``)."""
    raw = payload.get("input")
    if isinstance(raw, str):
        items: list[Any] = [{"type": "message", "role": "user",
                             "content": [{"type": "input_text", "text": raw}]}]
    elif isinstance(raw, list):
        items = raw
    else:
        items = []
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        item.setdefault("type", "message")
        if item["type"] == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        item.setdefault("id", "msg_" + secrets.token_hex(12))
        out.append(item)
    return out


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    try:
        return Usage(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0))
    except (TypeError, ValueError):
        return None


@dataclass
class ResponsesAccount(EventAccount):
    """Watches a Responses API stream (typed events; ``data`` carries ``type``).

    Attributes:
        response_id: the response's id, from ``response.created`` (or a later event).
    """

    response_id: str | None = None

    def observe(self, ev: SSEEvent) -> bool:
        named = ev.event
        if ev.data is not None and named is not None and named not in _PARSED_EVENTS \
                and (not self.keep_text or not named.endswith(".delta")):
            # vLLM names every event (``event: response.output_text.delta``): most need
            # no decoding, only counting (a stream has a dozen events per answer)
            self.events += 1
            if named.endswith(".delta"):
                self.produced(None)
            return True
        obj = self.data_object(ev)
        if obj is None:
            return True
        data = ev.data or ""
        kind = obj.get("type") or ev.event or ""
        resp = obj.get("response")
        if isinstance(resp, dict) and self.response_id is None and isinstance(resp.get("id"), str):
            self.response_id = resp["id"]
        if kind == "error" or (kind == "" and "error" in obj):
            err = obj.get("error", obj)
            self.error = str(err.get("message") if isinstance(err, dict) else err)
            if self.events == 1:
                self.first_error_body = data.encode()
        elif kind.endswith(".delta"):
            delta = obj.get("delta")
            self.produced(delta if isinstance(delta, str) else None)
        elif kind in _DONE_EVENTS:
            self.done = True
            u = _usage(resp.get("usage") if isinstance(resp, dict) else None)
            if u is not None:
                self.usage, self.usage_seen = u, True
            if kind == "response.failed" and isinstance(resp, dict):
                err = resp.get("error")
                self.error = str(err.get("message") if isinstance(err, dict) else err)
        return True


class Responses(ProtocolAdapter):
    """``POST /v1/responses``.

    Args:
        store: where ownership of stored responses is recorded.
    """

    endpoint = "responses"
    path = "/v1/responses"
    keeps_state = True
    prompt_keys: ClassVar[tuple[str, ...]] = ("instructions", "input", "tools")

    def __init__(self, store: ResponseStore, *, store_in_thread: bool) -> None:
        self.store = store
        self._in_thread = store_in_thread

    async def _call(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """``fn(*args, **kw)``: in a worker thread for PostgreSQL (a plain sqlite3-backed
        store write takes well under a millisecond and stays on the loop)."""
        if self._in_thread:
            return await asyncio.to_thread(fn, *args, **kw)
        return fn(*args, **kw)

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        model = self.model_of(payload)
        check_stream_fields(payload)
        prev = payload.get("previous_response_id")
        if prev is not None and not isinstance(prev, str):
            raise BadRequest("'previous_response_id' must be a string",
                             param="previous_response_id")
        if "request_id" in payload:
            # vLLM names the response after it and stores it under that name, replacing
            # what was there: a chosen name could overwrite another user's response
            raise BadRequest("'request_id' is not accepted: the engine names each response",
                             param="request_id")
        if payload.get("background") not in (None, False):
            # generated after the answer: its tokens would escape the key's limits, the
            # fair share and the audit row
            raise BadRequest("background responses are not supported by this gateway; "
                             "send the request without 'background' (or stream it)",
                             param="background")
        return RequestSpec(
            model=model, stream=payload.get("stream") is True,
            max_output_tokens=positive_int(payload, "max_output_tokens") or default_max_tokens,
            est_prompt_tokens=estimate_tokens(payload, self.prompt_keys))

    async def locate(self, principal: Principal, payload: dict[str, Any],
                     served: str) -> str | None:
        prev = payload.get("previous_response_id")
        if not isinstance(prev, str):
            return None
        rec = await self._call(self.store.get, prev)
        # a response of another model lives on that model's engine: the engines of
        # ``served`` do not hold it (and the key may not be allowed that model)
        if rec is None or rec.deleted_at is not None or rec.user != principal.user \
                or rec.model != served:
            raise NotFound(f"Previous response with id {prev!r} not found.",
                           param="previous_response_id", code="response_not_found")
        return rec.backend

    async def answered(self, ctx: RequestCtx, payload: dict[str, Any], answer_id: str | None,
                       backend: str) -> None:
        if answer_id is None or payload.get("store") is False or ctx.principal is None:
            return
        await self.store.add(answer_id, user=ctx.principal.user,
                         key_id=ctx.principal.key_id, model=ctx.model or "", backend=backend,
                         input_items=input_items(payload))

    def answer_id(self, body: bytes) -> str | None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        rid = obj.get("id") if isinstance(obj, dict) else None
        return rid if isinstance(rid, str) else None

    def usage(self, body: bytes) -> Usage | None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return _usage(obj.get("usage")) if isinstance(obj, dict) else None

    def text(self, body: bytes) -> str | None:
        try:
            out = orjson.loads(body).get("output") or []
            return "".join(c.get("text") or "" for item in out if isinstance(item, dict)
                           for c in item.get("content") or [] if isinstance(c, dict))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return None

    def new_account(self, *, strip_usage: bool, keep_text: bool) -> EventAccount:
        return ResponsesAccount(keep_text=keep_text)

    def stream_answer_id(self, account: EventAccount) -> str | None:
        if isinstance(account, ResponsesAccount):
            return account.response_id
        return None

    def error_event(self, message: str, code: str) -> bytes:
        body = orjson.dumps({"type": "error", "code": code, "message": message, "param": None})
        return b"event: error\ndata: " + body + b"\n\n"
