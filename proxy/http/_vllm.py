"""vLLM's APIs beside OpenAI's, relayed to the routed backend: its tokenizer (`POST /tokenize`,
`/detokenize`), cross-encoder and embedding-model scores (`/score`, `/v1/score`), sequence
classification (`/classify`, `/v1/classify`) and raw pooling (`/pooling`).

Tools written against vLLM call them at the paths vLLM serves them (at its root, beside `/v1`).
The gateway reads only `model`; the shapes differ between vLLM versions (`text_1`/`text_2`,
`data_1`/`data_2`; `input` or chat `messages`), so everything else is the backend's to check,
its answer (its error too) relayed byte for byte (see `_relay`). Scores, classifications and
pooling are metered as embeddings are (vLLM's `usage.prompt_tokens`, else an estimate of the
input); tokenizing generates nothing and reads no model time: like counting tokens
(`/v1/messages/count_tokens`), it is counted in the key's usage but neither rate limited nor
charged. vLLM's tokenizer takes no `model` (a server has one
model): such a call goes to the default backend. Ollama and Anthropic have none of these APIs.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.dialects._json import Fields, loads_object
from proxy.domain.tokens import requested_tokens
from proxy.http._exchange import DirectBody
from proxy.http._front import FrontDoor, Incoming
from proxy.http._openapi import _INT, _NUM, _OBJ, _STR, _TRACE_HEADERS, Schema, _ok, _op, document
from proxy.http._relay import relay

exchanges = FrontDoor()


@dataclass(frozen=True, slots=True)
class _Api:
    kind: str  # the request log's and the metrics' `kind`
    backend_path: str  # where vLLM serves it (`/../`: the server's root)
    metered: bool  # charged its input tokens (usage, or an estimate)
    model_optional: bool = False  # vLLM's tokenizer: a request may leave `model` out


_APIS = {
    "/tokenize": _Api("tokenize", "/../tokenize", metered=False, model_optional=True),
    "/detokenize": _Api("detokenize", "/../detokenize", metered=False, model_optional=True),
    "/score": _Api("score", "/../score", metered=True),
    "/v1/score": _Api("score", "/../score", metered=True),
    "/classify": _Api("classify", "/../classify", metered=True),
    "/v1/classify": _Api("classify", "/../classify", metered=True),
    "/pooling": _Api("pooling", "/../pooling", metered=True),
}


async def _relayed(incoming: Incoming) -> DirectBody:
    path = incoming.head.path
    api = _APIS[path]
    data = loads_object(incoming.body)
    model = Fields(data).text("model", required=not api.model_optional, nonempty=True)
    # What the model reads: every text of the request but the model's name.
    prompt_tokens = requested_tokens({**data, "model": None}, generates=False).tokens if api.metered else None
    return relay(
        incoming, data, model, api.backend_path, kind=api.kind, stream=False, prompt_tokens=prompt_tokens,
        refusal=f"`{path}` is vLLM's API and needs an OpenAI-compatible backend that serves it (vLLM)",
        # Another model's tokenizer would count differently: no stand-in tokenizes for a model.
        fallbacks=api.metered,
    )


for _path, _api in _APIS.items():
    exchanges.route(_path, kind=_api.kind)(_relayed)


# -- OpenAPI ------------------------------------------------------------------------------------

_TEXTS: Schema = {"oneOf": [_STR, {"type": "array", "items": _STR}, _OBJ]}
_MODEL: Schema = {"type": "string", "minLength": 1}
_USAGE: Schema = {"type": "object", "properties": {"prompt_tokens": _INT, "total_tokens": _INT}}


def _request(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": {"model": _MODEL, **properties}, "additionalProperties": True}


def _list_of(item: Schema) -> Schema:
    return {"type": "object", "properties": {
        "id": _STR, "object": _STR, "created": _INT, "model": _STR, "data": {"type": "array", "items": item}, "usage": _USAGE,
    }}


_TOKENIZED: Schema = {"type": "object", "properties": {
    "count": _INT, "max_model_len": _INT, "tokens": {"type": "array", "items": _INT}, "token_strs": {"type": "array", "items": _STR},
}}
_NOTE = (
    " Relayed as is to the model's OpenAI-compatible backend (vLLM) at its server root, `model` replaced by the "
    "backend's name for it; a model on an Ollama or Anthropic backend is a 400."
)
_OPERATIONS = {
    "/tokenize": _op(
        "Tokenize a prompt or chat messages (vLLM)", "vLLM", _ok(_TOKENIZED),
        body=_request([], prompt=_STR, messages={"type": "array", "items": _OBJ}, add_special_tokens={"type": "boolean"}),
        parameters=_TRACE_HEADERS,
        description="Without `model`, to the default backend (not for a key limited to some models). Free, as "
        "counting tokens is: neither rate limited nor charged." + _NOTE,
    ),
    "/detokenize": _op(
        "Detokenize token ids (vLLM)", "vLLM", _ok({"type": "object", "properties": {"prompt": _STR}}),
        body=_request(["tokens"], tokens={"type": "array", "items": _INT}), parameters=_TRACE_HEADERS,
        description="Without `model`, to the default backend (not for a key limited to some models). Free, as "
        "counting tokens is: neither rate limited nor charged." + _NOTE,
    ),
    "/score": _op(
        "Score text pairs with a cross-encoder or embedding model (vLLM)", "vLLM",
        _ok(_list_of({"type": "object", "properties": {"index": _INT, "object": _STR, "score": _NUM}})),
        body=_request(["model"], text_1=_TEXTS, text_2=_TEXTS), parameters=_TRACE_HEADERS,
        description="Metered as embeddings: the backend's `usage.prompt_tokens`, else an estimate of the input." + _NOTE,
    ),
    "/classify": _op(
        "Classify texts with a sequence-classification model (vLLM)", "vLLM",
        _ok(_list_of({"type": "object", "properties": {"index": _INT, "label": _STR, "probs": {"type": "array", "items": _NUM}}})),
        body=_request(["model"], input=_TEXTS), parameters=_TRACE_HEADERS,
        description="Metered as embeddings: the backend's `usage.prompt_tokens`, else an estimate of the input." + _NOTE,
    ),
    "/pooling": _op(
        "A pooling model's raw output (vLLM)", "vLLM", _ok(_list_of(_OBJ)),
        body=_request(["model"], input=_TEXTS, messages={"type": "array", "items": _OBJ}), parameters=_TRACE_HEADERS,
        description="Metered as embeddings: the backend's `usage.prompt_tokens`, else an estimate of the input." + _NOTE,
    ),
}
for _path, _api in _APIS.items():
    document(_path, "post", _OPERATIONS[_path.removeprefix("/v1")])
