"""Incremental Server-Sent Events parsing for accounting.

The relay forwards the backend's bytes untouched; this parser only watches them. It keeps
partial events across network reads and yields an event only once its terminating blank
line has arrived (``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``), so an event split across two
reads, or a multi-byte UTF-8 character split between them, is never decoded half-way
(faults F2 and F3 of ``shared/cases/public-faults.md``). Decoding happens per complete
event, and complete events always hold whole characters.

Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class SSEEvent:
    """One complete event.

    Attributes:
        raw: the exact bytes of the event, terminating blank line included.
        data: the ``data:`` lines joined with ``\\n`` (None for a comment-only event).
        event: the ``event:`` field, if any.
    """

    raw: bytes
    data: str | None
    event: str | None = None


class SSEParseError(Exception):
    """An event grew beyond ``MAX_EVENT_BYTES`` without a terminator."""


class SSEParser:
    """Feed bytes as they arrive; get complete events back."""

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of the event being read
        self._line_start = 0  # offset in _buf of the line being read
        self._data: list[str] = []
        self._event: str | None = None
        self._has_field = False
        self._skip_lf = False  # previous chunk ended with CR: a following LF belongs to it

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completed (possibly none)."""
        out: list[SSEEvent] = []
        buf = self._buf
        i = 0
        n = len(chunk)
        if not n:
            return out
        if self._skip_lf and n and chunk[0] == 0x0A:
            # the LF of a CRLF split across reads
            if buf:
                buf.append(0x0A)
                self._line_start = len(buf)
            else:
                # it ends the blank line of the event dispatched at the CR: it belongs to
                # no following event (a relay that drops that event must not drop it)
                out.append(SSEEvent(raw=b"\n", data=None))
            i = 1
        self._skip_lf = False
        while i < n:
            # find the next line end in chunk[i:]
            lf = chunk.find(b"\n", i)
            cr = chunk.find(b"\r", i)
            if lf < 0 and cr < 0:
                buf += chunk[i:]
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                end = cr
                if end + 1 < n and chunk[end + 1] == 0x0A:
                    nxt = end + 2
                elif end + 1 == n:
                    nxt = n
                    self._skip_lf = True
                else:
                    nxt = end + 1
            else:
                end = lf
                nxt = lf + 1
            line = bytes(buf[self._line_start :]) + chunk[i:end]
            buf += chunk[i:nxt]
            self._line_start = len(buf)
            i = nxt
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        if len(buf) > MAX_EVENT_BYTES:  # one line, or many lines without a blank one
            raise SSEParseError(f"SSE event larger than {MAX_EVENT_BYTES} bytes")
        return out

    def _line(self, line: bytes) -> SSEEvent | None:
        if not line:  # blank line: dispatch
            raw = bytes(self._buf)
            self._buf.clear()
            self._line_start = 0
            if not self._has_field:
                # comment-only or stray blank line: kept so that no byte is lost
                return SSEEvent(raw=raw, data=None)
            data = "\n".join(self._data) if self._data else None
            ev = SSEEvent(raw=raw, data=data, event=self._event)
            self._data = []
            self._event = None
            self._has_field = False
            return ev
        if line[:1] == b":":
            return None
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._has_field = True
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
            self._has_field = True
        elif name in (b"id", b"retry"):
            self._has_field = True
        return None

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return bytes(self._buf)
