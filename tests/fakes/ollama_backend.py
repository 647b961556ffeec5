"""A fake Ollama server speaking the native NDJSON API.

Routes: ``POST /api/chat``, ``POST /api/generate`` (both stream by default, honour
``"stream": false``; without a prompt they load the model, or with ``keep_alive: 0`` unload
it), ``GET /api/ps`` (the models loaded), ``GET /api/tags``, ``POST /api/show``, ``POST /api/embed``, legacy
``POST /api/embeddings``, ``GET /api/version``, ``GET /`` ("Ollama is running"), and the
OpenAI-compatible ``POST /v1/completions`` (legacy text completions, OpenAI's SSE).

Ollama's quirks are kept on purpose: tool calls arrive whole in one ``done: false`` line as
``{"function": {"name", "arguments": {object}}}`` without ids, ``done_reason`` stays
``"stop"`` when the model called tools, errors are ``{"error": "..."}`` (as an NDJSON line
once a stream has started), durations are nanoseconds.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .base import Call, FakeBackend, json_bytes
from .openai_backend import run_text_completion
from .script import (
    Plan,
    Script,
    embed_text,
    estimate_tokens,
    flatten_text,
    last_user_text,
    logprobs_asked,
    make_plan,
    token_logprob,
)
from .server import Exchange, Request

__all__ = ["OLLAMA_VERSION", "OllamaBackend", "normalize_model"]

OLLAMA_VERSION = "0.12.6"
_LOAD_DURATION_NS = 2_151_625


def normalize_model(name: str) -> str:
    """Ollama's model naming: a name without a tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@lru_cache(maxsize=65536)
def _js(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()


def _details(model: str) -> dict[str, Any]:
    match = re.match(r"[a-z]+", model.rsplit("/", 1)[-1])
    family = match.group(0) if match else "llama"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    }


class _OllamaRendering:
    """One chat or generate reply as NDJSON lines, or as a single object."""

    content_type = "application/x-ndjson"

    def __init__(
        self, plan: Plan, script: Script, *, generate: bool, started_at: float, logprobs: int | None = None
    ) -> None:
        self.logprobs = logprobs  # alternatives per token, when `logprobs: true` was asked
        self.plan = plan
        self.script = script
        self.generate = generate
        self.started_at = started_at
        self.first_frame_at: float | None = None
        self.headers = list(script.headers)
        self.done_reason = "length" if plan.finish_reason == "length" else "stop"
        self._model = _js(plan.model)

    def _line(self, body: bytes) -> bytes:
        return (
            b'{"model":'
            + self._model
            + b',"created_at":"'
            + _now().encode()
            + b'",'
            + body
            + b"}\n"
        )

    def _piece(self, *, content: str = "", thinking: str | None = None, logprobs: bytes = b"") -> bytes:
        if self.generate:
            body = b'"response":' + _js(content)
            if thinking is not None:
                body += b',"thinking":' + _js(thinking)
        else:
            body = b'"message":{"role":"assistant","content":' + _js(content)
            if thinking is not None:
                body += b',"thinking":' + _js(thinking)
            body += b"}"
        return self._line(body + logprobs + b',"done":false')

    def _tool_calls(self) -> list[dict[str, Any]]:
        return [
            {"function": {"name": call.name, "arguments": call.arguments_object()}}
            for call in self.plan.tool_calls
        ]

    def _stats(self) -> dict[str, Any]:
        now = time.monotonic()
        first = self.first_frame_at or now
        usage = self.plan.usage
        stats: dict[str, Any] = {
            "done_reason": self.done_reason,
            "done": True,
            "total_duration": int((now - self.started_at) * 1e9) + _LOAD_DURATION_NS,
            "load_duration": _LOAD_DURATION_NS,
            "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": max(1, int((first - self.started_at) * 1e9)),
            "eval_count": usage.completion_tokens,
            "eval_duration": max(1, int((now - first) * 1e9)),
        }
        if self.generate:
            stats["context"] = list(range(1, usage.total_tokens + 1))
        return stats

    def frames(self) -> Iterator[bytes]:
        self.first_frame_at = time.monotonic()
        for piece in self.plan.reasoning:
            yield self._piece(thinking=piece)
        for i, piece in enumerate(self.plan.content):
            if self.logprobs is None:
                yield self._piece(content=piece)
            else:
                # Ollama's are a list at the top level of each line.
                entries = json_bytes([token_logprob(piece, i, self.logprobs)])
                yield self._piece(content=piece, logprobs=b',"logprobs":' + entries)
        if self.plan.tool_calls and not self.generate:
            calls = json_bytes(self._tool_calls())
            yield self._line(
                b'"message":{"role":"assistant","content":"","tool_calls":'
                + calls
                + b'},"done":false'
            )
        final = json_bytes(self._stats())
        empty = (
            b'"response":""' if self.generate else b'"message":{"role":"assistant","content":""}'
        )
        yield self._line(empty + b"," + final[1:-1])

    def error_frame(self) -> bytes:
        error = self.script.fail_body or {
            "error": self.script.error_message
            or "an error was encountered while running the model: unexpected EOF"
        }
        return json_bytes(error) + b"\n"

    def keepalive(self) -> bytes | None:
        return None

    def full_body(self) -> bytes:
        body: dict[str, Any] = {"model": self.plan.model, "created_at": _now()}
        if self.generate:
            body["response"] = self.plan.text
            if self.plan.reasoning:
                body["thinking"] = self.plan.reasoning_text
        else:
            message: dict[str, Any] = {"role": "assistant", "content": self.plan.text}
            if self.plan.reasoning:
                message["thinking"] = self.plan.reasoning_text
            if self.plan.tool_calls:
                message["tool_calls"] = self._tool_calls()
            body["message"] = message
        if self.logprobs is not None:
            body["logprobs"] = [token_logprob(p, i, self.logprobs) for i, p in enumerate(self.plan.content)]
        body.update(self._stats())
        return json_bytes(body)


