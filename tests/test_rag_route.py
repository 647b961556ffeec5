"""The RAG route through every client dialect (official openai, ollama and anthropic SDKs)
in front of fake backends: retrieved context reaches the backend, sources come back, errors
arrive in the caller's dialect, and a client that goes away cancels the retrieval."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import psycopg
import pytest
import trio

import proxy.services.rag
from proxy.infra.embedded import EmbeddedPostgres
from tests.fakes import AnthropicBackend, FakeBackend, OllamaBackend, OpenAIBackend, Script
from tests.harness import backend, running_gateway
from tests.rag_corpus import CORPUS, UNRELATED
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

QUESTION = "How long do we keep the nightly database backups?"
RAG = {"x-workspace": CORPUS}
MODELS = {"openai": "qwen3-8b", "ollama": "llama3.2", "anthropic": "claude-test"}


@dataclass
class Setup:
    url: str
    fakes: dict[str, FakeBackend]

    def system_text(self, kind: str) -> str:
        """The system prompt the backend of `kind` received last."""
        body = self.fakes[kind].requests[-1].json
        if kind == "anthropic":
            system = body.get("system") or ""
            return system if isinstance(system, str) else "".join(block["text"] for block in system)
        messages = body["messages"]
        return messages[0]["content"] if messages[0]["role"] == "system" else ""

    def question_text(self, kind: str) -> str:
        """The last user message the backend of `kind` received last (where the passages go)."""
        body = self.fakes[kind].requests[-1].json
        if "messages" not in body:  # Ollama's /api/generate
            return str(body["prompt"])
        content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        return content if isinstance(content, str) else "\n".join(block["text"] for block in content if "text" in block)


@pytest.fixture
async def setup(corpus_url: str) -> AsyncIterator[Setup]:
    fakes: dict[str, FakeBackend] = {"openai": OpenAIBackend(), "ollama": OllamaBackend(), "anthropic": AnthropicBackend()}
    for fake in fakes.values():
        fake.set_script(Script(tokens=["Backups are kept ", "for 14 days [1]."]))
    async with fakes["openai"].serve() as oa, fakes["ollama"].serve() as ol, fakes["anthropic"].serve() as an:
        async with running_gateway(
            backend("oa", oa.url, default=True),
            backend("ol", ol.url, kind="ollama", prefixes=("llama",)),
            backend("an", an.url, kind="anthropic", prefixes=("claude",)),
            database_url=corpus_url,
        ) as url:
            yield Setup(url, fakes)


def assert_backups_context(system: str) -> None:
    assert "[1] runbooks/postgres.md — PostgreSQL operations > Backups" in system
    assert "Backups are retained for 14 days" in system
    assert "Cite the passages you use" in system


def sources_of(headers: httpx.Headers | Any) -> list[dict[str, Any]]:
    value = json.loads(headers["x-rag-sources"])
    assert isinstance(value, list)
    return value


# -- OpenAI ----------------------------------------------------------------------------------------


async def test_openai_non_streaming(setup: Setup) -> None:
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODELS["openai"], messages=[{"role": "user", "content": QUESTION}], extra_headers=RAG
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "Backups are kept for 14 days [1]."
    # In front of the question, which ends the message: the model reads the passages, then it.
    received = setup.fakes["openai"].requests[-1].json["messages"]
    assert [m["role"] for m in received] == ["user"]
    assert_backups_context(received[-1]["content"])
    assert received[-1]["content"].endswith(f"The user's message:\n\n{QUESTION}")
    sources = sources_of(raw.headers)
    assert sources[0]["n"] == 1 and sources[0]["source"] == "runbooks/postgres.md"
    assert sources[0]["heading"] == "PostgreSQL operations > Backups" and sources[0]["score"] > 0.5
    assert raw.headers["x-rag-context"] == "injected" and raw.headers["x-rag-workspace"] == CORPUS
    assert reply.model_extra is not None and reply.model_extra["rag_sources"] == sources
    await client.close()


async def test_openai_streaming_carries_sources_in_the_first_chunk(setup: Setup) -> None:
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    system = "You are terse."
    async with client.chat.completions.with_streaming_response.create(
        model=MODELS["openai"], stream=True, extra_headers={"x-route": "rag", **RAG},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
    ) as response:
        sources = sources_of(response.headers)
        chunks = [chunk async for chunk in await response.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Backups are kept for 14 days [1]."
    assert chunks[0].model_extra is not None and chunks[0].model_extra["rag_sources"] == sources
    assert all("rag_sources" not in (c.model_extra or {}) for c in chunks[1:])
    # The client's own system prompt reaches the model as it was sent; the context goes with the question.
    assert setup.system_text("openai") == system
    assert_backups_context(setup.question_text("openai"))
    await client.close()


async def test_a_multi_turn_chat_reaches_the_backend_with_its_prefix_unchanged(setup: Setup) -> None:
    """Each turn's passages go with its question, not into the system prompt: what comes before
    (the system prompt, the turns so far) reaches the backend as the client sent it, so its
    prefix cache (vLLM's) is reused turn after turn instead of missing from the first token."""
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0, default_headers=RAG)
    history: Any = [{"role": "system", "content": "You are the ops team's assistant."}, {"role": "user", "content": QUESTION}]
    first = await client.chat.completions.create(model=MODELS["openai"], messages=history)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And where are those backups stored, and who can restore them?"}]
    await client.chat.completions.create(model=MODELS["openai"], messages=history)
    received = setup.fakes["openai"].requests[-1].json["messages"]
    assert received[:-1] == history[:-1]
    assert received[-1]["role"] == "user" and received[-1]["content"].endswith(history[-1]["content"])
    assert "Cite the passages you use" in received[-1]["content"]
    await client.close()


