"""A backend's compressed response body, decoded as it arrives.

The gateway asks every backend for `accept-encoding: identity`, but a reverse proxy in
front of one (nginx with `gzip on` for `text/event-stream`, a CDN) may compress anyway.
httpx decodes a body only when it is read whole; the streamed reads (SSE parsers, relays,
error bodies) take the raw stream. So the transport decodes here, once per response, and
hands everyone else identity bytes: an uncompressed answer pays one header lookup.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import httpx

# Decoded bytes handed on per step: a small compressed chunk may inflate enormously (a
# "zip bomb"), and the reader's own limits only apply to what it is given.
_PIECE = 1 << 20

_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def decoding(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The content coding of a response head the gateway decodes (gzip, deflate), or None."""
    for name, value in headers:
        if name.lower() == b"content-encoding":
            coding = value.strip().lower()
            return coding if coding in _WBITS else None
    return None


def identity_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The head of the decoded body: its length and coding were the compressed one's."""
    return [(name, value) for name, value in headers if name.lower() not in (b"content-encoding", b"content-length")]


class Decoded(httpx.AsyncByteStream):
    """`body`, inflated step by step. A corrupt or cut-short one is the backend breaking
    off its answer (`RemoteProtocolError`), as a cut connection is."""

    def __init__(self, body: httpx.AsyncByteStream, coding: bytes) -> None:
        self._body = body
        self._chunks = body.__aiter__()
        self._coding = coding
        self._inflate = zlib.decompressobj(_WBITS[coding])
        self._started = False
        self._ended = False

    def __aiter__(self) -> Decoded:
        return self

    async def __anext__(self) -> bytes:
        while not self._ended:
            data = self._inflate.unconsumed_tail
            if not data:
                try:
                    data = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self._ended = True
                    return self._last()
            out = self._decompress(data)
            if out:
                return out
        raise StopAsyncIteration

    def _decompress(self, data: bytes) -> bytes:
        try:
            out = self._inflate.decompress(data, _PIECE)
        except zlib.error as exc:
            if self._coding == b"deflate" and not self._started:
                # "deflate" is zlib-wrapped by the standard, raw from some servers (httpx takes both).
                self._started = True
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._decompress(data)
            raise self._broken(str(exc)) from None
        self._started = True
        return out

    def _last(self) -> bytes:
        rest = self._inflate.flush()
        if self._started and not self._inflate.eof:
            raise self._broken("it ended before its compressed stream did")
        if rest:
            return rest
        raise StopAsyncIteration

    def _broken(self, why: str) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(f"the backend's {self._coding.decode()} body is corrupt: {why}")

    async def aclose(self) -> None:
        await self._body.aclose()
