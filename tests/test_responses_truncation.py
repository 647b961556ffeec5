"""The Responses API's `truncation: "auto"` through the official `openai` SDK: a conversation
longer than the model's window (vLLM's `max_model_len`, as its `/v1/models` lists it) loses
its oldest items and is answered; `disabled` is OpenAI's 400 `context_length_exceeded`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest

from tests.fakes import AnthropicBackend, OpenAIBackend, Script
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import gateway as journalled_gateway
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers"]

WINDOW = 2000


class WindowedVLLM(OpenAIBackend):
    """vLLM with a small window: its `/v1/models` says `max_model_len` (unless `listed` is
    off), and it refuses, in vLLM's words, a chat whose prompt and `max_tokens` exceed it.
    Its tokenizer counts `chars_per_token` characters a token."""

    def __init__(self, *, listed: bool = True, chars_per_token: int = 4, wording: str = "vllm-0.6") -> None:
        super().__init__(models=["qwen3-8b"])
        self.listed = listed
        self.chars_per_token = chars_per_token
        self.wording = wording  # whose refusal: vLLM's older or current one, or llama.cpp's

    @staticmethod
    def refusal(prompt: int, answer: int, wording: str) -> str:
        if wording == "llama.cpp":
            return f"request ({prompt} tokens) exceeds the available context size ({WINDOW} tokens), try increasing it"
        if wording == "vllm":
            # It reads the prompt only up to the room left: the figure it gives is a floor.
            return (f"This model's maximum context length is {WINDOW} tokens. However, you requested {answer} output "
                    f"tokens and your prompt contains at least {WINDOW - answer + 1} input tokens, for a total of at "
                    f"least {WINDOW + 1} tokens. Please reduce the length of the input prompt or the number of "
                    "requested output tokens.")
        return (f"This model's maximum context length is {WINDOW} tokens. However, you requested "
                f"{prompt + answer} tokens ({prompt} in the messages, {answer} in the completion). "
                "Please reduce the length of the messages or completion.")

    def chats(self) -> list[dict[str, Any]]:
        return [r.json for r in self.requests if r.path == "/v1/chat/completions"]

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm",
                     **({"max_model_len": WINDOW} if self.listed else {})} for m in self.listed_models()]
            await exchange.respond_json(200, {"object": "list", "data": data})
            return
        if request.path == "/v1/chat/completions":
            body = request.json()
            chars = sum(len(m.get("content") or "") for m in body["messages"])
            chars += sum(len(c["function"]["arguments"]) for m in body["messages"] for c in m.get("tool_calls") or [])
            prompt, answer = chars // self.chars_per_token, body.get("max_tokens") or 0
            if self.wording == "llama.cpp":
                answer = 0  # its context holds the prompt; the answer stops where the context ends
            if prompt + answer > WINDOW:
                message = self.refusal(prompt, answer, self.wording)
                await exchange.respond_json(400, {"object": "error", "message": message, "type": "BadRequestError",
                                                  "param": None, "code": 400})
                return
        await super().route(request, exchange, call)


class WindowedClaude(AnthropicBackend):
    """Claude with a small window: the Models API says `max_input_tokens`, which bounds the
    prompt alone (not `max_tokens`); a longer one is Anthropic's "prompt is too long"."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            data = [{"type": "model", "id": "claude-small", "display_name": "Claude", "max_input_tokens": WINDOW,
                     "max_tokens": 8192, "created_at": "2026-01-01T00:00:00Z"}]
            await exchange.respond_json(200, {"data": data, "has_more": False, "first_id": "claude-small",
                                              "last_id": "claude-small"})
            return
        if request.path == "/v1/messages":
            body = request.json()
            chars = len(body.get("system") or "") if isinstance(body.get("system"), str) else 0
            for message in body["messages"]:
                blocks = message["content"] if isinstance(message["content"], list) else [{"text": message["content"]}]
                for block in blocks:
                    inner = block.get("content")
                    parts = inner if isinstance(inner, list) else [{"text": inner or ""}]
                    chars += len(block.get("text") or "") + sum(len(part.get("text") or "") for part in parts)
                    chars += len(json.dumps(block["input"])) if "input" in block else 0
            if chars // 4 > WINDOW:
                await self.send_error(exchange, 400, f"prompt is too long: {chars // 4} tokens > {WINDOW} maximum")
                return
        await super().route(request, exchange, call)