async def test_a_semantic_cache_hit_replays_the_sources_too(setup: Setup, corpus_url: str) -> None:
    body = {"model": MODELS["openai"], "messages": [{"role": "user", "content": QUESTION}]}
    headers = {**RAG, "x-cache": "semantic"}

    def cached() -> int:
        with psycopg.connect(corpus_url) as conn:
            return conn.execute("SELECT count(*) FROM semantic_cache").fetchone()[0]  # type: ignore[index,no-any-return]

    async with httpx.AsyncClient(base_url=setup.url, timeout=30) as client:
        before = await trio.to_thread.run_sync(cached)
        first = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert first.status_code == 200 and first.headers.get("x-cache") != "semantic"
        with trio.fail_after(10):  # the answer is stored after the client has it
            while True:
                if await trio.to_thread.run_sync(cached) > before:
                    break
                await trio.sleep(0.05)
        calls = len(setup.fakes["openai"].requests)
        again = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert again.headers["x-cache"] == "semantic"
    assert len(setup.fakes["openai"].requests) == calls  # answered from the cache
    assert sources_of(again.headers) == sources_of(first.headers) != []
    assert again.json()["rag_sources"] == first.json()["rag_sources"]
    assert again.headers["x-rag-context"] == "injected" and again.headers["x-rag-workspace"] == CORPUS


async def test_plain_requests_are_untouched(setup: Setup) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{setup.url}/v1/chat/completions", json={
            "model": MODELS["openai"], "messages": [{"role": "user", "content": QUESTION}]})
    assert response.status_code == 200
    assert "rag_sources" not in response.json() and "x-rag-sources" not in response.headers
    assert setup.fakes["openai"].requests[-1].json["messages"] == [{"role": "user", "content": QUESTION}]


async def test_no_relevant_passage_answers_without_context(setup: Setup) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{setup.url}/v1/chat/completions", headers=RAG, json={
            "model": MODELS["openai"], "messages": [{"role": "user", "content": UNRELATED}]})
    assert response.status_code == 200
    assert response.headers["x-rag-context"] == "none"
    assert json.loads(response.headers["x-rag-sources"]) == [] and response.json()["rag_sources"] == []
    assert setup.fakes["openai"].requests[-1].json["messages"] == [{"role": "user", "content": UNRELATED}]


