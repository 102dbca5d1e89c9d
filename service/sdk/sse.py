"""The text/event-stream wire format (WHATWG HTML §9.2), parsed one line at a time.

One parser for every reader of killswitch's SSE streams: the guard's revocation feed
(async lines), the CLI's ``alerts watch`` and the tests (sync lines). No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Message:
    event: str
    id: str | None
    data: str


@dataclass(slots=True)
class SseParser:
    """Feed lines (without their line break); a blank line completes a message."""

    _event: str = "message"
    _id: str | None = None
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> Message | None:
        if line == "":
            message = Message(self._event, self._id, "\n".join(self._data)) if self._data else None
            self._event, self._id, self._data = "message", None, []
            return message
        if line.startswith(":"):
            return None  # a comment (some proxies keep connections open this way)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        elif name == "data":
            self._data.append(value)
        return None


def messages(lines: Iterable[str]) -> Iterator[Message]:
    parser = SseParser()
    for line in lines:
        message = parser.feed(line)
        if message is not None:
            yield message
