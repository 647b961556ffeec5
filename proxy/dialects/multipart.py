"""multipart/form-data, read only as far as a relay needs (OpenAI's audio uploads).

The gateway routes an upload by its `model` field and relays the rest as it came: so a
form is not decoded into values, only split into its parts' spans in the body. Replacing
a field's value makes the new body from slices of the old one; the file part's bytes are
never looked at beyond the one search for the boundary that ends them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.domain.errors import GatewayError, invalid_request

# The strings FastAPI (pydantic: vLLM, speaches) reads as a form's boolean true, its case aside.
FORM_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})

# A header's `; key=value` parameters, a quoted value's `;` its own (`filename="a;b"`).
_PARAM = re.compile(r"""\s*([^\s;=]+)\s*=\s*("(?:\\.|[^"\\])*"|[^;]*)\s*(?:;|$)""")


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
        self._all = parts
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

    def names(self) -> Iterable[str]:
        return self._parts.keys()

    def texts(self, name: str) -> list[str]:
        """Every value of field `name`, as text."""
        return [self.body[p.start : p.end].decode("utf-8", "replace") for p in self._all if p.name == name]

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
    # The gateway routes by the `model` it reads and the backend runs the one it reads: a
    # form two readers could split differently (two boundaries, a part with two names or two
    # dispositions) is refused rather than guessed at.
    boundaries = _param(content_type.split(";", 1)[1] if ";" in content_type else "", "boundary")
    if not boundaries or not 0 < len(boundaries[0]) <= 200:
        raise invalid_request("The multipart/form-data body's content type names no boundary.", param="file")
    if len(boundaries) > 1:
        raise invalid_request("The multipart/form-data body's content type names more than one boundary.", param="file")
    delimiter = b"--" + boundaries[0].encode("latin-1")
    at = body.find(delimiter)
    if at < 0 or (at > 0 and body[at - 2 : at] != b"\r\n"):
        raise _malformed()
    parts: list[Part] = []
    separator = b"\r\n" + delimiter
    position = at + len(delimiter)
    while True:
        if body.startswith(b"--", position):
            return Form(body, parts)  # the closing delimiter
        if not body.startswith(b"\r\n", position):
            raise _malformed()
        head_end = body.find(b"\r\n\r\n", position)
        if head_end < 0:
            raise _malformed()
        start = head_end + 4
        end = _part_end(body, separator, start)
        parts.append(_part(body[position + 2 : head_end], start, end))
        position = end + len(separator)


def _part_end(body: bytes, separator: bytes, start: int) -> int:
    """Where the part starting at `start` ends: the first CRLF and delimiter followed by CRLF
    or `--`. Followed by anything else, those bytes are the part's data, but by padding
    before its CRLF (RFC 2046's, which python-multipart reads as data and Go's mime as a
    delimiter) the form is refused: the backend might read it otherwise."""
    at = start
    while (end := body.find(separator, at)) >= 0:
        after = end + len(separator)
        if body.startswith((b"\r\n", b"--"), after):
            return end
        padded = re.match(rb"[ \t]+(\r\n|--|$)", body[after : after + 256])
        if padded is not None:
            raise _malformed()
        at = end + 1
    raise _malformed()


def _part(head: bytes, start: int, end: int) -> Part:
    dispositions = [
        value for key, _, value in (line.partition(b":") for line in head.split(b"\r\n"))
        if key.strip().lower() == b"content-disposition"
    ]
    if len(dispositions) > 1:
        raise invalid_request("A part of the multipart/form-data body has more than one Content-Disposition.", param="file")
    if not dispositions:
        return Part("", False, start, end)
    params = dispositions[0].decode("utf-8", "replace").split(";", 1)
    text = params[1] if len(params) > 1 else ""
    names = _param(text, "name")
    if len(names) > 1:
        raise invalid_request("A part of the multipart/form-data body names itself more than once.", param="file")
    keys = [key for key, _ in _params(text)]
    if any(key.startswith("name*") for key in keys):
        # RFC 7578 forbids RFC 2231's `name*=UTF-8''model` and `name*0=`: python-multipart
        # reads no name there, Go's mime and Python's email read `model`.
        raise invalid_request(
            "A part of the multipart/form-data body is named with an extended parameter (`name*`), which a form "
            "may not use: name it with `name=\"...\"`.", param="file",
        )
    is_file = any(key in ("filename", "filename*") for key in keys)
    return Part(names[0] if names else "", is_file, start, end)


def _param(text: str, key: str) -> list[str]:
    """Every value of parameter `key` (its case aside) in `text`, a header's `k=v; k=v` list
    (after its first `;`), quoted values unquoted; 400 for a list that is not one, which
    another reader could split otherwise."""
    found: list[str] = []
    for name, value in _params(text):
        if name == key:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
                if "\\" in value:
                    # Servers unescape a quoted string differently (python-multipart only
                    # `\\` and `\"`, Go's mime any character): no name is read two ways.
                    raise invalid_request(f"A multipart/form-data `{key}` may not hold a backslash.", param="file")
            found.append(value)
    return found


def _params(text: str) -> list[tuple[str, str]]:
    """The `k=v; k=v` parameters of `text`, keys in lower case, values as written."""
    found: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = _PARAM.match(text, position)
        if match is None:
            raise invalid_request("A multipart/form-data header's parameters are malformed.", param="file")
        found.append((match.group(1).lower(), match.group(2).strip()))
        position = match.end()
    return found


def _malformed() -> GatewayError:
    return invalid_request("The multipart/form-data body is malformed (a part or its boundary is cut short).", param="file")
