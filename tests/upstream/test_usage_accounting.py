"""Usage extraction from bodies and streams (StreamAccount)."""

from __future__ import annotations

import orjson
import pytest

from teamgpu.upstream.sse import SSEEvent, SSEParser
from teamgpu.upstream.usage import StreamAccount, Usage, text_from_body, usage_from_body


def ev(obj: object) -> SSEEvent:
    data = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
    return SSEEvent(raw=f"data: {data}\n\n".encode(), data=data)


def chat_chunk(content: str | None, *, usage: object = "absent") -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    d: dict[str, object] = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    if usage != "absent":
        d["usage"] = usage
    return d


USAGE_CHUNK = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3,
                                        "total_tokens": 10}}


def test_usage_from_body() -> None:
    body = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    assert usage_from_body(body) == Usage(5, 2)
    assert usage_from_body(b'{"usage": {"prompt_tokens": 3, "total_tokens": 3}}') == Usage(3, 0)
    assert usage_from_body(b"{}") is None
    assert usage_from_body(b"not json") is None
    assert usage_from_body(b"[1, 2]") is None
    assert usage_from_body(b'{"usage": {"prompt_tokens": "x"}}') is None
    assert Usage(5, 2).total == 7


def test_text_from_body() -> None:
    chat = {"choices": [{"message": {"content": "hi"}}, {"message": {"content": "!"}}]}
    assert text_from_body(orjson.dumps(chat)) == "hi!"
    assert text_from_body(orjson.dumps({"choices": [{"text": "raw"}]})) == "raw"
    assert text_from_body(b"nope") is None


def test_usage_chunk_is_taken_and_stripped_when_the_gateway_asked_for_it() -> None:
    acc = StreamAccount(strip_usage_chunk=True)
    assert acc.observe(ev(chat_chunk("a", usage=None))) is True
    assert acc.observe(ev(chat_chunk("b", usage=None))) is True
    assert acc.observe(ev(USAGE_CHUNK)) is False
    assert acc.observe(ev("[DONE]")) is True
    assert acc.done and acc.usage_seen
    assert acc.final_usage(99) == Usage(7, 3)
    assert acc.content_chunks == 2


def test_usage_chunk_is_kept_when_the_client_asked_for_it() -> None:
    acc = StreamAccount(strip_usage_chunk=False)
    assert acc.observe(ev(USAGE_CHUNK)) is True
    assert acc.final_usage() == Usage(7, 3)


def test_without_a_usage_chunk_the_content_chunks_are_counted() -> None:
    acc = StreamAccount()
    acc.observe(ev(chat_chunk(None)))  # role-only chunk: no content
    acc.observe(ev(chat_chunk("x")))
    acc.observe(ev({"choices": [{"index": 0, "text": "y"}]}))  # completions chunk
    assert acc.first_token_at is not None
    assert acc.final_usage(11) == Usage(11, 2)


def test_tool_call_chunks_count_as_produced() -> None:
    acc = StreamAccount()
    acc.observe(ev({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]}))
    assert acc.content_chunks == 1


def test_keep_text() -> None:
    acc = StreamAccount(keep_text=True)
    for t in ("北", "京"):
        acc.observe(ev(chat_chunk(t)))
    assert "".join(acc.text) == "北京"


def test_error_event_first_and_later() -> None:
    acc = StreamAccount()
    acc.observe(ev({"error": {"message": "bad", "code": 400}}))
    assert acc.error == "bad"
    assert acc.first_error_body is not None
    later = StreamAccount()
    later.observe(ev(chat_chunk("a")))
    later.observe(ev({"error": "boom"}))
    assert later.error == "boom" and later.first_error_body is None


@pytest.mark.parametrize("data", [None, "not json", "[1]"])
def test_events_that_are_not_objects_are_passed(data: str | None) -> None:
    acc = StreamAccount(strip_usage_chunk=True)
    assert acc.observe(SSEEvent(raw=b": c\n\n" if data is None else b"x", data=data)) is True
    assert acc.final_usage() == Usage(0, 0)


def test_parser_and_account_on_a_split_stream() -> None:
    """The pieces together, as the relay uses them: a stream cut inside a character."""
    events = [chat_chunk("北京", usage=None), chat_chunk("🙂", usage=None), USAGE_CHUNK]
    stream = b"".join(ev(e).raw for e in events) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        p, acc = SSEParser(), StreamAccount(strip_usage_chunk=True, keep_text=True)
        kept = b"".join(e.raw for c in (stream[:cut], stream[cut:]) for e in p.feed(c)
                        if acc.observe(e))
        assert kept == stream.replace(ev(USAGE_CHUNK).raw, b"")
        assert "".join(acc.text) == "北京🙂"
        assert acc.final_usage() == Usage(7, 3) and acc.done