# -- Ollama and Anthropic clients ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
async def test_ollama_client(setup: Setup, kind: str) -> None:
    async with ollama.AsyncClient(host=setup.url, headers=RAG) as client:
        parts = [part async for part in await client.chat(
            model=MODELS[kind], messages=[{"role": "user", "content": QUESTION}], stream=True)]
        assert "".join(p.message.content for p in parts) == "Backups are kept for 14 days [1]."
        assert_backups_context(setup.question_text(kind))
        reply = await client.chat(model=MODELS[kind], messages=[{"role": "user", "content": QUESTION}])
        assert reply.message.content == "Backups are kept for 14 days [1]."
    async with httpx.AsyncClient(timeout=30) as http:
        raw = await http.post(f"{setup.url}/api/chat", headers=RAG, json={
            "model": MODELS[kind], "stream": False, "messages": [{"role": "user", "content": QUESTION}]})
    assert sources_of(raw.headers)[0]["source"] == "runbooks/postgres.md"
    assert "rag_sources" not in raw.json()  # the body stays Ollama's exactly


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
async def test_anthropic_client(setup: Setup, kind: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=setup.url, api_key="unused", max_retries=0)
    raw = await client.messages.with_raw_response.create(
        model=MODELS[kind], max_tokens=100, system="Be brief.", extra_headers=RAG,
        messages=[{"role": "user", "content": QUESTION}],
    )
    message = await raw.parse()
    assert "".join(block.text for block in message.content if block.type == "text") == "Backups are kept for 14 days [1]."
    assert setup.system_text(kind) == "Be brief."
    assert_backups_context(setup.question_text(kind))
    assert sources_of(raw.headers)[0]["source"] == "runbooks/postgres.md"
    async with client.messages.stream(
        model=MODELS[kind], max_tokens=100, extra_headers=RAG, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        assert await stream.get_final_text() == "Backups are kept for 14 days [1]."
    assert_backups_context(setup.question_text(kind))
    await client.close()


# -- errors in the caller's dialect ----------------------------------------------------------------


async def test_unknown_workspace_is_a_404_in_every_dialect(setup: Setup) -> None:
    missing = {"x-workspace": "no-such-workspace"}
    messages: Any = [{"role": "user", "content": QUESTION}]
    oa = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no-such-workspace"):
        await oa.chat.completions.create(model=MODELS["openai"], messages=messages, extra_headers=missing, stream=True)
    an = anthropic.AsyncAnthropic(base_url=setup.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        await an.messages.create(model=MODELS["anthropic"], max_tokens=10, messages=messages, extra_headers=missing)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    async with ollama.AsyncClient(host=setup.url, headers=missing) as ol:
        with pytest.raises(ollama.ResponseError) as ollama_error:
            await ol.chat(model=MODELS["ollama"], messages=messages)
    assert ollama_error.value.status_code == 404 and "no-such-workspace" in ollama_error.value.error
    async with httpx.AsyncClient(timeout=30) as http:
        no_workspace = await http.post(f"{setup.url}/v1/chat/completions", headers={"x-route": "rag"},
                                       json={"model": MODELS["openai"], "messages": messages})
        bad_name = await http.post(f"{setup.url}/api/chat", headers={"x-workspace": "../etc"},
                                   json={"model": MODELS["ollama"], "messages": messages})
    assert no_workspace.status_code == 400 and no_workspace.json()["error"]["param"] == "x-workspace"
    assert bad_name.status_code == 400 and "Invalid workspace name" in bad_name.json()["error"]
    assert all(not fake.requests for fake in setup.fakes.values())
    await oa.close()
    await an.close()


async def test_reading_workspaces_from_a_stalled_rag_store_is_a_503(
    setup: Setup, corpus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An admin's listing or a search waited for a locked or stalled PostgreSQL for as long
    # as it lasted.
    monkeypatch.setattr(proxy.services.rag, "QUERY_TIMEOUT", 1.0)
    holder = await trio.to_thread.run_sync(lambda: psycopg.connect(corpus_url))
    try:
        await trio.to_thread.run_sync(holder.execute, "LOCK TABLE rag_documents, rag_chunks IN ACCESS EXCLUSIVE MODE")
        async with httpx.AsyncClient(base_url=setup.url, timeout=30) as http:
            with trio.fail_after(30):
                answers = [
                    await http.get("/v1/workspaces"),
                    await http.get(f"/v1/workspaces/{CORPUS}"),
                    await http.get(f"/v1/workspaces/{CORPUS}/documents"),
                    await http.post(f"/v1/workspaces/{CORPUS}/search", json={"query": QUESTION}),
                ]
    finally:
        await trio.to_thread.run_sync(holder.close)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_unavailable" and answer.headers["retry-after"] == "2"


async def test_a_workspace_and_a_pipeline_together_are_a_400_naming_the_one_left_out(setup: Setup) -> None:
    # A workflow does not retrieve, nor the RAG route run a pipeline: one of the two headers
    # used to be dropped without a word, its answer taken for one drawn on the workspace.
    messages: Any = [{"role": "user", "content": QUESTION}]
    oa = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as workflow:
        await oa.chat.completions.create(model=MODELS["openai"], messages=messages,
                                         extra_headers={**RAG, "x-pipeline": "fanout"})
    assert workflow.value.param == "x-workspace" and "Send one of" in workflow.value.message
    await oa.close()
    async with ollama.AsyncClient(host=setup.url, headers={**RAG, "x-route": "rag", "x-pipeline": "fanout"}) as ol:
        with pytest.raises(ollama.ResponseError) as rag:
            await ol.chat(model=MODELS["ollama"], messages=messages)
    assert rag.value.status_code == 400 and "`x-pipeline` has no effect on the rag route" in rag.value.error
    assert all(not fake.requests for fake in setup.fakes.values())


async def test_a_nul_in_the_question_does_not_fail_retrieval(setup: Setup) -> None:
    # PostgreSQL takes no NUL in text; a stray one in a question used to be a retryable 503.
    question = QUESTION.replace("nightly", "nightly\u0000")
    messages = [{"role": "user", "content": question}]
    async with httpx.AsyncClient(base_url=setup.url, timeout=30) as http:
        for path, body in (
            ("/v1/chat/completions", {"model": MODELS["openai"], "messages": messages}),
            ("/api/chat", {"model": MODELS["ollama"], "messages": messages, "stream": False}),
            ("/v1/messages", {"model": MODELS["anthropic"], "max_tokens": 20, "messages": messages}),
        ):
            response = await http.post(path, headers=RAG, json=body)
            assert response.status_code == 200, (path, response.text)
            assert sources_of(response.headers)[0]["source"] == "runbooks/postgres.md"
        found = await http.post(f"/v1/workspaces/{CORPUS}/search", json={"query": question})
    assert found.status_code == 200, found.text
    assert found.json()["data"][0]["source"] == "runbooks/postgres.md"
    assert "night" in found.json()["full_text_terms"]


# -- cancellation ----------------------------------------------------------------------------------


def _waiting_queries(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s", ("%rag_chunks%",)
        ).fetchall()
    return [row[0] for row in rows]


async def _poll(condition: Callable[[], bool], *, within: float) -> None:
    with trio.fail_after(within):
        while True:
            if await trio.to_thread.run_sync(condition):
                return
            await trio.sleep(0.02)


async def test_a_disconnect_during_retrieval_cancels_it(setup: Setup, corpus_url: str) -> None:
    # Hold a lock that the retrieval's search must wait for, so it is in flight on the server.
    holder = await trio.to_thread.run_sync(lambda: psycopg.connect(corpus_url))
    try:
        await trio.to_thread.run_sync(holder.execute, "LOCK TABLE rag_chunks IN ACCESS EXCLUSIVE MODE")
        async with httpx.AsyncClient(timeout=30) as http:
            async with trio.open_nursery() as nursery:
                async def ask() -> None:
                    await http.post(f"{setup.url}/v1/chat/completions", headers=RAG, json={
                        "model": MODELS["openai"], "stream": True, "messages": [{"role": "user", "content": QUESTION}]})

                nursery.start_soon(ask)
                await _poll(lambda: bool(_waiting_queries(corpus_url)), within=10)
                nursery.cancel_scope.cancel()  # the client goes away
            await _poll(lambda: not _waiting_queries(corpus_url), within=5)
        # The search was cancelled on the server while the lock was still held; the backend
        # was never called.
        assert setup.fakes["openai"].requests == []
    finally:
        await trio.to_thread.run_sync(holder.close)
    async with httpx.AsyncClient(timeout=30) as http:
        after = await http.post(f"{setup.url}/v1/chat/completions", headers=RAG, json={
            "model": MODELS["openai"], "messages": [{"role": "user", "content": QUESTION}]})
    assert after.status_code == 200 and after.headers["x-rag-context"] == "injected"


async def test_a_stalled_rag_store_is_a_503_in_the_callers_dialect(
    setup: Setup, corpus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PostgreSQL that keeps its connections open and answers nothing (a lock, a stall):
    # the chat used to wait for it for as long as it lasted, its client with no answer at all.
    monkeypatch.setattr(proxy.services.rag, "QUERY_TIMEOUT", 1.0)
    messages: Any = [{"role": "user", "content": QUESTION}]
    holder = await trio.to_thread.run_sync(lambda: psycopg.connect(corpus_url))
    try:
        await trio.to_thread.run_sync(holder.execute, "LOCK TABLE rag_chunks IN ACCESS EXCLUSIVE MODE")
        oa = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
        an = anthropic.AsyncAnthropic(base_url=setup.url, api_key="unused", max_retries=0)
        with trio.fail_after(30):
            with pytest.raises(openai.APIStatusError) as openai_error:
                await oa.chat.completions.create(model=MODELS["openai"], messages=messages, extra_headers=RAG,
                                                 stream=True)
            with pytest.raises(anthropic.APIStatusError) as anthropic_error:
                await an.messages.create(model=MODELS["anthropic"], max_tokens=10, messages=messages,
                                         extra_headers=RAG)
        await oa.close()
        await an.close()
    finally:
        await trio.to_thread.run_sync(holder.close)
    assert openai_error.value.status_code == 503
    assert openai_error.value.code == "database_unavailable" and "did not answer" in openai_error.value.message
    assert openai_error.value.response.headers["retry-after"] == "2"
    assert anthropic_error.value.status_code == 503
    assert anthropic_error.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert all(not fake.requests for fake in setup.fakes.values())


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_ollama_generate(setup: Setup, kind: str) -> None:
    async with ollama.AsyncClient(host=setup.url, headers=RAG) as client:
        reply = await client.generate(model=MODELS[kind], prompt=QUESTION, system="Answer briefly.")
    assert reply.response == "Backups are kept for 14 days [1]."
    body = setup.fakes[kind].requests[-1].json
    system = body.get("system") if kind == "ollama" and "system" in body else setup.system_text(kind)
    assert system == "Answer briefly."
    assert_backups_context(setup.question_text(kind))


async def test_a_token_count_on_the_rag_route_counts_the_passages_its_chat_would_carry(setup: Setup) -> None:
    # The count a client makes to see whether its chat fits left out the passages the chat
    # carries (hundreds of tokens per passage), with no word that it had.
    messages: Any = [{"role": "user", "content": QUESTION}]
    an = anthropic.AsyncAnthropic(base_url=setup.url, api_key="unused", max_retries=0)
    alone = await an.messages.count_tokens(model=MODELS["anthropic"], messages=messages)
    raw = await an.messages.with_raw_response.count_tokens(model=MODELS["anthropic"], messages=messages,
                                                           extra_headers=RAG)
    with_passages = await raw.parse()
    assert raw.headers["x-rag-context"] == "injected" and sources_of(raw.headers)[0]["source"] == "runbooks/postgres.md"
    assert_backups_context(setup.question_text("anthropic"))  # what was counted: the chat as it would be sent
    assert with_passages.input_tokens > alone.input_tokens + 20
    oa = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    plain = await oa.responses.input_tokens.count(model=MODELS["openai"], input=QUESTION)
    rag = await oa.responses.input_tokens.with_raw_response.count(model=MODELS["openai"], input=QUESTION,
                                                                  extra_headers=RAG)
    assert rag.headers["x-rag-context"] == "injected"
    assert rag.parse().input_tokens > plain.input_tokens + 20
    with pytest.raises(openai.NotFoundError):
        await oa.responses.input_tokens.count(model=MODELS["openai"], input=QUESTION,
                                              extra_headers={"x-workspace": "no-such-workspace"})
    await an.close()
    await oa.close()


async def test_a_raw_generate_prompt_is_refused_not_answered_without_its_passages(setup: Setup) -> None:
    # A raw prompt is the client's own template: passages put in it would break it, and
    # left out, the answer said `x-rag-context: injected` for nothing.
    async with ollama.AsyncClient(host=setup.url, headers=RAG) as client:
        for stream in (False, True):
            with pytest.raises(ollama.ResponseError) as caught:
                reply = await client.generate(model=MODELS["ollama"], prompt=f"<|user|>{QUESTION}<|assistant|>",
                                              raw=True, stream=stream)
                if stream:
                    async for _ in reply:  # type: ignore[union-attr]
                        pass
            assert caught.value.status_code == 400 and "`raw: true`" in caught.value.error
    assert setup.fakes["ollama"].requests == []


async def test_workspace_routes_answer_503_when_postgresql_goes_away(
    aio_loop: object, tmp_path: Path, nats_url: str
) -> None:
    # The first requests after the server stops meet the pool's cut connections: an outage,
    # as the later ones are told (503), never a 500.
    with EmbeddedPostgres(tmp_path / "pg") as postgres:
        async with running_gateway(
            backend("vllm", "http://127.0.0.1:9", default=True), database_url=postgres.url, nats_url=nats_url,
        ) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.put("/v1/workspaces/docs", json={})).status_code == 200
            await trio.to_thread.run_sync(postgres.stop)
            for path in ("/v1/workspaces", "/v1/workspaces/docs", "/v1/workspaces/docs/documents"):
                answer = await client.get(path)
                assert answer.status_code == 503, (path, answer.text)
                assert answer.json()["error"]["code"].startswith("database_"), path


async def test_workspaces_without_a_database_configured_are_a_503_not_worth_retrying() -> None:
    # `embedded = false` and no DATABASE_URL: no wait will bring PostgreSQL, so the SDKs must
    # not be invited to retry (Retry-After) as they are during an outage.
    async with running_gateway(backend("vllm", "http://127.0.0.1:9", default=True), embedded=False) as url, \
            httpx.AsyncClient(base_url=url, timeout=10) as client:
        answers = [
            await client.get("/v1/workspaces/docs"),
            await client.post("/v1/workspaces/docs/documents", json={"content": "# Title\n\nSome text."}),
            await client.post("/v1/chat/completions", headers={"x-workspace": "docs"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "database_not_configured"
        assert "retry-after" not in answer.headers and answer.headers["x-should-retry"] == "false"


async def test_an_exact_cache_hit_never_answers_from_documents_since_changed(pg_database_url: str) -> None:
    """The exact cache keys a RAG answer by what the workspace held: once a document is
    re-ingested with other text (or deleted), the same request is a miss answered from the
    workspace as it is now, not the answer drawn on the old text."""
    fake = OpenAIBackend(default=Script(tokens=["You get them [1]."]))
    leave = "# Leave\n\nEmployees get {} vacation days a year."
    question = [{"role": "user", "content": "How many vacation days do I get?"}]
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                    default_headers={"x-workspace": "hr", "x-cache": "exact"})

        async def ask() -> str:
            raw = await client.chat.completions.with_raw_response.create(model="m", messages=question, temperature=0)
            # A hit is the RAG answer it replays: its sources come with it, as the first time.
            if raw.headers.get("x-rag-context") == "injected":
                assert sources_of(raw.headers)[0]["source"] == "leave.md"
                assert (raw.parse().model_extra or {})["rag_sources"] == sources_of(raw.headers)
            else:
                assert raw.headers["x-rag-context"] == "none" and sources_of(raw.headers) == []
            if raw.headers["x-cache"] == "miss":  # a hit next (not attached to this run)
                await wait_for_row(pg_database_url, raw.headers["x-trace-id"], "completed")
            return raw.headers["x-cache"]

        async def ingest(days: int) -> None:
            answer = await http.post("/v1/workspaces/hr/documents", json={"source": "leave.md", "content": leave.format(days)})
            assert answer.status_code == 201, answer.text

        await ingest(25)
        assert await ask() == "miss"
        assert await ask() == "hit"
        await ingest(30)
        assert await ask() == "miss"
        assert "30 vacation days" in fake.requests[-1].json["messages"][-1]["content"]
        assert await ask() == "hit"
        (document,) = (await http.get("/v1/workspaces/hr/documents")).json()["data"]
        assert (await http.delete(f"/v1/workspaces/hr/documents/{document['id']}")).status_code == 200
        assert await ask() == "miss"
        assert fake.requests[-1].json["messages"][0] == question[0]  # nothing left to inject
        await client.close()


async def test_an_idempotent_retry_of_a_rag_request_replays_its_sources(pg_database_url: str) -> None:
    fake = OpenAIBackend(default=Script(tokens=["25 days [1]."]))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await http.post("/v1/workspaces/hr/documents",
                        json={"source": "leave.md", "content": "# Leave\n\nEmployees get 25 vacation days a year."})
        headers = {"x-workspace": "hr", "idempotency-key": "leave-question-1"}
        body = {"model": "m", "messages": [{"role": "user", "content": "How many vacation days do I get?"}]}
        first = await http.post("/v1/chat/completions", json=body, headers=headers)
        await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
        again = await http.post("/v1/chat/completions", json=body, headers=headers)
    assert again.headers["idempotent-replayed"] == "true" and len(fake.requests) == 1
    assert sources_of(again.headers) == sources_of(first.headers) != []
    assert again.headers["x-rag-context"] == "injected" and again.headers["x-rag-workspace"] == "hr"
    assert again.json()["rag_sources"] == first.json()["rag_sources"]


async def test_a_background_rag_response_read_back_says_what_it_drew_on(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # Answered `queued` before any retrieval, its client learnt nothing of its sources: not
    # on the creation, nor on the response read back.
    fake = OpenAIBackend(default=Script(tokens=["25 days [1]."]))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await http.post("/v1/workspaces/hr/documents",
                        json={"source": "leave.md", "content": "# Leave\n\nEmployees get 25 vacation days a year."})
        asking = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                    default_headers={"x-workspace": "hr"})
        created = await asking.responses.create(model="m", input="How many vacation days do I get?", background=True)
        assert created.status == "queued"
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(150):
            raw = await client.responses.with_raw_response.retrieve(created.id)
            if raw.parse().status == "completed":
                break
            await trio.sleep(0.1)
        await asking.close()
        await client.close()
    assert raw.parse().output_text == "25 days [1]."
    assert raw.headers["x-rag-context"] == "injected" and raw.headers["x-rag-workspace"] == "hr"
    assert sources_of(raw.headers)[0]["source"] == "leave.md"


@pytest.mark.parametrize("dialect", ["chat", "responses", "anthropic"])
async def test_a_request_attached_to_a_running_rag_twin_gets_its_sources(
    aio_loop: object, pg_database_url: str, nats_url: str, dialect: str
) -> None:
    """A retry that arrives while its key's RAG run is still answering (on this instance, or
    on another through NATS) reads that run's answer: its head says what sources it drew on,
    as the run's own client heard and as a replay of it would."""
    fake = OpenAIBackend(default=Script(tokens=["25 ", "days ", "a ", "year [1]."], pace=0.5))
    headers = {"x-workspace": "hr", "idempotency-key": f"leave-{dialect}-{pg_database_url[-12:]}"}
    question: Any = [{"role": "user", "content": "How many vacation days do I get?"}]
    answers: dict[str, Any] = {}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as second, httpx.AsyncClient(base_url=first, timeout=30) as http:
        await http.post("/v1/workspaces/hr/documents",
                        json={"source": "leave.md", "content": "# Leave\n\nEmployees get 25 vacation days a year."})

        async def ask(name: str, url: str, stream: bool) -> None:
            raw: Any
            client: Any
            if dialect == "anthropic":
                client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0, default_headers=headers)
                raw = await client.messages.with_raw_response.create(
                    model="m", max_tokens=64, messages=question, stream=stream
                )
            else:
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, default_headers=headers)
                if dialect == "responses":
                    raw = await client.responses.with_raw_response.create(model="m", input=question, stream=stream)
                else:
                    raw = await client.chat.completions.with_raw_response.create(model="m", messages=question, stream=stream)
            if stream:
                chunks = raw.parse()
                async for _ in await chunks if dialect == "anthropic" else chunks:  # anthropic's is async
                    pass
            elif dialect == "chat":
                answers[f"{name}-body"] = raw.parse().model_extra
            answers[name] = raw.headers
            await client.close()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "run", first, True)
                await fake.wait_requests(1)  # the run is at its backend: the others attach to it
                nursery.start_soon(ask, "here", first, False)
                nursery.start_soon(ask, "here-streamed", first, True)
                nursery.start_soon(ask, "there", second, False)
    run = answers["run"]
    assert len(fake.requests) == 1 and sources_of(run)[0]["source"] == "leave.md"
    for name in ("here", "here-streamed", "there"):
        attached = answers[name]
        assert attached["x-attached-to"] == run["x-trace-id"], name
        assert sources_of(attached) == sources_of(run), name
        assert attached["x-rag-context"] == "injected" and attached["x-rag-workspace"] == "hr", name
    for name in ("here", "there"):
        if dialect == "chat":  # OpenAI's chat clients have them in the body too
            assert answers[f"{name}-body"]["rag_sources"] == sources_of(run), name
