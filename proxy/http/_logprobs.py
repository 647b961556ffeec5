"""Token log probabilities, which only OpenAI-compatible and Ollama backends give: asked of
any other (an Anthropic backend, a workflow), a 400 naming the client's field rather than an
answer silently without them (LiteLLM refuses them too, unless told to drop them)."""

from __future__ import annotations

from proxy.config import BackendConfig
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import UNSUPPORTED_PARAMETER, UNSUPPORTED_VALUE, invalid_request

_WITH_LOGPROBS = frozenset({"openai", "ollama"})
_OLLAMA_MOST = 20  # Ollama's bound on `top_logprobs`


def refuse_logprobs_without_backend(
    request: ChatRequest, backend: BackendConfig | None, *, field: str, top_field: str = "top_logprobs"
) -> None:
    """`field`: what the client asked them with (`logprobs`, a Responses client's `include`);
    `top_field`: its alternatives per token. Alternatives alone ask for nothing (an Ollama
    client's; OpenAI's codec refuses them), so they are no reason to refuse a backend."""
    params = request.params
    if not params.logprobs:
        return
    if backend is not None and backend.kind in _WITH_LOGPROBS:
        top = params.top_logprobs
        if backend.kind == "ollama" and top is not None and not 0 <= top <= _OLLAMA_MOST:
            # An OpenAI client may ask vLLM's -1 or more than 20; Ollama would refuse it.
            raise invalid_request(
                f"Invalid `{top_field}`: {top}; model `{request.model}` is served by backend `{backend.name}` "
                f"(ollama), which gives 0 to {_OLLAMA_MOST} alternatives per token.",
                param=top_field, code=UNSUPPORTED_VALUE,
            )
        return
    served = f"is served by backend `{backend.name}` ({backend.kind})" if backend else "is answered by a workflow"
    raise invalid_request(
        f"`{field}` (token log probabilities) needs an OpenAI-compatible or Ollama backend; model "
        f"`{request.model}` {served}. Ask without `{field}`.",
        param=field, code=UNSUPPORTED_PARAMETER,
    )
