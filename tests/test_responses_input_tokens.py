"""`client.responses.input_tokens.count` (`POST /v1/responses/input_tokens`) with the official
`openai` SDK: the request `responses.create` would send, counted by the backend's tokenizer
where it has one (Anthropic's count_tokens, vLLM's `/tokenize`), else the gateway's estimate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from tests.fakes import Script, Usage
from tests.harness import backend
from tests.test_anthropic_api import TokenizingOpenAIBackend
from tests.test_auth_helpers import eventually, gateway, new_key, wait_for_key
from tests.test_responses_api import MODELS, Setup, three_backends
from tests.test_responses_stored import _usage

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

TOOLS: Any = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
]
GENERATING = {"/v1/chat/completions", "/v1/messages", "/api/chat", "/api/generate"}


@pytest.fixture
async def setup(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    async with three_backends(monkeypatch, TokenizingOpenAIBackend()) as stack:
        yield stack


async def test_input_tokens_are_counted_by_the_backends_tokenizer_where_it_has_one(setup: Setup) -> None:
    count = setup.client.responses.input_tokens.with_raw_response.count

    raw = await count(model=MODELS["anthropic"], input="What is the weather in Paris?", instructions="Be brief.")
    counted = raw.parse()
    assert counted.object == "response.input_tokens" and counted.input_tokens > 0
    assert "x-token-count" not in raw.headers and raw.headers["x-request-id"]
    sent = setup.fakes["anthropic"].requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and sent.json["system"] == "Be brief."
    assert sent.json["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]

    raw = await count(model=MODELS["openai"], input="What is the weather in Paris?", instructions="Be brief.", tools=TOOLS)
    tokenize = setup.fakes["openai"].requests[-1]
    assert tokenize.path == "/tokenize" and "x-token-count" not in raw.headers
    assert [(m["role"], m["content"]) for m in tokenize.json["messages"]] == [
        ("system", "Be brief."), ("user", "What is the weather in Paris?"),
    ]
    assert [tool["function"]["name"] for tool in tokenize.json["tools"]] == ["get_weather"]
    assert raw.parse().input_tokens == len(json.dumps(tokenize.json["messages"])) // 4

    # Ollama cannot count: the gateway's estimate (about four characters a token), said to be one.
    bare = await count(model=MODELS["ollama"], input="x" * 400)
    assert bare.headers["x-token-count"] == "estimate" and bare.parse().input_tokens == 100
    with_tools = (await count(model=MODELS["ollama"], input="x" * 400, tools=TOOLS)).parse()
    assert with_tools.input_tokens > 100

    # Counting generates nothing.
    assert not [r.path for fake in setup.fakes.values() for r in fake.requests if r.path in GENERATING]


async def test_input_tokens_errors_are_openais(setup: Setup) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await setup.client.responses.input_tokens.count(model="no-such-model", input="Hi")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await setup.client.responses.input_tokens.count(model=MODELS["openai"], input=[{"type": "web_search_call"}])
    assert isinstance(bad.value.body, dict) and bad.value.body["param"] == "input[0].type"
    with pytest.raises(openai.BadRequestError) as streamed:
        await setup.client.responses.input_tokens.count(model=MODELS["openai"], input="Hi", extra_body={"stream": True})
    assert isinstance(streamed.value.body, dict) and streamed.value.body["param"] == "stream"


# -- with the journal: what a request continues is counted too ----------------------------------------


@dataclass
class Stack:
    url: str
    db: str
    fake: TokenizingOpenAIBackend
    client: openai.AsyncOpenAI


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = TokenizingOpenAIBackend(default=Script(tokens=["The secret", " is 42."], usage=Usage(5, 2)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        yield Stack(url, pg_database_url, fake, client)
        await client.close()


def tokenized(fake: TokenizingOpenAIBackend) -> list[tuple[str, Any]]:
    sent = fake.requests[-1]
    assert sent.path == "/tokenize"
    return [(m["role"], m.get("content")) for m in sent.json["messages"]]


async def test_what_a_request_continues_or_references_is_counted(stack: Stack) -> None:
    asked = await stack.client.responses.create(model="m", input="Remember: the secret is 42.", instructions="Old.")
    earlier = [("user", "Remember: the secret is 42."), ("assistant", "The secret is 42.")]

    # `previous_response_id`: its conversation and answer, without its instructions.
    await stack.client.responses.input_tokens.count(
        model="m", input="What is the secret?", instructions="New.", previous_response_id=asked.id,
    )
    assert tokenized(stack.fake) == [("system", "New."), *earlier, ("user", "What is the secret?")]

    # Without `model`: that of the response it continues (OpenAI's `model` is optional).
    await stack.client.responses.input_tokens.count(input="What is the secret?", previous_response_id=asked.id)
    assert tokenized(stack.fake) == [*earlier, ("user", "What is the secret?")]
    assert stack.fake.requests[-1].json["model"] == "m"
    with pytest.raises(openai.BadRequestError) as unnamed:
        await stack.client.responses.input_tokens.count(input="What is the secret?")
    assert isinstance(unnamed.value.body, dict) and unnamed.value.body["param"] == "model"

    # `item_reference`s: the items they name.
    await stack.client.responses.input_tokens.count(model="m", input=[
        {"type": "item_reference", "id": asked.output[0].id}, {"role": "user", "content": "And?"},
    ])
    assert tokenized(stack.fake) == [("assistant", "The secret is 42."), ("user", "And?")]

    # `conversation`: its items first; `input` may be left out.
    conversation = await stack.client.conversations.create(items=[{"role": "user", "content": "Hello"}])
    await stack.client.responses.input_tokens.count(model="m", conversation=conversation.id)
    assert tokenized(stack.fake) == [("user", "Hello")]
    # ... and counting adds nothing to it.
    assert len((await stack.client.conversations.items.list(conversation.id)).data) == 1

    with pytest.raises(openai.BadRequestError) as missing:
        await stack.client.responses.input_tokens.count(model="m", input="Hi", previous_response_id="resp_nope")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "previous_response_not_found"


async def test_counting_is_not_a_model_call_of_the_key(stack: Stack) -> None:
    key = await new_key(stack.db, "counter")
    await wait_for_key(stack.url, key)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    for _ in range(3):
        assert (await client.responses.input_tokens.count(model="m", input="How many tokens?")).input_tokens > 0
    # A refused count (logged and in the metrics) is no failed model call of the key either.
    with pytest.raises(openai.BadRequestError):
        await client.responses.input_tokens.count(model="m", input="x", extra_body={"stream": True})
    await client.responses.create(model="m", input="Hi")  # the one model call
    await client.close()
    entry = await eventually(lambda: _usage(stack.db, "counter"), within=10)
    assert (entry["requests"], entry["errors"], entry["completion_tokens"]) == (1, 0, 2)
