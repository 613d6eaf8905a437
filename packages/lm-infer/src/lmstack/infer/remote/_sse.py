"""An incremental decoder of server-sent events (the ``text/event-stream`` format OpenAI streams use).

It follows the WHATWG rules: lines end in CRLF, LF or CR (a CR at the end of a read is held back in
case its LF comes with the next read), ``:`` starts a comment, a blank line dispatches the event, and
several ``data:`` lines join with newlines. Bytes are split into lines before decoding, so a UTF-8
character split across reads arrives whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent"]

_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    r"""One dispatched event.

    Attributes:
        data: The event's data lines, joined with ``"\n"``.
        event: The event type (``"message"`` unless the server named one).
        id: The last event id seen, if any.
    """

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Turns the bytes of an event stream, in reads of any size, into :class:`ServerSentEvent` s."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._first_line = True

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Consumes one read and returns the events it completed."""
        self._buffer += chunk
        events: list[ServerSentEvent] = []
        pos = 0
        while True:
            match = _EOL.search(self._buffer, pos)
            # A CR ending the buffer may be the first half of a CRLF split across two reads.
            if match is None or (match.group() == b"\r" and match.end() == len(self._buffer)):
                break
            event = self._line(self._buffer[pos : match.start()])
            if event is not None:
                events.append(event)
            pos = match.end()
        self._buffer = self._buffer[pos:]
        return events

    def flush(self) -> list[ServerSentEvent]:
        """Ends the stream: returns the last event even if the server did not end it with a blank line."""
        events: list[ServerSentEvent] = []
        rest, self._buffer = self._buffer, b""
        for line in _EOL.split(rest):
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self._last_id)
