"""What the Ollama codec's request and response halves share: tool arguments, images, JSON text.

Ollama carries tool-call arguments as a JSON *object* and images as bare base64; the domain
carries arguments as JSON text and images as URLs. These helpers convert both ways.
"""

from __future__ import annotations

import binascii
import json
from functools import lru_cache
from typing import Any

from proxy.dialects._json import loads_value
from proxy.domain.chat import ImagePart
from proxy.domain.errors import invalid_request

DIALECT = "ollama"

# Arguments that are not a JSON object cannot travel as Ollama's `arguments` (clients, the
# official SDK included, validate it as a mapping). They travel as this one string field, and
# a request carrying exactly this shape gets the original text back.
RAW_ARGUMENTS_KEY = "__raw_arguments"


def arguments_object(text: str) -> dict[str, Any]:
    """The domain's arguments text as the object Ollama wants."""
    if not text or text.isspace():
        return {}
    try:
        value = loads_value(text)
    except ValueError:
        return {RAW_ARGUMENTS_KEY: text}
    return value if isinstance(value, dict) else {RAW_ARGUMENTS_KEY: text}


def arguments_text(value: Any) -> str:
    """Ollama's arguments (an object; some clients send a string) as the domain's JSON text."""
    if isinstance(value, dict):
        raw = value.get(RAW_ARGUMENTS_KEY)
        if isinstance(raw, str) and len(value) == 1:
            return raw
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@lru_cache(maxsize=16384)
def json_string(text: str) -> bytes:
    """A JSON string literal as UTF-8 (tokens repeat a lot, so encodings are cached)."""
    try:
        return json.dumps(text, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # Lone surrogates cannot be UTF-8; escaped they are still valid JSON.
        return json.dumps(text).encode()


# Magic numbers as they look in base64, for the media type of a data URL.
_IMAGE_SIGNATURES = (
    ("iVBORw0KGgo", "image/png"),
    ("/9j/", "image/jpeg"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
    ("Qk", "image/bmp"),
)


def image_part(data: str) -> ImagePart:
    """An Ollama image (bare base64) as a data URL, media type sniffed from its first bytes.
    A base64 data URL, which some clients send, is taken as it is. ValueError (saying why)
    for anything else: Ollama answers a 400, and a backend sent it would fail the request
    its own way (a 500 from vLLM, which the gateway would retry elsewhere)."""
    if data.startswith("data:"):
        header, sep, payload = data.partition(",")
        if not (sep and header.endswith(";base64")):
            raise ValueError("a data URL that is not base64")
        _check_base64(payload)
        return ImagePart(url=data)
    if "\n" in data or "\r" in data:  # line-wrapped base64 (Python's `encodebytes`), which Ollama reads
        data = data.replace("\n", "").replace("\r", "")
    _check_base64(data)
    media = next((kind for prefix, kind in _IMAGE_SIGNATURES if data.startswith(prefix)), "image/png")
    return ImagePart(url=f"data:{media};base64,{data}")


def _check_base64(text: str) -> None:
    try:
        binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(str(error)) from None


def image_base64(part: ImagePart) -> str:
    """The base64 payload Ollama wants; Ollama cannot fetch URLs, so only data URLs work."""
    url = part.url
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if sep and header.endswith(";base64"):
            return payload
    at = part.at or "messages"  # the client's own path to the URL, which it can act on
    raise invalid_request(
        f"`{at}` is an image URL; Ollama backends accept only inline images (base64 `data:` URLs), not image URLs.",
        param=at,
        code="unsupported_image",
    )


# Log probabilities: Ollama's entries (`{token, logprob, bytes, top_logprobs: [{token,
# logprob, bytes}]}`) are OpenAI's `logprobs.content` entries, field for field, so each way
# only the list's holder changes: a list on Ollama's reply, `{"content": [...]}` in the domain.


def logprobs_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """An Ollama reply's (or line's) `logprobs` in the domain's (OpenAI's) shape."""
    entries = data.get("logprobs")
    return {"content": entries} if entries and isinstance(entries, list) else None


def logprobs_list(logprobs: dict[str, Any] | None) -> list[Any] | None:
    """The domain's logprobs as Ollama's list (None: there are none to send)."""
    entries = logprobs.get("content") if logprobs is not None else None
    return entries if isinstance(entries, list) else None
