"""An Anthropic backend's rate limits said as OpenAI's, for the OpenAI clients it answers.

Anthropic names them `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, its
reset an RFC 3339 time; OpenAI's SDK users (and LiteLLM's router) read
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, the reset a duration (`6m0s`)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from proxy.services.limits import duration

Headers = list[tuple[bytes, bytes]]

_PREFIX = b"anthropic-ratelimit-"
# Anthropic's `tokens-*` are the most restrictive of its input and output limits: OpenAI's one
# token limit. Its `input-tokens-*` and `output-tokens-*` have no OpenAI name.
_NAMES = {
    f"{kind}-{field}".encode(): f"x-ratelimit-{field}-{kind}".encode()
    for kind in ("requests", "tokens") for field in ("limit", "remaining", "reset")
}


def openai_limits_of_anthropic(headers: Iterable[tuple[bytes, bytes]], now: float) -> Headers:
    """OpenAI's rate-limit headers for an Anthropic backend's head (`now`: epoch seconds)."""
    said: Headers = []
    for name, value in headers:
        if not name.startswith(_PREFIX):
            continue
        openai_name = _NAMES.get(name[len(_PREFIX):])
        if openai_name is None:
            continue
        if openai_name.startswith(b"x-ratelimit-reset-"):
            try:
                at = datetime.fromisoformat(value.decode("ascii")).timestamp()
            except (ValueError, UnicodeDecodeError):
                continue  # not a time: nothing a client could wait by
            value = duration(max(0.0, at - now)).encode()
        said.append((openai_name, value))
    return said
