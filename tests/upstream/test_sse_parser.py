"""SSEParser: complete events only, whatever the read boundaries (faults F2 and F3)."""

from __future__ import annotations

import pytest

from teamgpu.upstream import sse
from teamgpu.upstream.sse import SSEParseError, SSEParser


def feed_all(chunks: list[bytes]) -> tuple[SSEParser, list[sse.SSEEvent]]:
    p = SSEParser()
    out: list[sse.SSEEvent] = []
    for c in chunks:
        out += p.feed(c)
    return p, out


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream in one read, and cut in two at every offset."""
    return [[stream]] + [[stream[:i], stream[i:]] for i in range(1, len(stream))]


CJK = "北京"
EMOJI = "🙂"

# one stream in each line-ending style, with a multi-byte character in each event
STREAMS = {
    "lf": f'data: {{"t": "{CJK}"}}\n\ndata: {{"t": "{EMOJI}"}}\n\ndata: [DONE]\n\n',
    "crlf": f'data: {{"t": "{CJK}"}}\r\n\r\ndata: {{"t": "{EMOJI}"}}\r\n\r\ndata: [DONE]\r\n\r\n',
    "cr": f'data: {{"t": "{CJK}"}}\r\rdata: {{"t": "{EMOJI}"}}\r\rdata: [DONE]\r\r',
    "nospace": f'data:{{"t": "{CJK}"}}\n\ndata:{{"t": "{EMOJI}"}}\n\ndata:[DONE]\n\n',
}
EXPECTED = [f'{{"t": "{CJK}"}}', f'{{"t": "{EMOJI}"}}', "[DONE]"]


@pytest.mark.parametrize("style", sorted(STREAMS))
def test_every_split_point_gives_the_same_events(style: str) -> None:
    stream = STREAMS[style].encode()
    for chunks in splits(stream):
        p, evs = feed_all(chunks)
        datas = [e.data for e in evs if e.data is not None]
        assert datas == EXPECTED, (style, chunks)
        assert all("\ufffd" not in d for d in datas), chunks
        # no byte lost or added: the events' raw bytes are the stream
        assert b"".join(e.raw for e in evs) == stream, chunks
        assert p.pending == b""


@pytest.mark.parametrize("style", sorted(STREAMS))
def test_every_pair_of_split_points(style: str) -> None:
    stream = STREAMS[style].encode()
    n = len(stream)
    for i in range(1, n):
        for j in range(i + 1, n):
            _, evs = feed_all([stream[:i], stream[i:j], stream[j:]])
            assert [e.data for e in evs if e.data is not None] == EXPECTED, (i, j)
            assert b"".join(e.raw for e in evs) == stream, (i, j)


def test_byte_by_byte() -> None:
    stream = STREAMS["crlf"].encode()
    _, evs = feed_all([bytes([b]) for b in stream])
    assert [e.data for e in evs if e.data is not None] == EXPECTED
    assert b"".join(e.raw for e in evs) == stream


def test_an_event_is_yielded_only_when_its_blank_line_arrives() -> None:
    p = SSEParser()
    assert p.feed(b'data: {"a": 1}\n') == []
    assert p.pending == b'data: {"a": 1}\n'
    evs = p.feed(b"\n")
    assert [e.data for e in evs] == ['{"a": 1}']
    assert evs[0].raw == b'data: {"a": 1}\n\n'


def test_a_split_multibyte_character_is_never_decoded_half_way() -> None:
    raw = f"data: {EMOJI}{CJK}\n\n".encode()
    start = raw.index(EMOJI.encode())
    for cut in range(start + 1, start + len(EMOJI.encode()) + len(CJK.encode())):
        _, evs = feed_all([raw[:cut], raw[cut:]])
        assert [e.data for e in evs] == [EMOJI + CJK], cut


def test_multi_line_data_is_joined_with_newlines() -> None:
    _, evs = feed_all([b"data: a\ndata: b\ndata\n\n"])
    assert [e.data for e in evs] == ["a\nb\n"]


def test_event_field_comments_and_id() -> None:
    _, evs = feed_all([b": keep-alive\n\nevent: error\ndata: x\nid: 7\nretry: 10\n\n"])
    assert evs[0].data is None and evs[0].raw == b": keep-alive\n\n"
    assert (evs[1].event, evs[1].data) == ("error", "x")


def test_only_one_leading_space_is_removed() -> None:
    _, evs = feed_all([b"data:  two spaces\n\n"])
    assert evs[0].data == " two spaces"


def test_stray_blank_lines_are_kept_as_bytes() -> None:
    stream = b"data: a\n\n\n\ndata: b\n\n"
    _, evs = feed_all([stream])
    assert [e.data for e in evs if e.data is not None] == ["a", "b"]
    assert b"".join(e.raw for e in evs) == stream


def test_crlf_split_between_cr_and_lf_of_the_blank_line() -> None:
    """The LF that completes a CRLF blank line arrives in the next read: it is not
    lost, and it is not glued to the following event (where a relay that drops that
    event, the usage chunk, would drop the LF with it)."""
    first = b"data: a\r\n\r"
    second = b'\ndata: {"usage": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    _, evs = feed_all([first, second])
    assert [e.data for e in evs if e.data is not None] == ["a", '{"usage": 1}', "[DONE]"]
    assert b"".join(e.raw for e in evs) == first + second
    usage_ev = next(e for e in evs if e.data == '{"usage": 1}')
    assert usage_ev.raw == b'data: {"usage": 1}\r\n\r\n'


def test_an_unterminated_huge_event_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 64)
    p = SSEParser()
    with pytest.raises(SSEParseError):
        p.feed(b"data: " + b"x" * 100)


def test_many_lines_without_a_blank_line_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 64)
    p = SSEParser()

    def feed_lines() -> None:
        for _ in range(20):
            p.feed(b"data: xxxxxxxx\n")

    with pytest.raises(SSEParseError):
        feed_lines()


def test_empty_feed() -> None:
    assert SSEParser().feed(b"") == []
