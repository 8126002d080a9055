"""What the fake vLLM's endpoints share: JSON answers, vLLM's error shapes, the prompt
count every endpoint agrees on, and a stream player that writes typed or plain SSE events
with the fake's timing, breaks and client-disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Event", "disconnected_within", "err", "prompt_token_count", "send_body",
           "send_json", "stream_events", "wait_before_token", "watch_disconnect"]


def prompt_token_count(req: dict[str, Any]) -> int:
    """The fake's prompt tokens: one per 4 bytes of the JSON of ``messages`` (or
    ``prompt``), at least 1; ``/tokenize`` and the usage of answers agree on it."""
    return max(1, len(orjson.dumps(req.get("messages") or req.get("prompt"))) // 4)


def err(message: str, status: int, type_: str = "BadRequestError",
        param: str | None = None) -> dict[str, Any]:
    """vLLM's error body: ``{"error": {"message", "type", "param", "code": status}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


async def send_json(send: Any, obj: Any, status: int = 200) -> None:
    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def disconnected_within(receive: Any, timeout_s: float) -> bool:
    """Whether the caller disconnects within ``timeout_s`` (the request body is read)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        return False
    return True


async def watch_disconnect(receive: Any, disconnected: asyncio.Event) -> None:
    """Read ``receive`` (dropping what else arrives) until the caller disconnects, then set
    ``disconnected``: a stream runs it as a task beside its writes."""
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            disconnected.set()
            return


async def wait_before_token(fake: dict[str, Any], i: int, disconnected: asyncio.Event) -> None:
    """Wait before token ``i`` as the request's ``fake`` object says (``delay_s``, plus
    ``pause_s`` before token ``pause_after``), or until ``disconnected`` is set."""
    wait_s = float(fake.get("delay_s", 0))
    pause_after = fake.get("pause_after")
    if pause_after is not None and i == int(pause_after):
        wait_s += float(fake.get("pause_s", 1.0))
    if wait_s:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(disconnected.wait(), wait_s)


async def send_body(send: Any, raw: bytes, *, split: bool = False) -> None:
    """Send ``raw`` as one body part, or with ``split`` in two writes 5 ms apart, cut inside
    a multi-byte UTF-8 character when there is one (faults F2 and F3)."""
    if not split:
        await send({"type": "http.response.body", "body": raw, "more_body": True})
        return
    cut = len(raw) // 2
    for i in range(len(raw)):
        if raw[i] >= 0xC0:
            cut = i + 1
            break
    await send({"type": "http.response.body", "body": raw[:cut], "more_body": True})
    await asyncio.sleep(0.005)
    await send({"type": "http.response.body", "body": raw[cut:], "more_body": True})


@dataclass(frozen=True)
class Event:
    """One SSE event the fake streams.

    Attributes:
        data: the JSON object of its ``data:`` line (or a string such as ``[DONE]``).
        name: its ``event:`` line (vLLM's Anthropic and Responses streams), or None.
        token: the event carries one generated token: the fake's ``delay_s``,
            ``break_after`` and ``pause_after`` count these.
    """

    data: dict[str, Any] | str
    name: str | None = None
    token: bool = False

    def encode(self) -> bytes:
        payload = self.data if isinstance(self.data, str) else orjson.dumps(self.data).decode()
        head = f"event: {self.name}\n" if self.name is not None else ""
        return f"{head}data: {payload}\n\n".encode()


async def stream_events(send: Any, receive: Any, events: Sequence[Event], fake: dict[str, Any],
                        *, on_start: Callable[[], None], on_end: Callable[[bool], None]) -> None:
    """Stream ``events`` as ``text/event-stream``, steered by the request's ``fake`` object
    (``delay_s`` before each token, ``split`` writes, ``break_after`` N tokens,
    ``pause_after``/``pause_s``). ``on_start`` is called once the generation starts and
    ``on_end(aborted)`` when it ends; ``aborted`` is True when the caller disconnected
    (vLLM aborts the request then)."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
    split = bool(fake.get("split"))
    break_after = fake.get("break_after")
    disconnected = asyncio.Event()

    async def write(raw: bytes) -> None:
        await send_body(send, raw, split=split)

    on_start()
    aborted = False
    watcher = asyncio.ensure_future(watch_disconnect(receive, disconnected))
    try:
        tokens = 0
        for ev in events:
            if ev.token:
                await wait_before_token(fake, tokens, disconnected)
                if break_after is not None and tokens >= int(break_after):
                    raise ConnectionResetError("fake backend breaks the stream")
                tokens += 1
            if disconnected.is_set():
                aborted = True
                return
            await write(ev.encode())
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        watcher.cancel()
        on_end(aborted)