class OllamaBackend(FakeBackend):
    """A scriptable Ollama backend; with ``models`` given, others get Ollama's 404."""

    dialect = "ollama"
    default_model = "llama3.2:latest"
    # Real Ollama's legacy /api/embeddings returns the model's raw vector, /api/embed the same
    # one normalised: a test that must tell the two apart sets this to scale the legacy one.
    legacy_embedding_scale = 1.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loaded: dict[str, float] = {}
        """Models in memory (loaded by a request, until one with ``keep_alive: 0``): when."""

    def model_known(self, model: str) -> bool:
        if self.models is None:
            return True
        return normalize_model(model) in {normalize_model(m) for m in self.models}

    def listed_models(self) -> list[str]:
        return sorted({normalize_model(m) for m in super().listed_models()})

    def script_for(self, model: str) -> Script:
        if model not in self.scripts and normalize_model(model) in self.scripts:
            model = normalize_model(model)
        return super().script_for(model)

    def default_error_message(self, status: int) -> str:
        return {
            400: "invalid request",
            404: "model not found, try pulling it first",
            429: "server busy, please try again.  maximum pending requests exceeded",
            503: "server busy, please try again.  maximum pending requests exceeded",
        }.get(status, "llama runner process has terminated: exit status 2")

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        path, method = request.path, request.method
        if path == "/" and method in ("GET", "HEAD"):
            if not self.healthy:
                await exchange.respond(503, b"", content_type="text/plain; charset=utf-8")
                return
            body = b"" if method == "HEAD" else b"Ollama is running"
            await exchange.respond(200, body, content_type="text/plain; charset=utf-8")
        elif path == "/api/version" and method == "GET":
            await exchange.respond_json(200, {"version": OLLAMA_VERSION})
        elif path == "/api/ps" and method == "GET":
            await exchange.respond_json(200, {"models": [self._running(m) for m in sorted(self.loaded)]})
        elif path == "/api/tags" and method == "GET":
            await exchange.respond_json(
                200, {"models": [self._tag(m) for m in self.listed_models()]}
            )
        elif path == "/api/chat" and method == "POST":
            await self._run(request, exchange, call, generate=False)
        elif path == "/api/generate" and method == "POST":
            await self._run(request, exchange, call, generate=True)
        elif path == "/api/show" and method == "POST":
            await self._show(request, exchange)
        elif path == "/api/embed" and method == "POST":
            await self._embed(request, exchange, legacy=False)
        elif path == "/api/embeddings" and method == "POST":
            await self._embed(request, exchange, legacy=True)
        elif path == "/v1/completions" and method == "POST":
            await run_text_completion(self, request, exchange, call)
        else:
            await exchange.respond(404, b"404 page not found", content_type="text/plain")

    def _running(self, model: str) -> dict[str, Any]:
        entry = self._tag(model)
        del entry["modified_at"]
        expires = datetime.fromtimestamp(self.loaded[model] + 300, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {**entry, "expires_at": expires, "size_vram": entry["size"], "context_length": 4096}

    def _tag(self, model: str) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "modified_at": "2025-10-01T12:00:00.000000000Z",
            "size": 2019393189,
            "digest": hashlib.sha256(model.encode()).hexdigest(),
            "details": _details(model),
        }

    async def _model_body(
        self, request: Request, exchange: Exchange, *, name_key: str = "model"
    ) -> tuple[dict[str, Any], str] | None:
        try:
            body = request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            await self.send_error(exchange, 400, "invalid character looking for beginning of value")
            return None
        model = body.get(name_key) or body.get("name")
        if not isinstance(model, str) or not model:
            await self.send_error(exchange, 400, "model is required")
            return None
        if not self.model_known(model):
            await self.send_error(exchange, 404, f'model "{model}" not found, try pulling it first')
            return None
        return body, model

    async def _run(
        self, request: Request, exchange: Exchange, call: Call, *, generate: bool
    ) -> None:
        parsed = await self._model_body(request, exchange)
        if parsed is None:
            return
        body, model = parsed
        unload = body.get("keep_alive") in (0, "0", "0s")
        if unload:
            self.loaded.pop(normalize_model(model), None)
        else:
            self.loaded[normalize_model(model)] = time.time()
        if generate:
            prompt = body.get("prompt")
            if not prompt:
                await self._load_reply(exchange, model, generate=True, unload=unload)
                return
            prompt_text = flatten_text([body.get("system") or "", prompt])
            user_text = prompt if isinstance(prompt, str) else flatten_text(prompt)
        else:
            messages = body.get("messages")
            if not messages:
                await self._load_reply(exchange, model, generate=False, unload=unload)
                return
            prompt_text = flatten_text(messages)
            user_text = last_user_text(messages)
        options = body.get("options")
        num_predict = options.get("num_predict") if isinstance(options, dict) else None
        script = self.script_for(model)
        plan = make_plan(
            script,
            model=model,
            prompt_text=prompt_text,
            last_user_text=user_text,
            max_tokens=num_predict if isinstance(num_predict, int) and num_predict >= 0 else None,
        )
        rendering = _OllamaRendering(
            plan, script, generate=generate, started_at=request.received_at, logprobs=logprobs_asked(body)
        )
        await self.run_generation(
            exchange,
            call,
            script=script,
            plan=plan,
            stream=body.get("stream") is not False,
            rendering=rendering,
        )

    async def _load_reply(self, exchange: Exchange, model: str, *, generate: bool, unload: bool) -> None:
        """An empty prompt only loads the model: Ollama answers ``done_reason: "load"`` (or
        ``"unload"`` to ``keep_alive: 0``)."""
        reply: dict[str, Any] = {"model": model, "created_at": _now()}
        if generate:
            reply["response"] = ""
        else:
            reply["message"] = {"role": "assistant", "content": ""}
        reply.update({"done_reason": "unload" if unload else "load", "done": True})
        await exchange.respond_json(200, reply)

    async def _show(self, request: Request, exchange: Exchange) -> None:
        parsed = await self._model_body(request, exchange)
        if parsed is None:
            return
        body, model = parsed
        family = _details(model)["family"]
        # `verbose` (`ollama show --verbose`) adds the tokenizer's arrays and the tensors.
        verbose: dict[str, Any] = {
            "tensors": [{"name": "token_embd.weight", "type": "Q6_K", "shape": [3072, 128256]}],
        } if body.get("verbose") is True else {}
        await exchange.respond_json(
            200,
            {
                **verbose,
                "license": "fake license",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {normalize_model(model)}\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": _details(model),
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": 3212749888,
                    f"{family}.context_length": 131072,
                    f"{family}.embedding_length": self.embedding_dim,
                },
                "capabilities": ["completion", "tools"],
                "modified_at": "2025-10-01T12:00:00.000000000Z",
            },
        )

    async def _embed(self, request: Request, exchange: Exchange, *, legacy: bool) -> None:
        started = time.monotonic()
        parsed = await self._model_body(request, exchange)
        if parsed is None:
            return
        body, model = parsed
        # As Ollama does: every embed call loads the model (keeps it `keep_alive`), even one
        # with no input (how clients preload or, with `keep_alive: 0`, unload an embedding model).
        if body.get("keep_alive") in (0, "0", "0s"):
            self.loaded.pop(normalize_model(model), None)
        else:
            self.loaded[normalize_model(model)] = time.time()
        if legacy:
            prompt = body.get("prompt")
            text = prompt if isinstance(prompt, str) else ""
            raw = [x * self.legacy_embedding_scale for x in embed_text(text, self.embedding_dim)]
            await exchange.respond_json(200, {"embedding": raw})
            return
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            await self.send_error(exchange, 400, "invalid input type")
            return
        dimensions = body.get("dimensions")
        dim = dimensions if isinstance(dimensions, int) and dimensions > 0 else self.embedding_dim
        await exchange.respond_json(
            200,
            {
                "model": model,
                "embeddings": [embed_text(t, dim) for t in texts],
                "total_duration": int((time.monotonic() - started) * 1e9) + _LOAD_DURATION_NS,
                "load_duration": _LOAD_DURATION_NS,
                "prompt_eval_count": sum(estimate_tokens(t) for t in texts),
            },
        )
