"""Reading Server-Sent Events from bytes as they arrive: the ``data`` of each event
(WHATWG HTML, "9.2.6 Interpreting an event stream").

Written by hand rather than with httpx-sse because the upstream relay reads one event per
token from every upstream, and the generic decoder's layers (bytes → text → lines → event
objects, an async generator each) cost about 16 % of the front's CPU at 400 relayed
streams (some 18 µs of its 114 µs per token, measured with py-spy). This
decoder takes whatever one network read brought, splits it on blank lines, and keeps only
what the relay uses, the ``data`` field (``id``, ``event`` and ``retry`` are read past;
tokenspout makes the client's stream itself).

What the spec says and this follows: lines end with CRLF, LF or CR (a CRLF split across two
reads is one line end); a line starting with ``:`` is a comment; ``field: value`` loses one
space after the colon, a line without a colon is a field with an empty value; several
``data`` lines are joined with LF; an event without a ``data`` field is not dispatched, nor
is an event the stream ends in the middle of; a UTF-8 byte order mark at the start is
skipped.

An event not yet ended is kept as the reads that brought it, joined once when its blank
line comes: each read's bytes are searched once, so an event's cost is linear in its size
(joining the buffer to every read, as this did, cost 138 ms per 64 KiB read once 100 MiB
were buffered). An event longer than ``MAX_EVENT_BYTES`` is refused
(``EventTooLargeError``) rather than kept without bound: an upstream whose ``data:`` line
never ends is broken, like one that sends a malformed chunk.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"

#: The longest event kept (16 MiB): far above any chunk an OpenAI-compatible server sends
#: (a token's text, a tool call's piece, logprobs; an 8 MB event was seen and is taken).
MAX_EVENT_BYTES = 16 << 20


class EventTooLargeError(ValueError):
    """An event went on past ``max_event_bytes`` without ending."""


class SSEDataDecoder:
    """``feed`` the bytes of one response as they arrive; it returns the ``data`` of every
    event they completed, in order, as bytes (``json.loads`` takes them as they are)."""

    __slots__ = ("_max_event_bytes", "_pending", "_pending_bytes", "_skip_lf", "_started")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        #: The reads (none empty) of the event not yet ended by a blank line, line ends as
        #: LF, and their total length.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        #: The last read ended with CR: an LF at the start of the next one is its CRLF.
        self._skip_lf = False
        self._started = False

    def feed(self, data: bytes) -> list[bytes]:
        """The ``data`` of the events ``data`` ended; ``EventTooLargeError`` when the event
        not yet ended holds more than ``max_event_bytes``."""
        if not self._started:
            sofar = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            if len(sofar) + len(data) < len(_BOM) and _BOM.startswith(sofar + data):
                self._keep(sofar + data)  # maybe a BOM, not whole yet
                return []
            data = sofar + data
            self._started = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            return []
        # Only the new bytes are searched: a blank line within them, or one whose first LF
        # ended the last read.
        ended = b"\n\n" in data or (
            data[:1] == b"\n" and self._pending and self._pending[-1][-1:] == b"\n"
        )
        if not ended:
            self._keep(data)
            return []
        if self._pending:
            data = b"".join((*self._pending, data))
            self._pending, self._pending_bytes = [], 0
        *events, rest = data.split(b"\n\n")
        self._keep(rest)
        out = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                out.append(event[6:])  # the usual event: one data line, nothing else
            elif (value := _data(event)) is not None:
                out.append(value)
        return out

    def _keep(self, data: bytes) -> None:
        """Hold ``data`` as part of the event not yet ended."""
        if not data:
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self._max_event_bytes:
            raise EventTooLargeError(
                f"an event longer than {self._max_event_bytes} bytes without an end"
            )


def _data(event: bytes) -> bytes | None:
    """The ``data`` of one event's lines (LF-separated), None when it has no such field."""
    values: list[bytes] | None = None
    for line in event.split(b"\n"):
        if not line or line[0] == 0x3A:  # a blank line (a run of them) or a ":" comment
            continue
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue
        if colon and value[:1] == b" ":
            value = value[1:]
        if values is None:
            values = []
        values.append(value)
    return None if values is None else b"\n".join(values)
