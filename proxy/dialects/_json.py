"""JSON helpers shared by the codecs: compact output, and type-checked field access."""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.domain.errors import invalid_request

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

# Deeper request bodies are refused: whatever later walks them (encoders, codecs) must never
# meet Python's recursion limit, which depends on how deep the stack already is.
MAX_DEPTH = 128


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as every dialect's servers send it."""
    return _encoder.encode(value).encode()


def is_decimal(text: str, max_digits: int = 18) -> bool:
    """`text` is a number `int` reads, as a query parameter gives one: ASCII digits only
    (`str.isdigit` takes "²" and "٣", which `int` refuses or reads otherwise) and not
    thousands of them (`int` refuses a string past 4,300 digits)."""
    return text.isascii() and text.isdigit() and len(text) <= max_digits


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would only fail later, on the way out.
    raise ValueError(f"{name} is not a valid JSON value")


def _int(text: str) -> int:
    return int(text)


class _OutOfRange(ValueError):
    pass


def _finite_float(text: str) -> float:
    # `1e400` parses as infinity, which no JSON encoder may write back on the way to a backend.
    # Only numbers with a fraction or an exponent come here, a handful in a usual body.
    value = float(text)
    if value - value:  # only infinity minus itself is not 0.0 (NaN never parses here)
        raise _OutOfRange(text)
    return value


_TOO_DEEP = object()  # how a body too deep to parse reads; JSON's own `null` parses as None


def loads_value(text: str) -> Any:
    """JSON written inside a string (a tool call's arguments), read as a request body is:
    ValueError for what no encoder could write on to a backend or client (nested past
    `MAX_DEPTH`, NaN or Infinity, a number out of range, half a surrogate pair), which a
    plain `json.loads` let through to fail the request later (a 502, a traceback logged)."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    if _deeper_than(text, value, MAX_DEPTH):
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE_TEXT.search(text) is not None and _has_lone_surrogate(value):
        raise ValueError("a lone UTF-16 surrogate escape")
    return value


def loads_object(body: bytes | str, what: str = "request body", *, yielding: bool = False) -> dict[str, Any]:
    """Parse JSON that must be an object; a clear 400 otherwise. `yielding`: for a large body
    parsed in a worker thread, its integers go through Python code too, where the thread lets
    the event loop have the GIL (a megabyte of token ids would otherwise hold it throughout)."""
    try:
        value = json.loads(
            body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int if yielding else None
        )
    except RecursionError:
        value = _TOO_DEEP
    except _OutOfRange as exc:
        raise _out_of_range(body, what, str(exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid_request(f"The {what} is not valid JSON: {exc}", code="invalid_json") from None
    if value is _TOO_DEEP or _deeper_than(body, value, MAX_DEPTH):
        raise invalid_request(f"The {what} is nested more than {MAX_DEPTH} levels deep.", code="json_too_deep")
    if not isinstance(value, dict):
        raise invalid_request(f"The {what} must be a JSON object.", code="invalid_json")
    escape = _SURROGATE_ESCAPE.search(body) if isinstance(body, bytes) else _SURROGATE_ESCAPE_TEXT.search(body)
    if escape is not None and _has_lone_surrogate(value):
        raise invalid_request(
            f"The {what} has a lone UTF-16 surrogate escape (\\ud800-\\udfff): it is not valid Unicode text.",
            code="invalid_json",
        )
    return value


def _out_of_range(body: bytes | str, what: str, number: str) -> Exception:
    """The 400 for a number no float holds, naming where it sits (the body is parsed again,
    only on this error path, with the number marked)."""
    marker = object()
    try:
        value = json.loads(body, parse_float=lambda text: marker if text == number else 0.0)
        field = _path_of(value, marker) if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        field = None
    if not field:
        return invalid_request(f"The {what} holds a number out of range ({number}).", code="number_out_of_range")
    return invalid_request(
        f"Invalid `{field}`: {number} is out of range for a number.", param=field, code="number_out_of_range"
    )


def _path_of(value: Any, marker: object) -> str | None:
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if node is marker:
            return path
        if isinstance(node, dict):
            stack.extend((child, f"{path}.{key}" if path else str(key)) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(node))
    return None


# JSON may spell half a surrogate pair (`"\ud800"`): Python parses it into a str no encoder,
# tokenizer or database accepts. Only bodies with such an escape are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _deeper_than(raw: bytes | str, value: Any, limit: int) -> bool:
    """Whether `value` nests containers more than `limit` deep (iteratively, so any depth
    is safe to ask about)."""
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets <= limit:
        return False  # too few brackets to be that deep: the common case, at C speed
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


# OpenAI's error codes for a field's mistakes (its own 400s carry them; clients and tests
# branch on them): the rest say the bound crossed (`integer_below_min_value`, …).
MISSING_PARAMETER = "missing_required_parameter"
INVALID_TYPE = "invalid_type"


class Fields:
    """Typed reads from one JSON object, raising 400s that name the offending field (and OpenAI's
    code for the mistake)."""

    __slots__ = ("data", "path")

    def __init__(self, data: dict[str, Any], path: str = "") -> None:
        self.data = data
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str, code: str | None = None) -> Exception:
        """`code`: OpenAI's for the mistake (`invalid_type`, `empty_array`, …; see `_code`)."""
        return invalid_request(f"Invalid `{self.name(key)}`: expected {expected}.", param=self.name(key), code=code)

    def missing(self, key: str) -> Exception:
        return invalid_request(
            f"Missing required parameter `{self.name(key)}`.", param=self.name(key), code=MISSING_PARAMETER,
        )

    def text(self, key: str, *, required: bool = False, nonempty: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.missing(key)
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a non-empty string" if nonempty else "a string", INVALID_TYPE)
        if nonempty and not value:
            raise self.fail(key, "a non-empty string", "empty_string")
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(key, "a boolean", INVALID_TYPE)
        return value

    def integer(self, key: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, "an integer", INVALID_TYPE)
        if minimum is not None and value < minimum:
            raise self.fail(key, _range_text(minimum, maximum, "an integer"), "integer_below_min_value")
        if maximum is not None and value > maximum:
            raise self.fail(key, _range_text(minimum, maximum, "an integer"), "integer_above_max_value")
        return value

    def number(self, key: str, *, minimum: float | None = None, maximum: float | None = None) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(key, "a number", INVALID_TYPE)
        if minimum is not None and value < minimum:
            raise self.fail(key, _range_text(minimum, maximum, "a number"), "decimal_below_min_value")
        if maximum is not None and value > maximum:
            raise self.fail(key, _range_text(minimum, maximum, "a number"), "decimal_above_max_value")
        return float(value)

    def object(self, key: str, *, required: bool = False) -> Fields | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.missing(key)
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "an object", INVALID_TYPE)
        return Fields(value, self.name(key))

    def array(self, key: str, *, required: bool = False, nonempty: bool = False) -> list[Any] | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.missing(key)
            return None
        if not isinstance(value, list):
            raise self.fail(key, "a non-empty array" if nonempty else "an array", INVALID_TYPE)
        if nonempty and not value:
            raise self.fail(key, "a non-empty array", "empty_array")
        return value

    def stop(self, key: str) -> tuple[str, ...]:
        """A stop sequence given as one string or an array of strings."""
        value = self.data.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise self.fail(key, "a string or an array of strings", INVALID_TYPE)


def _range_text(minimum: float | None, maximum: float | None, kind: str) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} between {minimum} and {maximum}"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    return f"{kind} <= {maximum}"
