"""Token log probabilities across dialects, with the official `ollama` and `openai` SDKs against
the gateway in front of fake vLLM, Ollama and Anthropic backends: each client gets the backend's
log probabilities in its own shape, a backend without them is a 400 naming the client's field."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.fakes import AnthropicBackend, FakeBackend, OllamaBackend, OpenAIBackend, Script
from tests.fakes.script import token_logprob
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_persistence import rows, wait_for_row
from tests.test_responses_stored import journaled_stack

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

MODELS = {"openai": "qwen3-8b", "ollama": "llama3.2", "anthropic": "claude-test"}
TOKENS = ["Hel", "lo", " wörld"]
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


@dataclass
class Setup:
    url: str
    ollama: ollama.AsyncClient
    openai: openai.AsyncOpenAI
    fakes: dict[str, FakeBackend]

    def sent(self, kind: str) -> dict[str, Any]:
        body = self.fakes[kind].requests[-1].json
        assert isinstance(body, dict)
        return body


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    script = Script(tokens=TOKENS)
    fakes: dict[str, FakeBackend] = {
        "openai": OpenAIBackend(default=script), "ollama": OllamaBackend(default=script),
        "anthropic": AnthropicBackend(default=script),
    }
    async with fakes["openai"].serve() as oa, fakes["ollama"].serve() as ol, fakes["anthropic"].serve() as an:
        async with running_gateway(
            backend("vllm", oa.url, prefixes=("qwen",)),
            backend("ol", ol.url, kind="ollama", prefixes=("llama",)),
            backend("an", an.url, kind="anthropic", prefixes=("claude",)),
        ) as url:
            async with ollama.AsyncClient(host=url) as ollama_client:
                openai_client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                yield Setup(url, ollama_client, openai_client, fakes)
                await openai_client.close()


def expected(top: int) -> list[dict[str, Any]]:
    """What the fakes give for TOKENS, as (token, logprob, alternatives' tokens)."""
    return [_brief(token_logprob(piece, i, top)) for i, piece in enumerate(TOKENS)]


def _brief(entry: Any) -> dict[str, Any]:
    data = entry if isinstance(entry, dict) else entry.model_dump()
    return {
        "token": data["token"], "logprob": data["logprob"],
        "top_logprobs": [(t["token"], t["logprob"]) for t in data.get("top_logprobs") or []],
    }


# -- Ollama clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_ollama_chat_gets_its_logprobs_from_vllm_and_ollama(setup: Setup, kind: str, stream: bool) -> None:
    if stream:
        chunks = [c async for c in await setup.ollama.chat(
            MODELS[kind], messages=MESSAGES, logprobs=True, top_logprobs=2, stream=True,
        )]
        got = [_brief(entry) for chunk in chunks for entry in chunk.logprobs or []]
        text = "".join(chunk.message.content or "" for chunk in chunks)
    else:
        reply = await setup.ollama.chat(MODELS[kind], messages=MESSAGES, logprobs=True, top_logprobs=2)
        got = [_brief(entry) for entry in reply.logprobs or []]
        text = reply.message.content or ""
    assert text == "".join(TOKENS)
    assert got == expected(2)
    sent = setup.sent(kind)
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2


@pytest.mark.parametrize("kind", ["openai", "ollama"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_ollama_generate_gets_its_logprobs(setup: Setup, kind: str, stream: bool) -> None:
    if stream:
        chunks = [c async for c in await setup.ollama.generate(MODELS[kind], "Say hello", logprobs=True, stream=True)]
        got = [_brief(entry) for chunk in chunks for entry in chunk.logprobs or []]
    else:
        reply = await setup.ollama.generate(MODELS[kind], "Say hello", logprobs=True)
        got = [_brief(entry) for entry in reply.logprobs or []]
    assert got == expected(0)
    assert setup.sent(kind)["logprobs"] is True


async def test_an_ollama_client_that_asks_for_none_gets_none(setup: Setup) -> None:
    for kind in ("openai", "ollama"):
        reply = await setup.ollama.chat(MODELS[kind], messages=MESSAGES)
        assert not reply.logprobs
        assert "logprobs" not in setup.sent(kind) and "top_logprobs" not in setup.sent(kind)


# -- OpenAI clients ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_openai_chat_gets_an_ollama_backends_logprobs_in_openais_shape(setup: Setup, stream: bool) -> None:
    if stream:
        chunks = [c async for c in await setup.openai.chat.completions.create(
            model=MODELS["ollama"], messages=MESSAGES, logprobs=True, top_logprobs=3, stream=True,
        )]
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    else:
        reply = await setup.openai.chat.completions.create(
            model=MODELS["ollama"], messages=MESSAGES, logprobs=True, top_logprobs=3,
        )
        assert reply.choices[0].logprobs is not None
        entries = list(reply.choices[0].logprobs.content or [])
    assert [_brief(e) for e in entries] == expected(3)
    assert [e.bytes for e in entries] == [list(t.encode()) for t in TOKENS]
    sent = setup.sent("ollama")
    assert sent["logprobs"] is True and sent["top_logprobs"] == 3


# -- Responses clients ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_response_carries_logprobs_when_included(setup: Setup, kind: str) -> None:
    response = await setup.openai.responses.create(
        model=MODELS[kind], input="Say hello", include=["message.output_text.logprobs"], top_logprobs=2,
    )
    part = response.output[-1].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.text == "".join(TOKENS)
    assert [_brief(e) for e in part.logprobs or []] == expected(2)
    assert response.top_logprobs == 2
    sent = setup.sent(kind)
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2

    # Asked for nothing (`top_logprobs` alone only says how many): none asked of the backend.
    plain = await setup.openai.responses.create(model=MODELS[kind], input="Say hello", top_logprobs=2)
    assert plain.output[-1].content[0].logprobs == []  # type: ignore[union-attr]
    assert "logprobs" not in setup.sent(kind)


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_streamed_response_carries_logprobs_on_each_delta_and_the_whole_part(setup: Setup, kind: str) -> None:
    events = [e async for e in await setup.openai.responses.create(
        model=MODELS[kind], input="Say hello", include=["message.output_text.logprobs"], top_logprobs=1, stream=True,
    )]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.delta for e in deltas] == TOKENS
    assert [_brief(entry) for e in deltas for entry in e.logprobs] == expected(1)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [_brief(entry) for entry in done.logprobs or []] == expected(1)
    part_done = next(e for e in events if e.type == "response.content_part.done")
    assert [_brief(entry) for entry in part_done.part.logprobs or []] == expected(1)  # type: ignore[union-attr]
    completed = events[-1]
    assert completed.type == "response.completed"
    part = completed.response.output[-1].content[0]  # type: ignore[union-attr]
    assert [_brief(entry) for entry in part.logprobs or []] == expected(1)


# -- backends without them -----------------------------------------------------------------------


async def test_logprobs_asked_of_an_anthropic_backend_are_a_400_in_each_dialect(setup: Setup) -> None:
    model = MODELS["anthropic"]
    with pytest.raises(ollama.ResponseError) as ollama_error:
        await setup.ollama.chat(model, messages=MESSAGES, logprobs=True)
    assert ollama_error.value.status_code == 400 and "`logprobs`" in ollama_error.value.error
    with pytest.raises(ollama.ResponseError) as generate_error:
        [c async for c in await setup.ollama.generate(model, "Say hello", logprobs=True, stream=True)]
    assert generate_error.value.status_code == 400 and "`logprobs`" in generate_error.value.error
    with pytest.raises(openai.BadRequestError) as chat_error:
        await setup.openai.chat.completions.create(model=model, messages=MESSAGES, logprobs=True)
    assert chat_error.value.param == "logprobs" and "token log probabilities" in chat_error.value.message
    with pytest.raises(openai.BadRequestError) as responses_error:
        await setup.openai.responses.create(model=model, input="hi", include=["message.output_text.logprobs"])
    assert responses_error.value.param == "include" and "token log probabilities" in responses_error.value.message
    assert setup.fakes["anthropic"].requests == []


# -- legacy completions -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_legacy_completions_logprobs_count_reaches_vllm_and_comes_back(setup: Setup, stream: bool) -> None:
    if stream:
        chunks = [c async for c in await setup.openai.completions.create(
            model=MODELS["openai"], prompt="Say hello", logprobs=2, stream=True,
        )]
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
        tops = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs or []]
    else:
        reply = await setup.openai.completions.create(model=MODELS["openai"], prompt="Say hello", logprobs=2)
        assert reply.choices[0].logprobs is not None
        tokens = list(reply.choices[0].logprobs.tokens or [])
        tops = list(reply.choices[0].logprobs.top_logprobs or [])
    assert tokens == TOKENS and [len(top) for top in tops] == [2, 2, 2]
    assert setup.sent("openai")["logprobs"] == 2


async def test_the_ollama_version_said_is_one_that_serves_logprobs(setup: Setup) -> None:
    """`/api/version` said 0.12.6, a release without logprobs (0.12.11 brought them): a client
    checking the version before asking for them would not ask the gateway."""
    async with httpx.AsyncClient(base_url=setup.url) as http:
        version = (await http.get("/api/version")).json()["version"]
    assert tuple(int(part) for part in version.split(".")) >= (0, 12, 11)


async def test_top_logprobs_out_of_ollamas_bounds_is_a_400(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        reply = await http.post("/api/chat", json={
            "model": MODELS["ollama"], "messages": MESSAGES, "logprobs": True, "top_logprobs": 21,
        })
    assert reply.status_code == 400 and "top_logprobs" in reply.json()["error"]
    assert setup.fakes["ollama"].requests == []


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_ollama_clients_top_logprobs_alone_is_answered_without_logprobs(setup: Setup, kind: str, stream: bool) -> None:
    """As Ollama does (alternatives only say how many, once `logprobs` is on), whatever the
    backend: vLLM refuses `top_logprobs` sent without `logprobs: true`, and an Anthropic
    backend is asked for no log probabilities."""
    if stream:
        chunks = [c async for c in await setup.ollama.chat(MODELS[kind], messages=MESSAGES, top_logprobs=2, stream=True)]
        assert "".join(c.message.content or "" for c in chunks) == "".join(TOKENS)
        assert all(not c.logprobs for c in chunks)
    else:
        reply = await setup.ollama.chat(MODELS[kind], messages=MESSAGES, top_logprobs=2)
        assert reply.message.content == "".join(TOKENS) and not reply.logprobs
    generated = await setup.ollama.generate(MODELS[kind], "Say hello", top_logprobs=3)
    assert generated.response == "".join(TOKENS) and not generated.logprobs


async def test_top_logprobs_an_openai_client_cannot_have_is_a_400_naming_it(setup: Setup) -> None:
    """Alternatives without `logprobs: true` (OpenAI and vLLM refuse them), or beyond what an
    Ollama backend gives (vLLM's -1, more than 20): a 400 naming `top_logprobs`, not an answer
    without the log probabilities asked for, nor Ollama's own refusal."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("openai", {"top_logprobs": 2}), ("ollama", {"top_logprobs": 2}), ("ollama", {"logprobs": False, "top_logprobs": 1}),
        ("ollama", {"logprobs": True, "top_logprobs": -1}), ("ollama", {"logprobs": True, "top_logprobs": 21}),
    ]
    for kind, asked in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                await setup.openai.chat.completions.create(
                    model=MODELS[kind], messages=MESSAGES, stream=stream, **asked,
                )
            assert refused.value.param == "top_logprobs", (kind, asked, refused.value.message)
    assert setup.fakes["ollama"].requests == [] and setup.fakes["openai"].requests == []
    # `top_logprobs: 0` alone asks for nothing, as on OpenAI; vLLM's -1 still reaches vLLM.
    await setup.openai.chat.completions.create(model=MODELS["ollama"], messages=MESSAGES, top_logprobs=0)
    await setup.openai.chat.completions.create(model=MODELS["openai"], messages=MESSAGES, logprobs=True, top_logprobs=-1)
    assert setup.sent("openai")["top_logprobs"] == -1


# -- kept ------------------------------------------------------------------------------------------


async def test_a_kept_response_read_back_has_its_logprobs(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(tokens=TOKENS))
    async with journaled_stack(pg_database_url, nats_url, fake) as stack:
        answered = await stack.client.responses.create(
            model="m", input="Say hello", include=["message.output_text.logprobs"], top_logprobs=2,
        )
        await wait_for_row(stack.db, answered.id.removeprefix("resp_"), "completed")
        again = await stack.client.responses.retrieve(answered.id)
    part = again.output[-1].content[0]  # type: ignore[union-attr]
    assert [_brief(e) for e in part.logprobs or []] == expected(2)  # type: ignore[union-attr]


async def test_an_ollama_clients_keyed_answer_replays_with_its_logprobs(
    aio_loop: object, pg_database_url: str, nats_url: str,
) -> None:
    fake = OpenAIBackend(default=Script(tokens=TOKENS))
    key = str(uuid.uuid4())

    async def stored() -> bool:
        return bool(rows(stack.db, "SELECT 1 FROM chat_log WHERE idempotency_key = %s AND status = 'completed'", key))

    async with journaled_stack(pg_database_url, nats_url, fake) as stack:
        async with ollama.AsyncClient(host=stack.url, headers={"Idempotency-Key": key}) as client:
            first = await client.chat("m", messages=MESSAGES, logprobs=True, top_logprobs=1)
            await eventually(stored)
            replayed = [c async for c in await client.chat("m", messages=MESSAGES, logprobs=True, top_logprobs=1, stream=True)]
    assert len(fake.requests) == 1
    assert [_brief(e) for e in first.logprobs or []] == expected(1)
    assert [_brief(e) for c in replayed for e in c.logprobs or []] == expected(1)


async def test_a_response_streamed_again_has_its_logprobs(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    # Streamed again from the run's journalled events (NATS), not from the answer kept whole.
    fake = OpenAIBackend(default=Script(tokens=TOKENS))
    async with journaled_stack(pg_database_url, nats_url, fake) as stack:
        live = [e async for e in await stack.client.responses.create(
            model="m", input="Say hello", include=["message.output_text.logprobs"], stream=True,
        )]
        response_id = live[-1].response.id  # type: ignore[union-attr]
        await wait_for_row(stack.db, response_id.removeprefix("resp_"), "completed")
        again = [e async for e in await stack.client.responses.retrieve(response_id, stream=True)]
    deltas = [e for e in again if e.type == "response.output_text.delta"]
    assert [_brief(entry) for e in deltas for entry in e.logprobs] == expected(0)
