"""A fake Anthropic Messages API server.

Routes: ``POST /v1/messages`` (non-stream and SSE stream), ``POST /v1/messages/count_tokens``,
``GET /v1/models``. Streams follow the documented event order: ``message_start``; per
content block ``content_block_start`` / ``content_block_delta`` ... / ``content_block_stop``
(thinking, then text, then ``tool_use`` blocks started with ``input: {}`` and fed
``input_json_delta`` fragments); ``message_delta`` with the stop reason and cumulative
``output_tokens`` only; ``message_stop``. A ``ping`` follows the first block start.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Any

from .base import Call, FakeBackend, json_bytes
from .script import (
    Plan,
    Script,
    estimate_tokens,
    flatten_text,
    last_user_text,
    make_plan,
    split_fragments,
)
from .server import Exchange, Request

__all__ = ["ANTHROPIC_ERROR_TYPES", "AnthropicBackend", "anthropic_error"]

ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """``{"type":"error","error":{"type":...,"message":...}}`` for an HTTP status."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_bytes(payload) + b"\n\n"


class _MessageRendering:
    content_type = "text/event-stream; charset=utf-8"

    def __init__(self, plan: Plan, script: Script, *, request_id: str, redacted: str | None = None) -> None:
        self.plan = plan
        self.script = script
        self.redacted = redacted
        self.message_id = "msg_" + secrets.token_hex(12)
        self.headers = [
            ("request-id", request_id),
            ("cache-control", "no-cache"),
            *script.headers,
        ]
        if script.stop_sequence is not None and plan.finish_reason == "stop":
            self.stop_reason = "stop_sequence"
        else:
            self.stop_reason = _STOP_REASONS.get(plan.finish_reason, plan.finish_reason)
        self.tool_ids = [c.id or "toolu_" + secrets.token_hex(12) for c in plan.tool_calls]

    def _usage(self, *, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.plan.usage.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.plan.usage.cached_tokens,
            "output_tokens": output_tokens,
        }

    def _signature(self) -> str:
        return thinking_signature(self.plan.reasoning_text)

    def _blocks_present(self) -> tuple[bool, bool]:
        thinking = bool(self.plan.reasoning)
        text = bool(self.plan.content and self.plan.text) or not self.plan.tool_calls
        return thinking, text

    def frames(self) -> Iterator[bytes]:
        plan = self.plan
        yield _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": self.message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": plan.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": self._usage(output_tokens=1),
                },
            },
        )
        index = 0
        pinged = False

        def start(block: dict[str, Any]) -> bytes:
            nonlocal pinged
            frame = _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
            if not pinged:
                pinged = True
                return frame + _PING
            return frame

        def delta(body: dict[str, Any]) -> bytes:
            return _event(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": body},
            )

        def stop() -> bytes:
            return _event("content_block_stop", {"type": "content_block_stop", "index": index})

        thinking, text = self._blocks_present()
        if self.redacted is not None:
            yield start({"type": "redacted_thinking", "data": self.redacted})
            yield stop()
            index += 1
        if thinking:
            yield start({"type": "thinking", "thinking": "", "signature": ""})
            for piece in plan.reasoning:
                yield delta({"type": "thinking_delta", "thinking": piece})
            yield delta({"type": "signature_delta", "signature": self._signature()})
            yield stop()
            index += 1
        if text:
            yield start({"type": "text", "text": ""})
            for piece in plan.content:
                yield delta({"type": "text_delta", "text": piece})
            yield stop()
            index += 1
        for call, tool_id in zip(plan.tool_calls, self.tool_ids, strict=True):
            yield start({"type": "tool_use", "id": tool_id, "name": call.name, "input": {}})
            yield delta({"type": "input_json_delta", "partial_json": ""})
            for fragment in split_fragments(call.arguments, plan.tool_arg_fragment):
                if fragment:
                    yield delta({"type": "input_json_delta", "partial_json": fragment})
            yield stop()
            index += 1
        yield _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self._stop_sequence()},
                "usage": {"output_tokens": plan.usage.completion_tokens},
            },
        )
        yield _event("message_stop", {"type": "message_stop"})

    def _stop_sequence(self) -> str | None:
        return self.script.stop_sequence if self.stop_reason == "stop_sequence" else None

    def error_frame(self) -> bytes:
        error = self.script.fail_body or anthropic_error(
            529, self.script.error_message or "Overloaded"
        )
        return _event("error", error)

    def keepalive(self) -> bytes:
        return _PING

    def full_body(self) -> bytes:
        plan = self.plan
        content: list[dict[str, Any]] = []
        thinking, text = self._blocks_present()
        if self.redacted is not None:
            content.append({"type": "redacted_thinking", "data": self.redacted})
        if thinking:
            content.append(
                {
                    "type": "thinking",
                    "thinking": plan.reasoning_text,
                    "signature": self._signature(),
                }
            )
        if text:
            content.append({"type": "text", "text": plan.text})
        for call, tool_id in zip(plan.tool_calls, self.tool_ids, strict=True):
            content.append(
                {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": call.name,
                    "input": call.arguments_object(),
                }
            )
        return json_bytes(
            {
                "id": self.message_id,
                "type": "message",
                "role": "assistant",
                "model": plan.model,
                "content": content,
                "stop_reason": self.stop_reason,
                "stop_sequence": self._stop_sequence(),
                "usage": self._usage(output_tokens=plan.usage.completion_tokens),
            }
        )


