"""The request of Quart's routes (embeddings, workspace uploads): its body has the chat
routes' time limit (`_front.body_deadline`), 120 s and a second more per 16 KiB received,
instead of Quart's fixed total, so a large document sent over a slow link is read while it
keeps coming, and a trickle is cut off as on the chat routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal, cast, overload

import trio
from quart.wrappers.request import Body
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

from proxy.http import _front
from proxy.http._body_coding import Inflater, inflater


class PacedBody(TrioBody):
    """Moves its readers' deadline on as its bytes arrive."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._started = trio.current_time()
        self._received = 0
        self._readers: set[trio.CancelScope] = set()

    def append(self, data: bytes) -> None:
        super().append(data)
        self._received += len(data)
        if self._readers:
            deadline = _front.body_deadline(self._started, self._received)
            for scope in self._readers:
                scope.deadline = max(scope.deadline, deadline)

    @contextmanager
    def paced(self) -> Iterator[None]:
        """Reading the body within its time limit; the chat routes' 408 `body_timeout` past it."""
        with trio.CancelScope(deadline=_front.body_deadline(self._started, self._received)) as scope:
            self._readers.add(scope)
            try:
                yield
            finally:
                self._readers.discard(scope)
        if scope.cancelled_caught:
            raise _front.body_timeout()


class PacedRequest(TrioRequest):
    body_class = PacedBody
    body: PacedBody
    # Paths whose POST body has its own size limit instead of `max_body_bytes` (file uploads).
    limits: ClassVar[dict[str, int]] = {}

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        limit = self.limits.get(path) if method == "POST" else None
        if limit is not None:
            kwargs["max_content_length"] = limit  # the body's
        super().__init__(method, scheme, path, *args, **kwargs)
        if limit is not None:
            self.max_content_length = limit  # the form parser's, and the 413's message

    @overload
    async def get_data(self, cache: bool, as_text: Literal[False], parse_form_data: bool) -> bytes: ...

    @overload
    async def get_data(self, cache: bool, as_text: Literal[True], parse_form_data: bool) -> str: ...

    @overload
    async def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> str | bytes: ...

    async def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False) -> str | bytes:
        if parse_form_data:
            await self._load_form_data()
        with self.body.paced():
            raw_data: bytes = await self.body
        if not cache:
            self.body.clear()
        return raw_data.decode() if as_text else raw_data

    async def _load_form_data(self) -> None:
        async with self._parsing_lock:
            if self._form is None:
                parser = self.make_form_data_parser()
                inflate = inflater(self.headers.get("content-encoding"))
                body = self.body if inflate is None else _inflated(self.body, inflate, self.max_content_length)
                with self.body.paced():
                    self._form, self._files = await parser.parse(
                        cast(Body, body), self.mimetype, self.content_length, self.mimetype_params,
                    )


async def _inflated(body: PacedBody, inflate: Inflater, limit: int | None) -> AsyncIterator[bytes]:
    """A compressed form as it inflates, held to `limit` once inflated (the form parser
    counts only what it buffers)."""
    size = 0
    async for chunk in body:
        for piece in inflate.pieces(chunk, 1 << 18):
            size += len(piece)
            if limit is not None and size > limit:
                raise RequestEntityTooLarge()
            yield piece
    inflate.finish()
