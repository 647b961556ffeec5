"""A request body sent compressed (`Content-Encoding: gzip`, as some SDKs and HTTP
clients do for large prompts), inflated before anything reads it.

The size limit applies to what the body inflates to, not only to what crossed the wire:
a few kilobytes of gzip can inflate to gigabytes."""

from __future__ import annotations

import zlib

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
    if coding is None or not body:  # no body (a GET from a client that labels every request)
        return body
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return body
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise GatewayError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"The request body's Content-Encoding `{coding}` is not supported: send it uncompressed, "
            "gzip or deflate.", code="unsupported_content_encoding",
        )
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
        raise invalid_request(
            f"The request body is not valid {coding} data: {exc}.", code="invalid_content_encoding"
        ) from None
    if len(out) > limit:
        raise too_large(limit)
    if not inflate.eof:
        raise invalid_request(
            f"The request body's {coding} data ends before its compressed stream does.",
            code="invalid_content_encoding",
        )
    return out
