"""A Claude backend's signature of its thinking, carried in a reasoning item's `encrypted_content`.

The client gives the item back in its tool loop (as it does OpenAI's own, whose content is as
opaque to it): Claude takes its thinking back signed only, and in a tool loop thinks only with
the last turn's thinking given back.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from proxy.dialects._json import loads_object
from proxy.dialects.anthropic import REDACTED_THINKING
from proxy.domain.chat import OpaquePart
from proxy.domain.errors import GatewayError

_SIGNED = "claude-thinking:"
# The dialect of a Claude backend's signed thinking given back.
_ANTHROPIC = "anthropic"


def signed_content(thinking: str, signature: str) -> str:
    """The thinking with its signature, whole: a client may give back the item's
    `encrypted_content` alone (LangChain's streamed reasoning), as OpenAI's holds the reasoning."""
    packed = json.dumps({"thinking": thinking, "signature": signature}, ensure_ascii=False, separators=(",", ":"))
    return _SIGNED + base64.urlsafe_b64encode(packed.encode()).decode()


def signed_thinking(encrypted: Any) -> tuple[str, str] | None:
    """The thinking and signature a reasoning item's `encrypted_content` carries (see
    `signed_content`); None for another's (OpenAI's own) or a damaged one."""
    if not isinstance(encrypted, str) or not encrypted.startswith(_SIGNED):
        return None
    try:
        # As a request body is read: a client's forgery nested past what Python decodes, or
        # holding half a surrogate pair no backend request can be written with, is damaged.
        packed = loads_object(base64.urlsafe_b64decode(encrypted[len(_SIGNED):].encode()), "signed thinking")
    except (ValueError, GatewayError):  # binascii.Error is a ValueError
        return None
    thinking, signature = packed.get("thinking"), packed.get("signature")
    if not isinstance(thinking, str) or not isinstance(signature, str) or not signature:
        return None
    return thinking, signature


def thinking_block(thinking: str, signature: str) -> OpaquePart:
    """Claude's own block again, for an Anthropic backend (see `anthropic._may_think`)."""
    if signature.startswith(REDACTED_THINKING) and not thinking:
        return OpaquePart(_ANTHROPIC, {"type": "redacted_thinking", "data": signature.removeprefix(REDACTED_THINKING)})
    return OpaquePart(_ANTHROPIC, {"type": "thinking", "thinking": thinking, "signature": signature})
