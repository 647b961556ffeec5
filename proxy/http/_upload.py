"""A file upload (`multipart/form-data`) read as its bytes arrive: the file's part goes to a
spooled temporary file (in memory up to a slice, on disk past it), its size counted as it
comes, so a file of hundreds of megabytes never sits whole in the gateway's memory and one
past its limit is refused as soon as its bytes pass it (the rest never read), chunked or not.

Quart's own form parser spools the file too, but reads the whole body first: its limit is
checked against its buffer, not the bytes received, so a chunked body past it is read to its
end (onto disk) before anything can refuse it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from proxy.domain.errors import GatewayError, invalid_request
from proxy.http._body_coding import inflater
from proxy.http._request import PacedRequest

# Bytes of a file kept in memory before it goes to disk; also the pieces the parser is fed.
SPOOL = 1 << 20
_FEED = 1 << 18
# A form's other fields (`purpose`, `expires_after[…]`): small, kept in memory.
_FIELD_MAX = 1 << 16
_PARTS_MAX = 16
# The body past the file's own bytes: the parts' headers and fields.
OVERHEAD = _PARTS_MAX * (_FIELD_MAX + 1024)


@dataclass(slots=True)
class Upload:
    """A form's fields and its file (the part `file`), the file's bytes read from its start."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    content: IO[bytes] | None = None
    size: int = 0

    def close(self) -> None:
        if self.content is not None:
            self.content.close()


async def receive(request: PacedRequest, name: str, limit: int, too_large: Callable[[], GatewayError]) -> Upload:
    """The form of `request`, its part `name` the file (at most `limit` bytes: `too_large()`
    past it). The caller closes the upload."""
    boundary = request.mimetype_params.get("boundary")
    if not boundary:
        raise invalid_request("The multipart/form-data body has no boundary.", param=name)
    if request.content_length is not None and request.content_length > limit + OVERHEAD:
        raise too_large()
    upload = Upload()
    try:
        await _read(request, _Parts(MultipartDecoder(boundary.encode("latin-1"), SPOOL, max_parts=_PARTS_MAX), upload, name, limit, too_large))
    except BaseException:
        upload.close()
        raise
    if upload.content is not None:
        upload.content.seek(0)
    return upload


async def _read(request: PacedRequest, parts: _Parts) -> None:
    received = 0
    # A compressed body (`Content-Encoding: gzip`) is inflated as it comes; the limits hold
    # for what it inflates to.
    inflate = inflater(request.headers.get("content-encoding"))
    try:
        with request.body.paced():
            async for chunk in request.body:
                pieces = (chunk[at:at + _FEED] for at in range(0, len(chunk), _FEED)) if inflate is None else inflate.pieces(chunk, _FEED)
                for piece in pieces:
                    received += len(piece)
                    if received > parts.limit + OVERHEAD:
                        raise parts.too_large()
                    parts.feed(piece)
        if inflate is not None:
            inflate.finish()
        parts.feed(None)
    except RequestEntityTooLarge:  # a part's headers past the decoder's buffer, too many parts
        raise parts.too_large() from None
    except ValueError as error:  # not multipart/form-data as its boundary says
        raise invalid_request(f"The multipart/form-data body is malformed: {error}", param=parts.name) from None


class _Parts:
    """The decoder's events, each part's bytes where they belong."""

    def __init__(
        self, decoder: MultipartDecoder, upload: Upload, name: str, limit: int, too_large: Callable[[], GatewayError]
    ) -> None:
        self._decoder, self._upload, self.name, self.limit, self.too_large = decoder, upload, name, limit, too_large
        self._field: tuple[str, bytearray] | None = None
        self._file = False  # the current part is the file

    def feed(self, data: bytes | None) -> None:
        self._decoder.receive_data(data)
        while not isinstance(event := self._decoder.next_event(), NeedData | Epilogue):
            if isinstance(event, File) and event.name == self.name and self._upload.content is None:
                self._field, self._file = None, True
                self._upload.filename = event.filename
                self._upload.content = tempfile.SpooledTemporaryFile(max_size=SPOOL, mode="w+b")  # noqa: SIM115 (the upload closes it)
            elif isinstance(event, File | Field):
                # Another file is not kept; a field is.
                self._field, self._file = (event.name, bytearray()) if isinstance(event, Field) else None, False
            elif isinstance(event, Data):
                self._data(event)

    def _data(self, event: Data) -> None:
        if self._file:
            upload = self._upload
            assert upload.content is not None
            upload.size += len(event.data)
            if upload.size > self.limit:
                raise self.too_large()
            upload.content.write(event.data)
        elif self._field is not None:
            name, value = self._field
            value += event.data
            if len(value) > _FIELD_MAX:
                raise invalid_request(f"The form field {name!r} is too long.", param=name)
            if not event.more_data:
                self._upload.fields.setdefault(name, value.decode("utf-8", "replace"))
        if not event.more_data:
            self._field, self._file = None, False
