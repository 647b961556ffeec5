"""Server-sent events, sans-IO: bytes in, frames out; frames in, bytes out.

The decoder keeps each frame's exact bytes so a relay can forward what it received
without re-encoding it.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.domain.errors import ErrorKind, GatewayError

# The largest event (SSE frame, NDJSON line) a backend may send: far above any real one (a
# vLLM chunk with a long prompt's `prompt_logprobs` is a few MB), low enough that a broken
# backend streaming without a line end cannot fill the gateway's memory.
MAX_FRAME_BYTES = 64 << 20


def frame_too_large() -> GatewayError:
    return GatewayError(
        ErrorKind.BACKEND, f"The backend sent a stream event larger than {MAX_FRAME_BYTES >> 20} MiB."
    )


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
    """Splits a byte stream into frames; partial frames wait for the next `feed`.

    A frame arriving over many reads is kept as its parts and joined once, when the blank
    line that ends it comes: joining at every read made a large frame cost quadratic time
    (a 50 MB line took 46 s of the event loop). A frame past `MAX_FRAME_BYTES` is refused."""

    __slots__ = ("_after_cr", "_parts", "_pending")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unfinished frame
        self._pending = 0
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
        parts = self._parts
        if parts:
            if b"\n\n" not in chunk and not (chunk.startswith(b"\n") and parts[-1].endswith(b"\n")):
                self._keep(chunk)
                return []
            buffer = b"".join(parts) + chunk
        else:
            buffer = chunk
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
        self._parts, self._pending = [], 0
        if start < len(buffer):
            self._keep(buffer[start:])
        return frames

    def _keep(self, part: bytes) -> None:
        if not part:
            return
        self._pending += len(part)
        if self._pending > MAX_FRAME_BYTES:
            self._parts, self._pending = [], 0
            raise frame_too_large()
        self._parts.append(part)

    def close(self) -> list[SSEFrame]:
        """Flush a final frame the peer did not terminate with a blank line."""
        block = b"".join(self._parts).strip(b"\n")
        self._parts, self._pending = [], 0
        return [_parse_block(block)] if block else []

    @property
    def pending(self) -> bool:
        return any(part.strip() for part in self._parts)


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
        elif name == b"error":
            # llama.cpp's server reports a failure in a stream as an `error:` line (then says
            # `[DONE]` all the same): read as an `error` event, not skipped as a field unknown.
            data.append(value)
            event = "error"
    return SSEFrame(data=b"\n".join(data), event=event, raw=raw)


def encode_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE frame; `data` must not contain newlines (JSON from json.dumps never does)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"
