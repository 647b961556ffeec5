"""A fake OpenAI-compatible server, speaking like vLLM / llama.cpp / api.openai.com.

Routes: ``POST /v1/chat/completions`` and the legacy ``POST /v1/completions`` (stream and
non-stream), ``GET /v1/models``,
``POST /v1/embeddings`` (float or base64), ``POST /v1/rerank``, ``GET /health``, and the
audio API (``/v1/audio/transcriptions``, ``/translations``, ``/speech``: see ``openai_audio``).

Stream chunks are assembled from pre-encoded byte templates (one id/created per response),
so the fake can push many thousands of chunks per second from one core.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import struct
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from .base import Call, FakeBackend, json_bytes
from .openai_audio import run_speech, run_speech_to_text
from .script import (
    Plan,
    Script,
    ToolCall,
    Usage,
    embed_text,
    estimate_tokens,
    flatten_text,
    last_user_text,
    logprobs_asked,
    make_plan,
    split_fragments,
    token_logprob,
)
from .server import Exchange, Request

__all__ = ["OpenAIBackend", "openai_error"]

_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
}

_STREAM_HEADERS = [
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
]


def openai_error(status: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """The ``{"error": {...}}`` body OpenAI sends with an HTTP error status."""
    kind, code = _ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@lru_cache(maxsize=65536)
def _js(text: str) -> bytes:
    """A JSON string literal; tokens repeat a lot, so their encodings are cached."""
    return json.dumps(text, ensure_ascii=False).encode()


def _usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


class _ChatRendering:
    """One chat completion as OpenAI SSE chunks, or as a ``chat.completion`` object."""

    content_type = "text/event-stream; charset=utf-8"

    def __init__(
        self, plan: Plan, script: Script, *, include_usage: bool, request_id: str, logprobs: int | None = None
    ) -> None:
        self.plan = plan
        self.script = script
        self.include_usage = include_usage
        self.logprobs = logprobs  # alternatives per token, when `logprobs: true` was asked
        self.completion_id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.headers = [("x-request-id", request_id), *_STREAM_HEADERS, *script.headers]
        fingerprint = b""
        if script.system_fingerprint is not None:
            fingerprint = b',"system_fingerprint":' + _js(script.system_fingerprint)
        self._envelope = (
            b'{"id":"' + self.completion_id.encode() + b'","object":"chat.completion.chunk",'
            b'"created":'
            + str(self.created).encode()
            + b',"model":'
            + _js(plan.model)
            + fingerprint
        )
        self._prefix = b"data: " + self._envelope + b',"choices":[{"index":0,"delta":'
        usage_tail = b',"usage":null' if include_usage else b""
        self._open_tail = b',"logprobs":null,"finish_reason":null}]' + usage_tail + b"}\n\n"
        self._usage_tail = usage_tail

    def _chunk(self, delta: bytes) -> bytes:
        return self._prefix + delta + self._open_tail

    def _final_chunk(self, delta: bytes) -> bytes:
        reason = _js(self.plan.finish_reason)
        return (
            self._prefix
            + delta
            + b',"logprobs":null,"finish_reason":'
            + reason
            + (b',"stop_reason":' + _js(self.script.stop_sequence) if self.script.stop_sequence else b"")
            + b"}]"
            + self._usage_tail
            + b"}\n\n"
        )

    def frames(self) -> Iterator[bytes]:
        plan, script = self.plan, self.script
        if not script.no_role_chunk:
            yield self._chunk(b'{"role":"assistant","content":""}')
        for piece in plan.reasoning:
            yield self._chunk(b'{"reasoning_content":' + _js(piece) + b"}")
        finish_inline = script.finish_on_last_token and not plan.tool_calls and plan.content
        last = len(plan.content) - 1
        for i, piece in enumerate(plan.content):
            delta = b'{"content":' + _js(piece) + b"}"
            if finish_inline and i == last:
                yield self._final_chunk(delta)
            elif self.logprobs is not None:
                entry = json_bytes({"content": [token_logprob(piece, i, self.logprobs)]})
                yield self._prefix + delta + self._open_tail.replace(b'"logprobs":null', b'"logprobs":' + entry, 1)
            else:
                yield self._chunk(delta)
        for delta in self._tool_call_deltas():
            yield self._chunk(delta)
        if not finish_inline:
            yield self._final_chunk(b"{}")
        if self.include_usage:
            usage = json_bytes(_usage_object(plan.usage))
            yield b"data: " + self._envelope + b',"choices":[],"usage":' + usage + b"}\n\n"
        yield b"data: [DONE]\n\n"

    def _tool_call_deltas(self) -> Iterator[bytes]:
        per_call = [self._call_pieces(i, call) for i, call in enumerate(self.plan.tool_calls)]
        if self.script.interleave_tool_calls:
            longest = max((len(p) for p in per_call), default=0)
            for step in range(longest):
                for pieces in per_call:
                    if step < len(pieces):
                        yield pieces[step]
        else:
            for pieces in per_call:
                yield from pieces

    def _call_pieces(self, index: int, call: ToolCall) -> list[bytes]:
        idx = str(index).encode()
        head = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        pieces = [b'{"tool_calls":[' + json_bytes(head) + b"]}"]
        for fragment in split_fragments(call.arguments, self.plan.tool_arg_fragment):
            if fragment:
                pieces.append(
                    b'{"tool_calls":[{"index":'
                    + idx
                    + b',"function":{"arguments":'
                    + _js(fragment)
                    + b"}}]}"
                )
        return pieces

    def error_frame(self) -> bytes:
        error = self.script.fail_body or openai_error(
            500,
            self.script.error_message
            or "The server had an error while processing your request. Sorry about that!",
        )
        return b"data: " + json_bytes(error) + b"\n\n"

    def keepalive(self) -> bytes:
        return b": ping\n\n"

    def full_body(self) -> bytes:
        plan = self.plan
        message: dict[str, Any] = {
            "role": "assistant",
            "content": plan.text if plan.content or not plan.tool_calls else None,
            "refusal": None,
        }
        if plan.reasoning:
            message["reasoning_content"] = plan.reasoning_text
        if plan.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in plan.tool_calls
            ]
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": plan.model,
        }
        if self.script.system_fingerprint is not None:
            body["system_fingerprint"] = self.script.system_fingerprint
        logprobs = None
        if self.logprobs is not None:
            logprobs = {"content": [token_logprob(p, i, self.logprobs) for i, p in enumerate(plan.content)]}
        choice: dict[str, Any] = {
            "index": 0, "message": message, "logprobs": logprobs, "finish_reason": plan.finish_reason,
        }
        if self.script.stop_sequence:
            choice["stop_reason"] = self.script.stop_sequence  # vLLM's: the stop string that matched
        body["choices"] = [choice]
        body["usage"] = _usage_object(plan.usage)
        return json_bytes(body)


class TextRendering:
    """One legacy text completion (``/v1/completions``) as SSE chunks carrying
    ``choices[].text``, or as a ``text_completion`` object (vLLM's and llama.cpp's shapes)."""

    content_type = "text/event-stream; charset=utf-8"

    def __init__(
        self, plan: Plan, script: Script, *, include_usage: bool, request_id: str, logprobs: int | None = None
    ) -> None:
        self.plan = plan
        self.script = script
        self.include_usage = include_usage
        self.logprobs = logprobs  # the legacy `logprobs: N`: alternatives per token
        self.completion_id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.headers = [("x-request-id", request_id), *_STREAM_HEADERS, *script.headers]
        self._envelope = (
            b'{"id":"' + self.completion_id.encode() + b'","object":"text_completion","created":'
            + str(self.created).encode() + b',"model":' + _js(plan.model)
        )

    def _chunk(self, text: str, finish: str | None, logprobs: bytes = b"null") -> bytes:
        reason = b"null" if finish is None else _js(finish)
        usage = b',"usage":null' if self.include_usage else b""
        return (
            b"data: " + self._envelope + b',"choices":[{"index":0,"text":' + _js(text)
            + b',"logprobs":' + logprobs + b',"finish_reason":' + reason + b"}]" + usage + b"}\n\n"
        )

    def _legacy_logprobs(self, start: int, pieces: list[str], offset: int) -> dict[str, Any]:
        """vLLM's legacy shape: parallel lists, the alternatives as `{token: logprob}` maps."""
        entries = [token_logprob(p, start + i, max(self.logprobs or 0, 1)) for i, p in enumerate(pieces)]
        offsets = [offset + sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
        return {
            "tokens": pieces, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"][: self.logprobs]} for e in entries],
            "text_offset": offsets,
        }

    def frames(self) -> Iterator[bytes]:
        offset = 0
        for i, piece in enumerate(self.plan.content):
            if self.logprobs is None:
                yield self._chunk(piece, None)
            else:
                yield self._chunk(piece, None, json_bytes(self._legacy_logprobs(i, [piece], offset)))
            offset += len(piece)
        yield self._chunk("", self.plan.finish_reason)
        if self.include_usage:
            usage = json_bytes(_usage_object(self.plan.usage))
            yield b"data: " + self._envelope + b',"choices":[],"usage":' + usage + b"}\n\n"
        yield b"data: [DONE]\n\n"

    def error_frame(self) -> bytes:
        error = self.script.fail_body or openai_error(500, self.script.error_message or "The server had an error.")
        return b"data: " + json_bytes(error) + b"\n\n"

    def keepalive(self) -> bytes:
        return b": ping\n\n"

    def full_body(self) -> bytes:
        plan = self.plan
        return json_bytes({
            "id": self.completion_id, "object": "text_completion", "created": self.created, "model": plan.model,
            "choices": [{
                "index": 0, "text": plan.text, "finish_reason": plan.finish_reason,
                "logprobs": None if self.logprobs is None else self._legacy_logprobs(0, plan.content, 0),
            }],
            "usage": _usage_object(plan.usage),
        })


async def json_body(backend: FakeBackend, request: Request, exchange: Exchange) -> dict[str, Any] | None:
    """The request's JSON object, or None once a 400 has been sent."""
    try:
        body = request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        await backend.send_error(exchange, 400, "We could not parse the JSON body of your request.")
        return None
    return body


def prompt_text(prompt: Any) -> str | None:
    """A legacy completion's prompt as text (token ids as words); None if malformed."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(p, int) for p in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) for p in prompt):
            return "\n".join(" ".join(map(str, p)) for p in prompt)
    return None


async def run_text_completion(backend: FakeBackend, request: Request, exchange: Exchange, call: Call) -> None:
    """``POST /v1/completions`` as vLLM answers it (Ollama's ``/v1/completions`` too)."""
    body = await json_body(backend, request, exchange)
    if body is None:
        return
    model = body.get("model")
    if not isinstance(model, str) or not model:
        await backend.send_error(exchange, 400, "you must provide a model parameter")
        return
    text = prompt_text(body.get("prompt"))
    if text is None:
        await backend.send_error(exchange, 400, "'prompt' must be a string or an array")
        return
    if not backend.model_known(model):
        await backend.send_error(exchange, 404, f"The model `{model}` does not exist.")
        return
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = body.get("max_tokens")
    script = backend.script_for(model)
    plan = make_plan(
        script, model=model, prompt_text=text, last_user_text=text,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
    )
    request_id = request.header("x-request-id") or "req_" + secrets.token_hex(16)
    asked = body.get("logprobs")
    logprobs = asked if isinstance(asked, int) and not isinstance(asked, bool) else None
    rendering = TextRendering(plan, script, include_usage=include_usage, request_id=request_id, logprobs=logprobs)
    await backend.run_generation(exchange, call, script=script, plan=plan, stream=stream, rendering=rendering)


class RerankRendering:
    """A rerank answer as vLLM writes it: documents scored by the share of the query's
    words they contain, best first, ``top_n`` of them; ``usage`` counts ``total_tokens``."""

    content_type = "application/json"

    def __init__(self, plan: Plan, script: Script, body: dict[str, Any], request_id: str) -> None:
        self.plan = plan
        self.script = script
        self.body = body
        self.headers = [("x-request-id", request_id), *script.headers]

    def frames(self) -> Iterator[bytes]:
        return iter(())

    def error_frame(self) -> bytes:
        return json_bytes(openai_error(500, self.script.error_message or "The server had an error."))

    def keepalive(self) -> None:
        return None

    def full_body(self) -> bytes:
        query, documents = self.body["query"], self.body["documents"]
        words = set(re.findall(r"\w+", _rerank_text(query).lower()))
        results = []
        for index, document in enumerate(documents):
            text = _rerank_text(document)
            found = words & set(re.findall(r"\w+", text.lower()))
            result: dict[str, Any] = {"index": index, "relevance_score": len(found) / max(1, len(words))}
            if self.body.get("return_documents", True):
                result["document"] = {"text": text}
            results.append(result)
        results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        top_n = self.body.get("top_n")
        if isinstance(top_n, int) and top_n > 0:
            results = results[:top_n]
        answer: dict[str, Any] = {"id": "rerank-" + secrets.token_hex(8), "model": self.plan.model, "results": results}
        if not self.script.omit_usage:
            tokens = self.script.usage.prompt_tokens if self.script.usage is not None else sum(
                estimate_tokens(_rerank_text(query) + _rerank_text(d)) for d in documents
            )
            answer["usage"] = {"total_tokens": tokens}
        return json_bytes(answer)


def _rerank_text(item: Any) -> str:
    if isinstance(item, dict):
        return str(item.get("text", ""))
    return str(item)


async def run_rerank(backend: FakeBackend, request: Request, exchange: Exchange, call: Call) -> None:
    """``POST /v1/rerank`` as vLLM answers it (Jina's and Cohere's shape)."""
    body = await json_body(backend, request, exchange)
    if body is None:
        return
    model = body.get("model")
    if not isinstance(model, str) or not model:
        await backend.send_error(exchange, 400, "you must provide a model parameter")
        return
    if not isinstance(body.get("query"), str | dict) or not isinstance(body.get("documents"), list):
        await backend.send_error(exchange, 400, "'query' and 'documents' are required")
        return
    if not backend.model_known(model):
        await backend.send_error(exchange, 404, f"The model `{model}` does not exist.")
        return
    script = backend.script_for(model)
    text = _rerank_text(body["query"])
    plan = make_plan(script, model=model, prompt_text=text, last_user_text=text, max_tokens=None)
    request_id = request.header("x-request-id") or "req_" + secrets.token_hex(16)
    rendering = RerankRendering(plan, script, body, request_id)
    await backend.run_generation(exchange, call, script=script, plan=plan, stream=False, rendering=rendering)


class OpenAIBackend(FakeBackend):
    """A scriptable OpenAI-compatible backend. ``api_key``: require ``Bearer <api_key>``."""

    dialect = "openai"
    default_model = "fake-model"

    def __init__(self, *, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key

    def error_payload(self, status: int, message: str) -> Any:
        return openai_error(status, message)

    def common_headers(self) -> list[tuple[str, str]]:
        return [("x-request-id", "req_" + secrets.token_hex(16))]

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        path, method = request.path, request.method
        if path == "/health":
            status = 200 if self.healthy else 503
            await exchange.respond_json(status, {"status": "ok" if self.healthy else "error"})
            return
        if not path.startswith("/v1/"):
            await self.send_error(exchange, 404, f"Unknown request URL: {method} {path}.")
            return
        if self.api_key is not None and request.header("authorization") != f"Bearer {self.api_key}":
            await self.send_error(
                exchange,
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
            )
            return
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(request, exchange, call)
        elif path == "/v1/completions" and method == "POST":
            await run_text_completion(self, request, exchange, call)
        elif path == "/v1/embeddings" and method == "POST":
            await self._embeddings(request, exchange)
        elif path == "/v1/rerank" and method == "POST":
            await run_rerank(self, request, exchange, call)
        elif path in ("/v1/audio/transcriptions", "/v1/audio/translations") and method == "POST":
            await run_speech_to_text(self, request, exchange, call, "transcribe" if path.endswith("transcriptions") else "translate")
        elif path == "/v1/audio/speech" and method == "POST":
            await run_speech(self, request, exchange, call)
        elif path == "/v1/models" and method == "GET":
            await exchange.respond_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name}
                        for m in self.listed_models()
                    ],
                },
                headers=self.common_headers(),
            )
        elif path.startswith("/v1/models/") and method == "GET":
            model = path.removeprefix("/v1/models/")
            if not self.model_known(model):
                await self.send_error(exchange, 404, f"The model `{model}` does not exist.")
                return
            await exchange.respond_json(
                200, {"id": model, "object": "model", "created": 1700000000, "owned_by": self.name}
            )
        else:
            await self.send_error(exchange, 404, f"Unknown request URL: {method} {path}.")

    async def _chat(self, request: Request, exchange: Exchange, call: Call) -> None:
        body = await json_body(self, request, exchange)
        if body is None:
            return
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            await self.send_error(exchange, 400, "you must provide a model parameter")
            return
        if not isinstance(messages, list) or not messages:
            await self.send_error(exchange, 400, "'messages' must contain at least one message")
            return
        if not self.model_known(model):
            await self.send_error(exchange, 404, f"The model `{model}` does not exist.")
            return
        top = body.get("top_logprobs")
        if isinstance(top, int) and (top > 0 or top == -1) and body.get("logprobs") is not True:
            # vLLM's ChatCompletionRequest refuses alternatives asked without the logprobs.
            await self.send_error(exchange, 400, "when using `top_logprobs`, `logprobs` must be set to true.")
            return
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        script = self.script_for(model)
        plan = make_plan(
            script,
            model=model,
            prompt_text=flatten_text(messages),
            last_user_text=last_user_text(messages),
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        )
        request_id = request.header("x-request-id") or "req_" + secrets.token_hex(16)
        rendering = _ChatRendering(
            plan, script, include_usage=include_usage, request_id=request_id, logprobs=logprobs_asked(body)
        )
        await self.run_generation(
            exchange, call, script=script, plan=plan, stream=stream, rendering=rendering
        )

    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        body = await json_body(self, request, exchange)
        if body is None:
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            await self.send_error(exchange, 400, "you must provide a model parameter")
            return
        if not self.model_known(model):
            await self.send_error(exchange, 404, f"The model `{model}` does not exist.")
            return
        if "input" not in body and isinstance(body.get("messages"), list):
            # vLLM's chat form (multimodal embedding models): one embedding of the whole chat.
            texts: list[str] | None = [_chat_text(body["messages"])]
        else:
            texts = _embedding_inputs(body.get("input"))
        if texts is None:
            await self.send_error(exchange, 400, "'input' must be a string or an array")
            return
        dimensions = body.get("dimensions")
        dim = dimensions if isinstance(dimensions, int) and dimensions > 0 else self.embedding_dim
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vector = embed_text(text, dim)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = sum(estimate_tokens(t) for t in texts)
        await exchange.respond_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            headers=self.common_headers(),
        )


def _chat_text(messages: list[Any]) -> str:
    """What the fake embeds of a chat: its roles, texts and media URLs, in order (so a test can
    tell which chat, and which image, was embedded)."""
    words: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        words.append(str(message.get("role")) if isinstance(message, dict) else "?")
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            inner = part.get(kind) if isinstance(kind, str) else None
            words.append(str(inner.get("url") if isinstance(inner, dict) else inner))
    return " ".join(words)


def _embedding_inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) for v in value):
            return [" ".join(map(str, v)) for v in value]
    return None
