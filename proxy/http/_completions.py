"""OpenAI's legacy text completions (`POST /v1/completions`), relayed to the routed backend.

Autocomplete and fill-in-the-middle clients (Continue, Tabby, llama.vscode) send `prompt`
and `suffix` here, and every peer server answers it. The gateway checks the few fields it
must understand, routes the model, and relays the backend's answer byte for byte (see
`_relay`). An Anthropic backend has no such API, so its models are refused.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects._json import Fields, loads_object
from proxy.domain.errors import invalid_request
from proxy.domain.tokens import estimate_tokens
from proxy.http._exchange import DirectBody
from proxy.http._front import FrontDoor, Incoming
from proxy.http._relay import relay

exchanges = FrontDoor()


@exchanges.route("/v1/completions", kind="completion")
async def completions(incoming: Incoming) -> DirectBody:
    data = loads_object(incoming.body)
    fields = Fields(data)
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    prompt_size = _check_prompt(fields)
    stream = bool(fields.boolean("stream"))
    suffix = fields.text("suffix")
    prompt_tokens = prompt_size[1] + estimate_tokens(prompt_size[0] + len(suffix or ""))
    return relay(
        incoming, data, model, "/completions", kind="completion", stream=stream, prompt_tokens=prompt_tokens,
        refusal="Text completions (`/v1/completions`) need an OpenAI-compatible or Ollama backend",
        instead=" Use `/v1/chat/completions` instead.", prompt_param="prompt", fallbacks=True,
    )


def _check_prompt(fields: Fields) -> tuple[int, int]:
    """`prompt`: text, texts, a token array or token arrays (forwarded as sent). Its size,
    for an estimate should the backend's usage never come: (characters, token ids)."""
    prompt = fields.data.get("prompt")
    if prompt is None:
        if "prompt_embeds" in fields.data:  # vLLM's alternative to a prompt: its business
            return 0, 0
        raise invalid_request("Missing required parameter `prompt`.", param="prompt")
    if isinstance(prompt, str):
        return len(prompt), 0
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return sum(len(item) for item in prompt), 0
        if all(_is_token(item) for item in prompt):
            return 0, len(prompt)
        if all(isinstance(item, list) and item and all(_is_token(t) for t in item) for item in prompt):
            return 0, sum(len(item) for item in prompt)
    raise fields.fail("prompt", "a string, an array of strings, an array of tokens or an array of token arrays")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


