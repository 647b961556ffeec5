"""Server-sent events, sans-IO: bytes in, frames out; frames in, bytes out.

The decoder keeps each frame's exact bytes so a relay can forward what it received
without re-encoding it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SSEFrame:
    """One event. `data` joins the data lines with newlines; `raw` is the frame as received,
    normalised to `\\n` line ends and ending in a blank line."""

    data: bytes
    event: str | None
    raw: bytes

    @property
    def is_comment(self) -> bool:
        return not self.data and self.event is None


class SSEDecoder:
    """Splits a byte stream into frames; partial frames wait for the next `feed`."""

    __slots__ = ("_after_cr", "_buffer")

    def __init__(self) -> None:
        self._buffer = b""
        # The last chunk ended in CR: a LF opening this one completes that CRLF, it is no
        # second line end (which would cut a frame in two).
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[SSEFrame]:
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        frames: list[SSEFrame] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = buffer[start:end]
            start = end + 2
            if block:
                frames.append(_parse_block(block))
        self._buffer = buffer[start:]
        return frames

    def close(self) -> list[SSEFrame]:
        """Flush a final frame the peer did not terminate with a blank line."""
        block, self._buffer = self._buffer.strip(b"\n"), b""
        return [_parse_block(block)] if block else []

    @property
    def pending(self) -> bool:
        return bool(self._buffer.strip())


def _parse_block(block: bytes) -> SSEFrame:
    raw = block + b"\n\n"
    if block.startswith(b"data: ") and b"\n" not in block:
        return SSEFrame(data=block[6:], event=None, raw=raw)
    data: list[bytes] = []
    event: str | None = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return SSEFrame(data=b"\n".join(data), event=event, raw=raw)


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE frame; `data` must not contain newlines (JSON from json.dumps never does)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
