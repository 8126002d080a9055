"""Anthropic's Messages API (``POST /v1/messages``) as a protocol adapter, for Claude Code
and the ``anthropic`` SDKs pointed at the gateway (``ANTHROPIC_BASE_URL``).

vLLM (0.32) answers ``/v1/messages`` itself: the body goes to the backend unchanged but
for ``model`` (the served name) and ``priority``. The key may come as ``x-api-key`` or
``Authorization: Bearer`` (Claude Code sends one or the other); ``anthropic-version`` and
the other ``anthropic-*`` headers are accepted and not passed on (vLLM reads none). vLLM's
Messages request has no ``priority`` field (it drops unknown fields): the engine reads the
request's priority from the ``X-Vllm-Priority`` header the pipeline sends.

Errors on these paths are in Anthropic's shape,
``{"type": "error", "error": {"type": ..., "message": ...}}``, with the same statuses and
``Retry-After`` as on the OpenAI paths. Types by status (Anthropic's errors reference):

======  =====================  ===========================================
status  type                   when
======  =====================  ===========================================
400     invalid_request_error  a bad body, a prompt past the context
401     authentication_error   missing, unknown, expired or revoked key
403     permission_error       an admin endpoint with a user key
404     not_found_error        unknown model (or one this key may not use), no route
405     invalid_request_error  a method the route does not serve
413     request_too_large      body over ``max_body_bytes``
415     invalid_request_error  a body that is not JSON
429     rate_limit_error       a limit or the per-user queue bound
503     overloaded_error       no backend up, the queue full or timed out
5xx     api_error              the backend failed (502, 504), a gateway bug
======  =====================  ===========================================

Every path under ``/v1/messages`` answers in this shape, the gateway's own 404, 405 and
500 included (:mod:`teamgpu.api.anthropic_errors`).

Streams are relayed unchanged (``event: message_start`` ... ``event: message_stop``);
usage is ``message_start``'s ``input_tokens`` and ``message_delta``'s ``output_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec, estimate_tokens
from teamgpu.api.anthropic_errors import anthropic_error_body, anthropic_error_type
from teamgpu.api.body import check_stream_fields, positive_int
from teamgpu.errors import BadRequest, GatewayError
from teamgpu.upstream.sse import SSEEvent
from teamgpu.upstream.usage import EventAccount, Usage

__all__ = ["MESSAGES", "AnthropicMessages", "MessagesAccount", "anthropic_error_body",
           "anthropic_error_type"]

# named events the account only counts (usage, errors and the end are in the others)
_COUNTED_EVENTS = frozenset({"content_block_delta", "content_block_start", "content_block_stop",
                             "ping"})
_STATUS_OF_TYPE = {"invalid_request_error": 400, "authentication_error": 401,
                   "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                   "rate_limit_error": 429, "overloaded_error": 503}


def _message_of(data: bytes) -> tuple[str | None, str | None]:
    """(type, message) of an error body in Anthropic's or OpenAI's shape."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        t, m = err.get("type"), err.get("message")
        return (t if isinstance(t, str) else None), (m if isinstance(m, str) else None)
    return None, None


