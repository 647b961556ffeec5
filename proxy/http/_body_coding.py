"""A request body sent compressed (`Content-Encoding: gzip`, as some SDKs and HTTP
clients do for large prompts), inflated before anything reads it.

The size limit applies to what the body inflates to, not only to what crossed the wire:
a few kilobytes of gzip can inflate to gigabytes."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from proxy.domain.errors import ErrorKind, GatewayError, invalid_request

_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        ErrorKind.REQUEST_TOO_LARGE, f"The request body is too large (the limit is {limit} bytes).",
        code="request_too_large",
    )


def inflate_body(body: bytes, coding: str | None, limit: int) -> bytes:
    """`body` as sent before its `Content-Encoding` (`coding`): 413 when it inflates past
    `limit`, 415 for a coding the gateway does not speak, 400 for a corrupt one."""
    if not body:  # no body (a GET from a client that labels every request)
        return body
    found = _coding(coding)
    if found is None:
        return body
    coding, wbits = found
    inflate = zlib.decompressobj(wbits)
    try:
        try:
            out = inflate.decompress(body, limit + 1)
        except zlib.error:
            if coding != "deflate":
                raise
            # "deflate" is zlib-wrapped by the standard, raw from some clients.
            inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            out = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _corrupt(coding, exc) from None
    if len(out) > limit:
        raise too_large(limit)
    if not inflate.eof:
        raise _cut_short(coding)
    return out


class Inflater:
    """A compressed body inflated as its bytes arrive (a streamed upload), never more than a
    piece at a time: what it inflates to is counted by its reader, so a small bomb is refused
    at the limit, not after it has filled the memory."""

    def __init__(self, coding: str, wbits: int) -> None:
        self._coding = coding
        self._inflate = zlib.decompressobj(wbits)
        self._fed = False

    def pieces(self, data: bytes, size: int) -> Iterator[bytes]:
        """What `data` inflates to, in pieces of at most `size` bytes."""
        while data and not self._inflate.eof:
            try:
                out = self._inflate.decompress(data, size)
            except zlib.error as exc:
                if self._coding == "deflate" and not self._fed:
                    # "deflate" is zlib-wrapped by the standard, raw from some clients.
                    self._inflate, self._fed = zlib.decompressobj(-zlib.MAX_WBITS), True
                    continue
                raise _corrupt(self._coding, exc) from None
            self._fed = True
            data = self._inflate.unconsumed_tail
            if out:
                yield out

    def finish(self) -> None:
        if not self._inflate.eof:
            raise _cut_short(self._coding)


def inflater(coding: str | None) -> Inflater | None:
    """An inflater for a body sent with `Content-Encoding: coding`; None for an uncompressed one."""
    found = _coding(coding)
    return None if found is None else Inflater(*found)


def _coding(coding: str | None) -> tuple[str, int] | None:
    """A `Content-Encoding` and its zlib window bits; None for none; 415 for one the gateway
    does not speak."""
    if coding is None:
        return None
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return None
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise GatewayError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"The request body's Content-Encoding `{coding}` is not supported: send it uncompressed, "
            "gzip or deflate.", code="unsupported_content_encoding",
        )
    return coding, wbits


def _corrupt(coding: str, exc: zlib.error) -> GatewayError:
    return invalid_request(f"The request body is not valid {coding} data: {exc}.", code="invalid_content_encoding")


def _cut_short(coding: str) -> GatewayError:
    return invalid_request(
        f"The request body's {coding} data ends before its compressed stream does.", code="invalid_content_encoding",
    )
