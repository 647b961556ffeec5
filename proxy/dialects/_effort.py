"""OpenAI's `reasoning_effort` as the Anthropic and Ollama encoders translate it: a value they
cannot say in their backend's words is the client's mistake (a 400 naming its field, as
OpenAI answers), not a setting silently dropped."""

from __future__ import annotations

from proxy.domain.chat import ChatRequest
from proxy.domain.errors import GatewayError, invalid_request

# OpenAI's accepted values; a backend that is OpenAI-compatible judges the value itself.
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def effort_param(request: ChatRequest) -> str:
    """The field the client set the effort in: a Responses client's `reasoning.effort`, an
    Ollama client's `think`."""
    if request.dialect == "ollama":
        return "think"
    return "reasoning.effort" if request.dialect == "responses" else "reasoning_effort"


def unknown_effort(request: ChatRequest) -> GatewayError:
    param = effort_param(request)
    return invalid_request(
        f"Invalid value for `{param}`: {request.params.reasoning_effort!r}. Supported values are: "
        + ", ".join(f"'{effort}'" for effort in EFFORTS) + ".",
        param=param, code="invalid_value",
    )
