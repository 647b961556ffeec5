"""Whether text that arrives in pieces is still the start of one JSON object, and how to end it.

A streamed tool input (`input_json_delta`) must stay a JSON object prefix: Anthropic's SDKs
parse the input so far after every delta and raise on anything else, losing the whole
response. Other kinds of backend can stream a model's malformed arguments; this finds the
point where they stop being JSON, in one pass over the text (string contents, most of it,
are skipped by a regex), and gives the shortest text that completes what was valid.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.dialects._json import dumps, loads_value

_STRING_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"')
_NUMBER_TOKEN = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERAL_VALUES: dict[str, Any] = {"true": True, "false": False, "null": None}
_CUT = object()  # a scalar value the text ends inside of

# Characters a JSON string holds as they are (not a quote, a backslash or a control character).
_PLAIN = re.compile(r'[^"\\\x00-\x1f]*')
_SPACE = " \t\r\n"
_NUMBER = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_HEX = frozenset("0123456789abcdefABCDEF")

# What comes next.
_START = 0  # the object's `{`
_KEY_OR_END = 1  # a key or `}` (after `{`)
_KEY = 2  # a key (after `,` in an object)
_COLON = 3
_VALUE = 4
_VALUE_OR_END = 5  # a value or `]` (after `[`)
_AFTER_VALUE = 6  # `,` or the container's end
_STRING = 7
_ESCAPE = 8
_UNICODE = 9
_LITERAL = 10
_NUMBER_STATE = 11
_DONE = 12


class JsonObjectPrefix:
    """Fed text piece by piece: `feed` says how much of each piece keeps the whole a prefix
    of one JSON object; `closing` ends what was accepted as complete JSON."""

    __slots__ = ("_key", "_left", "_literal", "_number_end", "_stack", "_state", "broken")

    def __init__(self) -> None:
        self._state = _START
        self._stack: list[str] = []  # open containers, "{" or "["
        self._key = False  # the open string is a key
        self._left = 0  # hex digits of a \u escape, or characters of a literal, still due
        self._literal = ""
        self._number_end = ""  # the number's last character
        self.broken = False

    def feed(self, text: str) -> int:
        """How many characters of `text` keep the input a JSON object prefix: all of them,
        or fewer once it stops being one (and, from then on, none)."""
        if self.broken:
            return 0
        i, n = 0, len(text)
        while i < n:
            state = self._state
            if state == _STRING:
                i = _PLAIN.match(text, i).end()  # type: ignore[union-attr]  # always matches
                if i == n:
                    break
                c = text[i]
                if c == '"':
                    self._state = _COLON if self._key else _AFTER_VALUE
                elif c == "\\":
                    self._state = _ESCAPE
                else:
                    return self._break(i)  # a raw control character
                i += 1
                continue
            c = text[i]
            if state == _ESCAPE:
                if c == "u":
                    self._state, self._left = _UNICODE, 4
                elif c in '"\\/bfnrt':
                    self._state = _STRING
                else:
                    return self._break(i)
            elif state == _UNICODE:
                if c not in _HEX:
                    return self._break(i)
                self._left -= 1
                if not self._left:
                    self._state = _STRING
            elif state == _LITERAL:
                if c != self._literal[len(self._literal) - self._left]:
                    return self._break(i)
                self._left -= 1
                if not self._left:
                    self._state = _AFTER_VALUE
            elif state == _NUMBER_STATE and c in _NUMBER:
                self._number_end = c
            elif c in _SPACE:
                if state == _NUMBER_STATE:
                    self._state = _AFTER_VALUE
            elif not self._structural(state, c):
                return self._break(i)
            i += 1
        return n

    def _structural(self, state: int, c: str) -> bool:
        """Take `c` (not whitespace) where the text is between tokens; whether it fits."""
        if state == _NUMBER_STATE:
            if self._number_end in "+-.eE":
                return False
            state = self._state = _AFTER_VALUE
        if state == _START:
            if c != "{":
                return False
            self._stack.append("{")
            self._state = _KEY_OR_END
        elif state in (_KEY_OR_END, _KEY):
            if c == '"':
                self._state, self._key = _STRING, True
            elif c == "}" and state == _KEY_OR_END:
                self._end_container()
            else:
                return False
        elif state == _COLON:
            if c != ":":
                return False
            self._state = _VALUE
        elif state in (_VALUE, _VALUE_OR_END):
            if c == "]" and state == _VALUE_OR_END:
                self._end_container()
            else:
                return self._value(c)
        elif state == _AFTER_VALUE:
            top = self._stack[-1]
            if c == ",":
                self._state = _KEY if top == "{" else _VALUE
            elif c == ("}" if top == "{" else "]"):
                self._end_container()
            else:
                return False
        else:  # _DONE: nothing but whitespace may follow
            return False
        return True

    def _value(self, c: str) -> bool:
        if c == '"':
            self._state, self._key = _STRING, False
        elif c in "{[":
            self._stack.append(c)
            self._state = _KEY_OR_END if c == "{" else _VALUE_OR_END
        elif c in _LITERALS:
            self._literal = _LITERALS[c]
            self._state, self._left = _LITERAL, len(self._literal) - 1
        elif c == "-" or c.isdigit():
            self._state, self._number_end = _NUMBER_STATE, c
        else:
            return False
        return True

    def _end_container(self) -> None:
        self._stack.pop()
        self._state = _AFTER_VALUE if self._stack else _DONE

    def _break(self, accepted: int) -> int:
        self.broken = True
        return accepted

    def closing(self) -> str:
        """The text that makes what was accepted a complete JSON object (after a `,`, already
        sent, with a filler: `"": null` in an object, `null` in an array)."""
        state, parts = self._state, []
        if state == _START:
            return "{}"
        if state == _ESCAPE:
            parts.append('\\"')  # an escaped backslash, then the string's end
        elif state == _UNICODE:
            parts.append("0" * self._left + '"')
        elif state == _STRING:
            parts.append('"')
        elif state == _LITERAL:
            parts.append(self._literal[len(self._literal) - self._left :])
        elif state == _NUMBER_STATE and self._number_end in "+-.eE":
            parts.append("0")
        if (state in (_STRING, _ESCAPE, _UNICODE) and self._key) or state == _COLON:
            parts.append(":null")
        elif state == _VALUE:
            parts.append("null")
        elif state == _KEY:
            parts.append('"":null')
        parts.extend("}" if c == "{" else "]" for c in reversed(self._stack))
        return "".join(parts)


def object_so_far(arguments: str) -> dict[str, Any]:
    """The tool input Anthropic's SDKs make of `arguments` streamed as `JsonObjectPrefix` lets
    them through (a broken input closed where it broke; one cut short, at `max_tokens`, read
    as their partial parser reads it: a value cut inside left out, its containers kept), so
    that a whole message says what its stream's final message says. A model's arguments are
    read as a request body is (`loads_value`): what no JSON may carry on to the client (NaN,
    1e999, half a surrogate pair) or nests past what Python reads leaves nothing of itself."""
    try:
        value = loads_value(arguments)
    except ValueError:
        pass
    else:
        if isinstance(value, dict):
            return value
    checker = JsonObjectPrefix()
    text = arguments[: checker.feed(arguments)]
    if checker.broken:
        try:
            closed = loads_value(text + checker.closing())
        except ValueError:  # a number no parser takes (`1-2`): nothing of it
            return {}
        return closed if isinstance(closed, dict) else {}
    start = _skip_space(text, 0)
    if start == len(text):
        return {}
    try:
        found, _ = _value_so_far(text, start)
        dumps(found)  # rare (a cut input): the client must be sent JSON
    except (RecursionError, ValueError):  # (UnicodeEncodeError is a ValueError)
        return {}
    return found if isinstance(found, dict) else {}


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _value_so_far(text: str, i: int) -> tuple[Any, int]:
    """The value at `text[i]` of a JSON prefix and where it ends; -1 when the text ends first
    (the value then `_CUT` for a scalar, the part read for a container)."""
    c = text[i]
    if c == '"':
        match = _STRING_TOKEN.match(text, i)
        return (_CUT, -1) if match is None else (json.loads(match.group()), match.end())
    if c in _LITERALS:
        word = _LITERALS[c]
        return (_LITERAL_VALUES[word], i + len(word)) if text.startswith(word, i) else (_CUT, -1)
    if c not in "{[":
        match = _NUMBER_TOKEN.match(text, i)
        end = i if match is None else match.end()
        if match is None or (end < len(text) and text[end] not in _SPACE + ",]}"):
            return _CUT, -1  # `1.`, `-`, `1e`: not a number yet
        return json.loads(match.group()), end
    container: dict[str, Any] | list[Any] = {} if c == "{" else []
    end_mark = "}" if c == "{" else "]"
    i += 1
    while True:
        i = _skip_space(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_space(text, i + 1)
        if i == len(text):
            return container, -1
        if text[i] == end_mark:
            return container, i + 1
        if isinstance(container, dict):
            key, i = _value_so_far(text, i)
            i = -1 if i < 0 else _skip_space(text, _skip_space(text, i) + 1)  # past the colon
            if i < 0 or i >= len(text):
                return container, -1
            value, i = _value_so_far(text, i)
            if value is not _CUT:
                container[key] = value
        else:
            value, i = _value_so_far(text, i)
            if value is not _CUT:
                container.append(value)
        if i < 0:
            return container, -1
