"""Rerank (`POST /v1/rerank`, `/v2/rerank`, `/rerank`), relayed to the routed backend.

The API vLLM, llama.cpp and Infinity serve for reranker models (Jina's and Cohere's shape:
`query`, `documents`, `top_n`, `return_documents`; `results` ranked by `relevance_score`).
The gateway checks the fields it must understand, routes the model, and relays the
backend's answer byte for byte (see `_relay`) to the backend's `/rerank` under its
OpenAI-compatible root. Ollama and Anthropic have no rerank API, so their models are
refused.
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


@exchanges.route("/v1/rerank", kind="rerank")
@exchanges.route("/v2/rerank", kind="rerank")
@exchanges.route("/rerank", kind="rerank")
async def rerank(incoming: Incoming) -> DirectBody:
    data = loads_object(incoming.body)
    fields = Fields(data)
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    if data.get("query") is None:
        raise invalid_request("Missing required parameter `query`.", param="query")
    query = _text_of(fields, "query", data["query"])
    documents = fields.array("documents", required=True, nonempty=True)
    assert documents is not None
    texts = [_text_of(fields, f"documents[{i}]", document) for i, document in enumerate(documents)]
    fields.integer("top_n", minimum=0)
    fields.boolean("return_documents")
    # A reranker reads the query with each document.
    prompt_tokens = sum(estimate_tokens(len(query) + len(text)) for text in texts)
    return relay(
        incoming, data, model, "/rerank", kind="rerank", stream=False, prompt_tokens=prompt_tokens,
        refusal="Rerank needs an OpenAI-compatible backend that serves `/rerank` (vLLM, llama.cpp, Infinity)",
        fallbacks=True,
    )


def _text_of(fields: Fields, where: str, value: Any) -> str:
    """A query or document: a string, or an object (`{"text": ...}`, or a multimodal part a
    backend may understand). Its text, for the usage estimate."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else ""
    raise fields.fail(where, "a string or an object")
