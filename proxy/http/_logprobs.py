"""Token log probabilities, which only OpenAI-compatible and Ollama backends give: asked of
any other (an Anthropic backend, a workflow), a 400 naming the client's field rather than an
answer silently without them (LiteLLM refuses them too, unless told to drop them)."""

from __future__ import annotations

from proxy.config import BackendConfig
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import invalid_request

_WITH_LOGPROBS = frozenset({"openai", "ollama"})


def refuse_logprobs_without_backend(
    request: ChatRequest, backend: BackendConfig | None, *, field: str, top_field: str = "top_logprobs"
) -> None:
    """`field`: what the client asked them with (`logprobs`, a Responses client's `include`);
    `top_field`: its alternatives per token, asked alone."""
    params = request.params
    if not (params.logprobs or params.top_logprobs):
        return
    if backend is not None and backend.kind in _WITH_LOGPROBS:
        return
    asked = field if params.logprobs else top_field
    served = f"is served by backend `{backend.name}` ({backend.kind})" if backend else "is answered by a workflow"
    raise invalid_request(
        f"`{asked}` (token log probabilities) needs an OpenAI-compatible or Ollama backend; model "
        f"`{request.model}` {served}. Ask without `{asked}`.",
        param=asked,
    )
