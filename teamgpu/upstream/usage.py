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
        return Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
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
class StreamAccount:
    """Watches the events of one stream.

    Attributes:
        usage: from the backend's usage chunk when it came; else ``completion_tokens`` is
            the number of chunks that carried generated content (vLLM sends one chunk per
            decoding step, so this counts the tokens actually produced when a client
            disconnects before the usage chunk).
        first_token_at: ``time.perf_counter()`` of the first chunk with generated content.
        error: the message of an error event sent by the backend inside the stream.
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
        produced = False
        if choices:
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
                    if self.keep_text:
                        self.text.append(piece)
            if produced:
                self.content_chunks += 1
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
        u = _usage(obj.get("usage"))
        if u is not None:
            self.usage = u
            self.usage_seen = True
            if self.strip_usage_chunk and not choices:
                return False
        return True

    def final_usage(self, estimated_prompt_tokens: int = 0) -> Usage:
        """Usage to record: the backend's, else the content chunks counted so far."""
        if self.usage_seen:
            return self.usage
        return Usage(estimated_prompt_tokens, self.content_chunks)
