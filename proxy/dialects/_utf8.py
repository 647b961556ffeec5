"""JSON a backend sent that is not valid UTF-8 (llama.cpp's server has written a token's
bytes as they are: a character split across two stream events, or a lone byte), mended so
that clients get text: a split character rejoined, any other invalid byte U+FFFD.

Only reached once a strict parse has failed: valid bytes never pay for it."""

from __future__ import annotations

import codecs
import json
from typing import Any


def loads_escaped(data: bytes) -> Any:
    """`data` parsed as JSON, its invalid bytes kept in its strings as surrogate escapes
    (`escaped_bytes` gives them back); raises ValueError as `json.loads` does."""
    return json.loads(data.decode("utf-8", "surrogateescape"))


def escaped_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def replace_invalid(value: Any) -> Any:
    """`value` (parsed by `loads_escaped`) with every escaped byte in its strings, keys too,
    made U+FFFD."""
    if isinstance(value, str):
        return value if value.isascii() else escaped_bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {replace_invalid(key): replace_invalid(item) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_invalid(item) for item in value]
    return value


class SplitText:
    """The bytes of characters a stream's text fields left unfinished, each field's held for
    its next piece."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], bytes] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def join(self, key: tuple[int, str], text: str | None, *, final: bool) -> str | None:
        """`text` (parsed by `loads_escaped`) after the bytes held for `key`; the bytes of a
        character it leaves unfinished are held unless `final`, when they are U+FFFD."""
        held = self._held.pop(key, b"")
        if text is None and not held:
            return None
        data = held + (escaped_bytes(text) if text else b"")
        joined, used = codecs.utf_8_decode(data, "replace", final)
        if used < len(data):
            self._held[key] = data[used:]
        return joined


class ValidBytes:
    """A byte stream relayed unparsed, made valid UTF-8: the bytes of a character that a read
    leaves unfinished wait for the next, and an invalid byte becomes U+FFFD (a character split
    across two events cannot be told from two invalid bytes without parsing: both U+FFFD).

    The caller skips `mend` for an ASCII read while nothing is held (`bytes.isascii`, the
    common case of JSON); any other read costs one decode."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = b""

    def mend(self, data: bytes) -> bytes:
        data = self.held + data
        try:
            _, used = codecs.utf_8_decode(data, "strict", False)
            out = data[:used]
        except UnicodeDecodeError:
            text, used = codecs.utf_8_decode(data, "replace", False)
            out = text.encode()
        self.held = data[used:]
        return out

    def close(self) -> bytes:
        """What is held at the end: an unfinished character, U+FFFD."""
        held, self.held = self.held, b""
        return held.decode("utf-8", "replace").encode()