class AnthropicBackend(FakeBackend):
    """A scriptable Anthropic Messages backend.

    ``api_key``: require it in ``x-api-key`` (or ``Authorization: Bearer``), else 401.
    ``require_version``: reject requests without an ``anthropic-version`` header (400).
    ``strict_thinking``: refuse (400), as Anthropic does, a thinking request whose tool loop's
    last assistant turn does not open with a thinking block, or a thinking block whose
    signature is not the one this fake gave its text; and any request with a tool call whose
    result is not in the next message.
    ``redacted_thinking``: the `data` of a `redacted_thinking` block each answer opens with
    (Claude's thinking its safety systems encrypted whole).
    """

    dialect = "anthropic"
    default_model = "claude-sonnet-4-5"

    def __init__(
        self, *, api_key: str | None = None, require_version: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key
        self.require_version = require_version
        self.strict_thinking = False
        self.redacted_thinking: str | None = None

    def error_payload(self, status: int, message: str) -> Any:
        return anthropic_error(status, message)

    def common_headers(self) -> list[tuple[str, str]]:
        return [("request-id", "req_" + secrets.token_hex(12))]

    def default_error_message(self, status: int) -> str:
        return {
            529: "Overloaded",
            429: "Number of request tokens has exceeded your rate limit",
        }.get(status, "Internal server error")

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        path, method = request.path, request.method
        if not await self._check_headers(request, exchange):
            return
        if path == "/v1/messages" and method == "POST":
            await self._messages(request, exchange, call)
        elif path == "/v1/messages/count_tokens" and method == "POST":
            await self._count_tokens(request, exchange)
        elif path == "/v1/models" and method == "GET":
            models = self.listed_models()
            await exchange.respond_json(
                200,
                {
                    "data": [
                        {
                            "type": "model",
                            "id": m,
                            "display_name": m.replace("-", " ").title(),
                            "created_at": "2025-09-29T00:00:00Z",
                        }
                        for m in models
                    ],
                    "has_more": False,
                    "first_id": models[0] if models else None,
                    "last_id": models[-1] if models else None,
                },
                headers=self.common_headers(),
            )
        else:
            await self.send_error(exchange, 404, "Not found")

    async def _check_headers(self, request: Request, exchange: Exchange) -> bool:
        if self.api_key is not None:
            key = request.header("x-api-key")
            bearer = request.header("authorization")
            if key != self.api_key and bearer != f"Bearer {self.api_key}":
                await self.send_error(exchange, 401, "invalid x-api-key")
                return False
        if self.require_version and request.header("anthropic-version") is None:
            await self.send_error(exchange, 400, "anthropic-version: header is required")
            return False
        return True

    async def _body(self, request: Request, exchange: Exchange) -> dict[str, Any] | None:
        try:
            body = request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            await self.send_error(exchange, 400, "There was an issue with your request body")
            return None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            await self.send_error(exchange, 400, "model: Field required")
            return None
        if not isinstance(body.get("messages"), list):
            await self.send_error(exchange, 400, "messages: Field required")
            return None
        if not self.model_known(model):
            await self.send_error(exchange, 404, f"model: {model}")
            return None
        return body

    async def _messages(self, request: Request, exchange: Exchange, call: Call) -> None:
        body = await self._body(request, exchange)
        if body is None:
            return
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int):
            await self.send_error(exchange, 400, "max_tokens: Field required")
            return
        model: str = body["model"]
        messages = body["messages"]
        refused = _thinking_refused(body) if self.strict_thinking else None
        if refused is not None:
            await self.send_error(exchange, 400, refused)
            return
        script = self.script_for(model)
        plan = make_plan(
            script,
            model=model,
            prompt_text=_prompt_text(body),
            last_user_text=last_user_text(messages),
            max_tokens=max_tokens,
            tool_id_prefix="toolu_",
        )
        rendering = _MessageRendering(
            plan, script, request_id="req_" + secrets.token_hex(12), redacted=self.redacted_thinking
        )
        await self.run_generation(
            exchange,
            call,
            script=script,
            plan=plan,
            stream=body.get("stream") is True,
            rendering=rendering,
        )

    async def _count_tokens(self, request: Request, exchange: Exchange) -> None:
        body = await self._body(request, exchange)
        if body is None:
            return
        count = estimate_tokens(_prompt_text(body))
        answer: dict[str, Any] = {"input_tokens": count}
        if "context_management" in body:  # the count before its edits (this fake makes none)
            answer["context_management"] = {"original_input_tokens": count}
        await exchange.respond_json(200, answer, headers=self.common_headers())


