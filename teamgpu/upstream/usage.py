"""Token usage and timing taken from backend responses, streamed or not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from teamgpu.upstream.sse import SSEEvent


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_body(body: bytes) -> Usage | None:
    """``usage`` of a non-streaming response body, or None if it has none."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _usage(data.get("usage")) if isinstance(data, dict) else None


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    try:
        # pooling answers (score, rerank) may carry only total_tokens: all of it is prompt
        prompt = u.get("prompt_tokens")
        if prompt is None and "completion_tokens" not in u:
            prompt = u.get("total_tokens")
        return Usage(int(prompt or 0), int(u.get("completion_tokens") or 0))
    except (TypeError, ValueError):
        return None


def text_from_body(body: bytes) -> str | None:
    """The generated text of a non-streaming chat or completion response."""
    try:
        data = orjson.loads(body)
        parts = []
        for ch in data.get("choices") or []:
            msg = ch.get("message") or {}
            parts.append(msg.get("content") or ch.get("text") or "")
        return "".join(parts)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None


@dataclass
class EventAccount:
    """Watches the events of one stream, for any client API (see :class:`StreamAccount`
    for OpenAI's chunks). The relay reads these fields; a subclass fills them in
    :meth:`observe`.

    Attributes:
        strip_usage_chunk: the client did not ask for the usage event the gateway asked
            for on its behalf: :meth:`observe` returns False for it.
        keep_text: keep the generated text (``store_prompts``).
        usage: from the backend's usage event(s) when they came (``usage_seen``).
        content_chunks: events that carried generated content (vLLM sends one per
            decoding step, so this counts the tokens produced when a client disconnects
            before usage arrives); charged to the user's fair share as they stream.
        first_token_at: ``time.perf_counter()`` of the first event with generated content.
        done: the stream's own end marker arrived (OpenAI's ``[DONE]``, Anthropic's
            ``message_stop``, the Responses API's final event).
        error: the message of an error event sent by the backend inside the stream.
        first_error_body: the error event's data when it was the stream's first event:
            the stream is then answered as a non-200 JSON error instead (fault F13).
        events: data events seen.
        text: generated text pieces (only with ``keep_text``).
    """

    strip_usage_chunk: bool = False
    keep_text: bool = False
    usage: Usage = field(default_factory=Usage)
    usage_seen: bool = False
    content_chunks: int = 0
    first_token_at: float | None = None
    done: bool = False
    error: str | None = None
    first_error_body: bytes | None = None
    events: int = 0
    text: list[str] = field(default_factory=list)

    def observe(self, ev: SSEEvent) -> bool:
        """Account for one event. Returns False when the client must not receive it."""
        raise NotImplementedError

    def data_object(self, ev: SSEEvent) -> dict[str, Any] | None:
        """Count a data event and return its JSON object; None for a comment-only event,
        data that is not JSON, or JSON that is not an object."""
        if ev.data is None:
            return None
        self.events += 1
        try:
            obj = orjson.loads(ev.data)
        except orjson.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    def produced(self, piece: str | None) -> None:
        """Count one event that carried generated content (``piece``: its text)."""
        self.content_chunks += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if piece and self.keep_text:
            self.text.append(piece)

    def final_usage(self, estimated_prompt_tokens: int = 0) -> Usage:
        """Usage to record: the backend's, else the content events counted so far."""
        if self.usage_seen:
            return self.usage
        return Usage(estimated_prompt_tokens, self.content_chunks)


@dataclass
class StreamAccount(EventAccount):
    """Watches the chunks of an OpenAI chat or completions stream (``data: {...}``
    events ending with ``data: [DONE]``; usage in the chunk ``stream_options.include_usage``
    asks for)."""

    def observe(self, ev: SSEEvent) -> bool:
        """Account for one event. Returns False when the client must not receive it
        (the usage chunk the gateway asked for on the client's behalf)."""
        data = ev.data
        if data is None:
            return True
        self.events += 1
        if data == "[DONE]":
            self.done = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            self.error = str(err.get("message") if isinstance(err, dict) else err)
            if self.events == 1:
                self.first_error_body = data.encode()
            return True
        choices = obj.get("choices")
        if choices:
            produced = False
            texts: list[str] = []
            for ch in choices:
                delta = ch.get("delta")
                piece = None
                if isinstance(delta, dict):
                    piece = delta.get("content") or delta.get("reasoning_content") or (
                        "" if delta.get("tool_calls") else None
                    )
                    if delta.get("tool_calls"):
                        produced = True
                else:
                    piece = ch.get("text")
                if piece:
                    produced = True
                    texts.append(piece)
            if produced:
                self.produced("".join(texts))
        u = _usage(obj.get("usage"))
        if u is not None:
            self.usage = u
            self.usage_seen = True
            if self.strip_usage_chunk and not choices:
                return False
        return True
