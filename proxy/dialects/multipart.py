"""multipart/form-data, read only as far as a relay needs (OpenAI's audio uploads).

The gateway routes an upload by its `model` field and relays the rest as it came: so a
form is not decoded into values, only split into its parts' spans in the body. Replacing
a field's value makes the new body from slices of the old one; the file part's bytes are
never looked at beyond the one search for the boundary that ends them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.domain.errors import GatewayError, invalid_request

# How FastAPI (vLLM, speaches) reads a form's boolean.
FORM_TRUE = frozenset({"true", "1", "yes", "on"})

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,200})"|([^\s;,"]{1,200}))""", re.IGNORECASE)
_NAME = re.compile(rb"""(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^\s;]+))""", re.IGNORECASE)
_FILENAME = re.compile(rb"""(?:^|;)\s*filename\*?\s*=""", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    is_file: bool
    start: int  # the value's span in the body
    end: int


class Form:
    """A multipart body's parts, by name (the first of each; `repeated` names those given
    more than once, which servers read differently: Starlette takes the last)."""

    def __init__(self, body: bytes, parts: list[Part]) -> None:
        self.body = body
        self._parts: dict[str, Part] = {}
        self.repeated: set[str] = set()
        for part in parts:
            if part.name in self._parts:
                self.repeated.add(part.name)
            else:
                self._parts[part.name] = part

    def part(self, name: str) -> Part | None:
        return self._parts.get(name)

    def text(self, name: str) -> str | None:
        """A field's value as text (U+FFFD for bytes that are not UTF-8), or None."""
        part = self._parts.get(name)
        if part is None:
            return None
        return self.body[part.start : part.end].decode("utf-8", "replace")

    def with_value(self, name: str, value: str) -> bytes:
        """The body with field `name` (which must be there) set to `value`, every other byte
        as it was."""
        part, body = self._parts[name], self.body
        new = value.encode()
        if body[part.start : part.end] == new:
            return body
        view = memoryview(body)  # one copy of the upload, not three
        return b"".join((view[: part.start], new, view[part.end :]))


def parse_form(content_type: str | None, body: bytes) -> Form:
    """The parts of `body`, a multipart/form-data body with `content_type`; 400 otherwise."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise invalid_request(
            f"The body must be multipart/form-data (the audio in its `file` field), not "
            f"`{(content_type or 'none').split(';', 1)[0].strip()}`.",
            param="file",
        )
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise invalid_request("The multipart/form-data body's content type names no boundary.", param="file")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    at = body.find(delimiter)
    if at < 0 or (at > 0 and body[at - 2 : at] != b"\r\n"):
        raise _malformed()
    parts: list[Part] = []
    separator = b"\r\n" + delimiter
    position = at + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return Form(body, parts)  # the closing delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise _malformed()
        head_end = body.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            raise _malformed()
        start = head_end + 4
        end = body.find(separator, start)
        if end < 0:
            raise _malformed()
        parts.append(_part(body[line_end + 2 : head_end], start, end))
        position = end + len(separator)


def _part(head: bytes, start: int, end: int) -> Part:
    name, is_file = "", False
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        found = _NAME.search(value)
        if found is not None:
            name = (found.group(1) if found.group(1) is not None else found.group(2)).decode("utf-8", "replace")
        is_file = _FILENAME.search(value) is not None
    return Part(name, is_file, start, end)


def _malformed() -> GatewayError:
    return invalid_request("The multipart/form-data body is malformed (a part or its boundary is cut short).", param="file")