def thinking_signature(thinking: str) -> str:
    """The signature this fake gives a thinking block's text."""
    return "EqQBCkYIBxgCKkB" + hashlib.sha256(thinking.encode()).hexdigest()


def _thinking_refused(body: dict[str, Any]) -> str | None:
    """Anthropic's refusal of a request's thinking blocks, if it has one."""
    blocks = [
        (i, block) for i, m in enumerate(body["messages"]) if isinstance(m, dict) and m.get("role") == "assistant"
        for block in (m.get("content") if isinstance(m.get("content"), list) else [])
    ]
    for i, block in blocks:
        if block.get("type") == "thinking" and block.get("signature") != thinking_signature(str(block.get("thinking"))):
            return f"messages.{i}.content: Invalid `signature` in `thinking` block"
    messages = body["messages"]
    for i, message in enumerate(messages[:-1]):
        calls = {b.get("id") for b in message.get("content") or [] if isinstance(b, dict) and b.get("type") == "tool_use"}
        after = messages[i + 1].get("content")
        answered = {b.get("tool_use_id") for b in after if isinstance(b, dict)} if isinstance(after, list) else set()
        if calls - answered:
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(sorted(calls - answered))}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message.")
    thinking = body.get("thinking")
    if not (isinstance(thinking, dict) and thinking.get("type") == "enabled") or not blocks:
        return None
    last = max(i for i, _ in blocks)
    content = body["messages"][last]["content"]
    if any(b.get("type") == "tool_use" for b in content) and content[0].get("type") not in ("thinking", "redacted_thinking"):
        return (
            f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
            f"`{content[0].get('type')}`. When `thinking` is enabled, a final `assistant` message must start with a "
            "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
        )
    return None


def _prompt_text(body: dict[str, Any]) -> str:
    """What counts as input: the system prompt plus the messages (tools are ignored)."""
    system = flatten_text(body.get("system") or "")
    messages = flatten_text(body.get("messages"))
    return f"{system}\n{messages}" if system else messages
