"""The gateway's error vocabulary, independent of any wire dialect.

Every failure a client can see is a `GatewayError` with a `kind`; each dialect codec maps
the kind to its own status code and error shape.
"""

from __future__ import annotations

import enum
import re


class ErrorKind(enum.Enum):
    """What went wrong, with the HTTP status every dialect uses for it."""

    INVALID_REQUEST = 400
    AUTHENTICATION = 401
    PERMISSION = 403
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    REQUEST_TIMEOUT = 408  # the client's body did not arrive in time (nginx's `client_body_timeout`)
    CONFLICT = 409
    REQUEST_TOO_LARGE = 413
    UNSUPPORTED_MEDIA_TYPE = 415
    RATE_LIMITED = 429
    INTERNAL = 500
    BACKEND = 502
    UNAVAILABLE = 503
    TIMEOUT = 504

    @property
    def status(self) -> int:
        return self.value


class Exhausted(enum.Enum):
    """Which per-minute limit a `RATE_LIMITED` refusal ran out of (dialects that tell them
    apart name it; OpenAI's error `type` does)."""

    REQUESTS = "requests"
    TOKENS = "tokens"


# The gateway's own credentials (its backends' API keys). A backend may quote the key it was
# sent in its error message ("Incorrect API key provided: sk-..."), and its messages reach
# clients, the journal, NATS events and logs: every error's message is cleaned when made, so
# no path can forget to.
_concealed: tuple[str, ...] = ()
_CONCEALED_AS = "[redacted]"
# Shorter values ("EMPTY", "ollama": placeholders for servers that check no key) are no
# secret, and hiding them would mangle ordinary words in messages.
_MIN_SECRET_CHARS = 8


def conceal_in_errors(secret: str | None) -> None:
    """Never let `secret` appear in an error's message (from now on, in this process)."""
    global _concealed
    if secret and len(secret) >= _MIN_SECRET_CHARS and secret not in _concealed:
        # Longest first: a key that contains another is hidden whole.
        _concealed = tuple(sorted((*_concealed, secret), key=len, reverse=True))


def conceal(text: str) -> str:
    """`text` with every concealed secret replaced."""
    for secret in _concealed:
        if secret in text:
            text = text.replace(secret, _CONCEALED_AS)
    return text


class GatewayError(Exception):
    """An error with a client-facing message.

    `param` names the offending request field (OpenAI's `param`), `code` is a short
    machine-readable string, and `retry_after` (seconds) becomes a `Retry-After` header.
    `hopeless`: sending the same request again can never succeed, and clients are told not to
    (`x-should-retry: false`, which the OpenAI and Anthropic SDKs obey). `exhausted`: the
    limit a rate-limit refusal ran out of, when it is known.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        hopeless: bool = False,
        exhausted: Exhausted | None = None,
    ) -> None:
        if _concealed:
            message = conceal(message)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.hopeless = hopeless
        self.exhausted = exhausted

    @property
    def status(self) -> int:
        return self.kind.status

    def __repr__(self) -> str:
        return f"GatewayError({self.kind.name}, {self.message!r}, param={self.param!r})"


# OpenAI's code for a parameter the model cannot take ("Unsupported parameter: …"), which
# clients act on (asking again without it); the gateway's for what a model's backend lacks.
UNSUPPORTED_PARAMETER = "unsupported_parameter"
UNSUPPORTED_VALUE = "unsupported_value"  # and for a value of it the model cannot take


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


def database_not_configured(what: str) -> GatewayError:
    """`what` (e.g. "files and batches need") asked of a gateway run without PostgreSQL: a 503
    no retry can help, so the SDKs must not retry it for ever."""
    return GatewayError(
        ErrorKind.UNAVAILABLE,
        f"This gateway runs without a database (`embedded = false` and no DATABASE_URL): {what} PostgreSQL.",
        code="database_not_configured", hopeless=True,
    )


# A prompt longer than the model's window, in each server's words: OpenAI and vLLM ("maximum
# context length is N tokens"), newer vLLM ("longer than the maximum model length", "exceeds
# the max_model_len"), llama.cpp ("exceeds the available context size"), SGLang ("exceeds the
# maximum allowed length"), Anthropic ("prompt is too long", "exceed context limit"), Ollama
# ("prompt too long; exceeded max context length by N tokens"; its embed API's "the input
# length exceeds the context length"), TGI ("`inputs` tokens + `max_new_tokens` must be <= N").
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
_CONTEXT_OVERFLOW = re.compile(
    r"max(?:imum)? context length|context (?:size|limit|window)|prompt is too long|maximum model length"
    r"|max_model_len|exceeds the maximum allowed length|exceeds the context length"
    r"|`inputs` tokens \+ `max_new_tokens` must be|`inputs` must have less than",
    re.IGNORECASE,
)


def is_context_overflow(message: str) -> bool:
    """Whether a backend's 400 says the prompt does not fit the model: every client dialect
    has its own way to say so, which clients act on (trim the history, compact it)."""
    return _CONTEXT_OVERFLOW.search(message) is not None