@dataclass
class MessagesAccount(EventAccount):
    """Watches an Anthropic Messages stream (typed ``event:`` lines).

    ``message_start`` carries the input tokens (and 0 output tokens), ``message_delta``
    the output tokens: a stream that ends between them (a client that left, an engine
    that broke) is charged the input tokens and the content events counted so far.

    Attributes:
        output_seen: a ``message_delta`` with the output tokens arrived.
    """

    output_seen: bool = False

    def observe(self, ev: SSEEvent) -> bool:
        named = ev.event
        if ev.data is not None and named in _COUNTED_EVENTS and not self.keep_text:
            # vLLM names every event (``event: content_block_delta``): the deltas need
            # counting, not decoding
            self.events += 1
            if named == "content_block_delta":
                self.produced(None)
            return True
        return self._observe_data(ev)

    def _observe_data(self, ev: SSEEvent) -> bool:
        obj = self.data_object(ev)
        if obj is None:
            return True
        data = ev.data or ""
        kind = obj.get("type") or ev.event
        if kind == "error":
            err = obj.get("error")
            self.error = str(err.get("message") if isinstance(err, dict) else err)
            if self.events == 1:
                self.first_error_body = data.encode()
        elif kind == "message_start":
            msg = obj.get("message")
            self._take_usage(msg.get("usage") if isinstance(msg, dict) else None)
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            piece = None
            if isinstance(delta, dict):
                piece = delta.get("text") or delta.get("thinking") or delta.get("partial_json")
            self.produced(piece if isinstance(piece, str) else None)
        elif kind == "message_delta":
            u = obj.get("usage")
            self._take_usage(u)
            self.output_seen = self.output_seen or (
                isinstance(u, dict) and isinstance(u.get("output_tokens"), int))
        elif kind == "message_stop":
            self.done = True
        return True

    def final_usage(self, estimated_prompt_tokens: int = 0) -> Usage:
        if self.output_seen:
            return self.usage
        prompt = self.usage.prompt_tokens if self.usage_seen else estimated_prompt_tokens
        return Usage(prompt, self.content_chunks)

    def _take_usage(self, u: Any) -> None:
        if not isinstance(u, dict):
            return
        inp, out = u.get("input_tokens"), u.get("output_tokens")
        prompt = inp if isinstance(inp, int) else self.usage.prompt_tokens
        completion = out if isinstance(out, int) else self.usage.completion_tokens
        self.usage = Usage(prompt, completion)
        self.usage_seen = True


class AnthropicMessages(ProtocolAdapter):
    """``POST /v1/messages`` (Anthropic Messages)."""

    endpoint = "messages"
    path = "/v1/messages"
    prompt_keys: ClassVar[tuple[str, ...]] = ("system", "messages", "tools")

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        model = self.model_of(payload)
        check_stream_fields(payload)
        max_tokens = positive_int(payload, "max_tokens")
        if max_tokens is None:  # required by the Messages API
            raise BadRequest("max_tokens: Field required", param="max_tokens")
        if not isinstance(payload.get("messages"), list):
            raise BadRequest("messages: Field required (a list of messages)", param="messages")
        return RequestSpec(model=model, stream=payload.get("stream") is True,
                           max_output_tokens=max_tokens,
                           est_prompt_tokens=estimate_tokens(payload, self.prompt_keys))

    def usage(self, body: bytes) -> Usage | None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        u = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(u, dict):
            return None
        try:
            return Usage(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0))
        except (TypeError, ValueError):
            return None

    def text(self, body: bytes) -> str | None:
        try:
            blocks = orjson.loads(body).get("content") or []
            return "".join(b.get("text") or "" for b in blocks if isinstance(b, dict))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return None

    def new_account(self, *, strip_usage: bool, keep_text: bool) -> EventAccount:
        return MessagesAccount(keep_text=keep_text)

    def error_response(self, exc: GatewayError, headers: dict[str, str] | None = None
                       ) -> Response:
        h = dict(exc.headers)
        if headers:
            h.update(headers)
        return Response(anthropic_error_body(exc.status, exc.message), exc.status, headers=h,
                        media_type="application/json")

    def error_event(self, message: str, code: str) -> bytes:
        body = orjson.dumps({"type": "error", "error": {"type": "api_error",
                                                        "message": message}})
        return b"event: error\ndata: " + body + b"\n\n"

    def stream_start_error(self, data: bytes) -> tuple[int, bytes]:
        kind, message = _message_of(data)
        status = _STATUS_OF_TYPE.get(kind or "", 502)
        if status >= 500:
            return status, anthropic_error_body(status, f"backend failed: {message or 'error'}")
        return status, anthropic_error_body(status, message or data.decode("utf-8", "replace"))


MESSAGES = AnthropicMessages()