def conversation(turns: int) -> list[dict[str, Any]]:
    """An agent's history: each turn a user message, function calls and their outputs, and the
    model's reply, ~250 tokens a turn; then the question to answer now."""
    items: list[dict[str, Any]] = []
    for turn in range(turns):
        calls = [f"call_{turn}", *([f"call_{turn}b"] if turn % 2 else [])]  # odd turns: two calls at once
        items += [
            {"role": "user", "content": f"question {turn} " + "x" * 400},
            *({"type": "function_call", "call_id": call, "name": "lookup", "arguments": json.dumps({"q": turn})}
              for call in calls),
            *({"type": "function_call_output", "call_id": call, "output": f"result {turn} " + "y" * (400 // len(calls))}
              for call in calls),
            {"role": "assistant", "content": f"answer {turn} " + "z" * 150},
        ]
    return [*items, {"role": "user", "content": "and now the last question"}]


@asynccontextmanager
async def gateway(fake: WindowedVLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, prefixes=("qwen",))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield client
        await client.close()


@pytest.fixture
async def vllm() -> AsyncIterator[tuple[WindowedVLLM, openai.AsyncOpenAI]]:
    fake = WindowedVLLM()
    async with gateway(fake) as client:
        await client.models.list()  # the gateway has listed the backend: it knows the window
        yield fake, client


def assert_trimmed(sent: dict[str, Any]) -> None:
    """What the backend saw of `conversation(20)`: the instructions first, then the newest
    turns whole (from a user message, every call with its output), the last question last."""
    messages = sent["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[-1] == {"role": "user", "content": "and now the last question"}
    assert messages[1]["role"] == "user" and messages[1]["content"].startswith("question ")
    first = int(messages[1]["content"].split()[1])
    assert first > 0  # the oldest turns went
    calls = [c["id"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]
    outputs = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    kept = [call for turn in range(first, 20) for call in (f"call_{turn}", *([f"call_{turn}b"] if turn % 2 else []))]
    assert calls == outputs == kept
    assert len(messages) == 2 + 3 * (20 - first) + len(kept)


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_drops_the_oldest_items_to_fit_the_models_window(
    vllm: tuple[WindowedVLLM, openai.AsyncOpenAI], stream: bool
) -> None:
    fake, client = vllm
    fake.set_script(Script(tokens=["fits"]))
    items: Any = conversation(20)  # ~5000 tokens, for a window of 2000
    if stream:
        async with client.responses.stream(
            model="qwen3-8b", instructions="Be brief.", input=items, truncation="auto", max_output_tokens=300,
        ) as events:
            response = await events.get_final_response()
    else:
        response = await client.responses.create(
            model="qwen3-8b", instructions="Be brief.", input=items, truncation="auto", max_output_tokens=300,
        )
    assert response.status == "completed" and response.output_text == "fits" and response.truncation == "auto"
    assert len(fake.chats()) == 1  # fitted before it was sent: no refusal to learn from
    assert_trimmed(fake.chats()[0])
    assert fake.chats()[0]["max_tokens"] == 300


async def test_disabled_is_openais_context_length_exceeded(vllm: tuple[WindowedVLLM, openai.AsyncOpenAI]) -> None:
    fake, client = vllm
    for truncation in ("disabled", None):
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(
                model="qwen3-8b", instructions="Be brief.", input=conversation(20),
                **({"truncation": truncation} if truncation else {}),
            )
        assert info.value.status_code == 400
        assert (info.value.code, info.value.param) == ("context_length_exceeded", "input")
        assert "maximum context length is 2000 tokens" in info.value.message
    assert len(fake.chats()[-1]["messages"]) == 2 + 3 * 20 + 30  # sent whole


@pytest.mark.parametrize(("listed", "stream"), [(True, False), (False, False), (False, True)])
async def test_auto_retries_once_with_fewer_items_when_the_backend_finds_it_too_long(listed: bool, stream: bool) -> None:
    """The gateway's estimate is four characters a token; this model's tokenizer makes more
    of the same text (or the gateway does not know its window): the backend's refusal says
    by how much, and the conversation is trimmed by that much more, once."""
    fake = WindowedVLLM(listed=listed, chars_per_token=3)
    fake.set_script(Script(tokens=["fits now"]))
    async with gateway(fake) as client:
        await client.models.list()
        if stream:
            async with client.responses.stream(
                model="qwen3-8b", instructions="Be brief.", input=conversation(20), truncation="auto",
            ) as events:
                response = await events.get_final_response()
        else:
            response = await client.responses.create(
                model="qwen3-8b", instructions="Be brief.", input=conversation(20), truncation="auto",
            )
        assert response.output_text == "fits now"
        refused, answered = fake.chats()
        assert len(answered["messages"]) < len(refused["messages"])
        assert_trimmed(answered)


@pytest.mark.parametrize("wording", ["vllm-0.6", "vllm", "llama.cpp"])
async def test_a_refusal_is_read_as_room_for_the_prompt_beside_the_answers_tokens(wording: str) -> None:
    """With `max_output_tokens`, vLLM's refusal counts the answer's tokens too: what the
    prompt may take is the window less them, and it is trimmed to that in one retry. Today's
    vLLM says `requested 300 output tokens` and only a floor of the prompt ("at least");
    llama.cpp says the request's size and its context's."""
    fake = WindowedVLLM(listed=False, chars_per_token=3, wording=wording)
    fake.set_script(Script(tokens=["fits now"]))
    async with gateway(fake) as client:
        await client.models.list()
        response = await client.responses.create(
            model="qwen3-8b", instructions="Be brief.", input=conversation(20), truncation="auto",
            max_output_tokens=300,
        )
    assert response.output_text == "fits now"
    refused, answered = fake.chats()
    assert len(answered["messages"]) < len(refused["messages"])
    assert_trimmed(answered)


async def test_a_conversation_that_cannot_be_trimmed_enough_is_still_the_400() -> None:
    """Only the instructions and the last question, longer than the window: nothing may go."""
    fake = WindowedVLLM()
    async with gateway(fake) as client:
        await client.models.list()
        with pytest.raises(openai.BadRequestError) as info:
            await client.responses.create(
                model="qwen3-8b", instructions="Be brief.", input="q" * 10_000, truncation="auto",
            )
        assert info.value.code == "context_length_exceeded"
        assert len(fake.chats()) == 1  # nothing to drop: not sent again


async def test_a_stand_in_is_sent_the_conversation_fitted_to_its_own_window() -> None:
    """The model's backend is down and its stand-in's window is smaller than the conversation:
    the stand-in is sent it trimmed to its own window, at once (not whole, to be refused first)."""
    down = OpenAIBackend(default=Script(status=503), models=["qwen3-32b"])
    stand_in = WindowedVLLM()
    stand_in.set_script(Script(tokens=["from the stand-in"]))
    async with down.serve() as big, stand_in.serve() as small, running_gateway(
        backend("big", big.url, prefixes=("qwen3-32b",)), backend("small", small.url, prefixes=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.models.list()  # the gateway knows the stand-in's window
        response = await client.responses.create(
            model="qwen3-32b", instructions="Be brief.", input=conversation(20), truncation="auto", max_output_tokens=300,
        )
        await client.close()
    assert response.output_text == "from the stand-in"
    (sent,) = stand_in.chats()  # fitted before it was sent: no refusal to learn from
    assert_trimmed(sent)


async def test_auto_fits_a_claude_models_listed_input_window() -> None:
    """Anthropic's `max_input_tokens` is the prompt's: a large `max_output_tokens` takes
    nothing from it, and the trimmed conversation still opens with a user turn."""
    fake = WindowedClaude()
    fake.set_script(Script(tokens=["fits"]))
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", prefixes=("claude",))
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.models.list()
        response = await client.responses.create(
            model="claude-small", instructions="Be brief.", input=conversation(20), truncation="auto",
            max_output_tokens=4000,
        )
        await client.close()
    assert response.output_text == "fits"
    chats = [r.json for r in fake.requests if r.path == "/v1/messages"]
    assert len(chats) == 1
    sent = chats[0]
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 4000
    assert sent["messages"][0]["role"] == "user" and sent["messages"][-1]["content"] == "and now the last question"
    assert 4 < len(sent["messages"]) < 4 * 20


async def test_auto_trims_a_continued_conversation_and_the_journal_keeps_it_whole(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`previous_response_id` is how a conversation outgrows the window: what the earlier
    response was answered with goes first, so it is what goes; the new input reaches the
    model whole, and the response's own input is listed as it was sent."""
    fake = WindowedVLLM()
    fake.set_script(Script(tokens=["fits"]))
    async with fake.serve() as server, journalled_gateway(
        pg_database_url, nats_url, backend("vllm", server.url, prefixes=("qwen",))
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.models.list()
        first = await client.responses.create(model="qwen3-8b", input=conversation(5), truncation="auto")
        await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")
        later: Any = [{"role": "user", "content": f"later {i} " + "w" * 600} for i in range(5)]
        second = await client.responses.create(
            model="qwen3-8b", instructions="Be brief.", input=later, truncation="auto", previous_response_id=first.id,
        )
        await wait_for_row(pg_database_url, second.id.removeprefix("resp_"), "completed")
        listed = await client.responses.input_items.list(second.id, order="asc")
        await client.close()
    assert second.output_text == "fits"
    sent = fake.chats()[-1]["messages"]
    assert sent[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in sent[-5:]] == [item["content"] for item in later]
    assert sent[1]["role"] == "user" and sent[1]["content"].startswith("question ")
    assert not sent[1]["content"].startswith("question 0 ")  # the first response's oldest went
    assert [item.content[0].text for item in listed.data] == [item["content"] for item in later]  # type: ignore[union-attr]
