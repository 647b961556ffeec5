"""The semantic cache, called directly, on real PostgreSQL + pgvector and the real model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai as openai_sdk
import psycopg
import pytest
import trio
import trio_asyncio

import proxy.services.semantic_cache
from proxy.config import SemanticCacheSettings
from proxy.dialects import openai
from proxy.dialects.responses import parse_responses_request
from proxy.domain.chat import ChatCompletion, ChatRequest, Choice, FinishReason, ToolCall, Usage
from proxy.domain.routing import BackendRoute, Router
from proxy.infra.embedder import LocalEmbedder
from proxy.infra.migrations import migrate
from proxy.infra.postgres import Database, open_database
from proxy.infra.rag_store import RagStore
from proxy.services.chat import RequestMeta
from proxy.services.semantic_cache import SemanticCache, conversation_key
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

MODEL = "qwen3-8b"


@pytest.fixture
async def db(aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str) -> AsyncIterator[Database]:
    async with open_database(pg_database_url) as database:
        await migrate(database)
        yield database


def cache(db: Database | None, embedder: LocalEmbedder, **settings: Any) -> SemanticCache:
    return SemanticCache(SemanticCacheSettings(**{"models": (MODEL,), **settings}), lambda: db, embedder)


def chat(*turns: tuple[str, str], model: str = MODEL, **params: Any) -> ChatRequest:
    body = {"model": model, "messages": [{"role": role, "content": text} for role, text in turns], **params}
    return openai.parse_chat_request(json.dumps(body).encode())


def ask(question: str, **params: Any) -> ChatRequest:
    return chat(("user", question), **params)


def meta(cache_header: str | None = None, workspace: str | None = None, tenant: str | None = None) -> RequestMeta:
    return RequestMeta(trace_id="t", request_id="r", cache=cache_header, workspace=workspace,
                       route="rag" if workspace else "direct", tenant=tenant)


def answer(text: str, reason: FinishReason | None = FinishReason.STOP) -> ChatCompletion:
    return ChatCompletion(id="chatcmpl-1", model=MODEL, created=1,
                          choices=[Choice(content=text, finish_reason=reason)], usage=Usage(12, 3))


async def test_identical_and_equivalent_questions_hit(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder)
    question = ask("How do I reset my password?")
    assert await semantic.lookup(question, meta()) is None
    await semantic.store(question, meta(), answer("Use the Forgot password link."))

    hit = await semantic.lookup(ask("How do I reset my password?"), meta())
    assert hit is not None and hit.completion.choices[0].content == "Use the Forgot password link."
    assert hit.completion.usage is not None and hit.completion.usage.prompt_tokens == 12
    reworded = await semantic.lookup(ask("How can I reset my password?"), meta())
    assert reworded is not None and reworded.completion.choices[0].content == "Use the Forgot password link."
    assert await db.fetchval("SELECT hits FROM semantic_cache") == 2
    assert await semantic.lookup(ask("How do I delete my account?"), meta()) is None


async def test_an_answer_holding_a_nul_is_stored_and_served(db: Database, embedder: LocalEmbedder) -> None:
    # PostgreSQL's jsonb refuses U+0000: a model that wrote one must not make its answer unstorable.
    semantic = cache(db, embedder)
    question = ask("What separates C strings?")
    await semantic.store(question, meta(), answer("A \x00 byte."))
    hit = await semantic.lookup(ask("What separates C strings?"), meta())
    assert hit is not None and hit.completion.choices[0].content == "A \ufffd byte."


async def test_conversations_sharing_the_last_message_but_not_the_history_miss(
    db: Database, embedder: LocalEmbedder
) -> None:
    semantic = cache(db, embedder)
    japan = chat(("user", "I'm planning a trip to Japan in spring."), ("assistant", "Great, how can I help?"),
                 ("user", "What should I pack?"))
    await semantic.store(japan, meta(), answer("Light layers and an umbrella."))

    iceland = chat(("user", "I'm planning a trip to Iceland in winter."), ("assistant", "Great, how can I help?"),
                   ("user", "What should I pack?"))
    assert await semantic.lookup(iceland, meta()) is None
    assert await semantic.lookup(ask("What should I pack?"), meta()) is None
    other_reply = chat(("user", "I'm planning a trip to Japan in spring."), ("assistant", "Sorry, I can't help."),
                       ("user", "What should I pack?"))
    assert await semantic.lookup(other_reply, meta()) is None
    roles_swapped = chat(("system", "I'm planning a trip to Japan in spring."), ("assistant", "Great, how can I help?"),
                         ("user", "What should I pack?"))
    assert await semantic.lookup(roles_swapped, meta()) is None

    again = chat(("user", "I'm planning a trip to Japan in spring."), ("assistant", "Great, how can I help?"),
                 ("user", "What should I pack?"))
    hit = await semantic.lookup(again, meta())
    assert hit is not None and hit.completion.choices[0].content == "Light layers and an umbrella."


async def test_model_parameters_and_workspace_are_exact_keys(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder, models=(MODEL, "llama3.2"))
    question = "What is the capital of France?"
    await semantic.store(ask(question, temperature=0), meta(), answer("Paris"))
    assert await semantic.lookup(ask(question, temperature=0), meta()) is not None
    assert await semantic.lookup(ask(question, model="llama3.2", temperature=0), meta()) is None
    assert await semantic.lookup(ask(question, temperature=0.7), meta()) is None
    assert await semantic.lookup(ask(question, temperature=0, max_tokens=5), meta()) is None
    assert await semantic.lookup(ask(question, temperature=0, stop=["\n"]), meta()) is None
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert await semantic.lookup(ask(question, temperature=0, tools=tools), meta()) is None

    await semantic.store(ask(question), meta(workspace="travel"), answer("Paris [1]"))
    assert await semantic.lookup(ask(question), meta(workspace="geography")) is None
    assert await semantic.lookup(ask(question), meta()) is None
    in_workspace = await semantic.lookup(ask(question), meta(workspace="travel"))
    assert in_workspace is not None and in_workspace.completion.choices[0].content == "Paris [1]"


async def test_the_end_user_is_not_a_key(db: Database, embedder: LocalEmbedder) -> None:
    """`user` and `safety_identifier` name who asks (for abuse detection), not what: another
    end user's question is answered from the cache as theirs is."""
    semantic = cache(db, embedder)
    question = "How do I reset my password?"
    await semantic.store(ask(question, user="u-1"), meta(), answer("Use the Forgot password link."))
    assert await semantic.lookup(ask(question, user="u-2"), meta()) is not None
    assert await semantic.lookup(ask(question, safety_identifier="u-2"), meta()) is not None


def test_a_messages_own_fields_are_exact_keys() -> None:
    """DeepSeek's `prefix: true` makes the last assistant message a prefix to continue: not
    the same request as that message without it."""

    def scope(**fields: Any) -> str:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a haiku"},
                                             {"role": "assistant", "content": "Autumn", **fields}]}
        request = openai.parse_chat_request(json.dumps(body).encode())
        return conversation_key(request, model=MODEL, workspace=None, revision=None).scope

    assert scope() == scope()
    assert scope(prefix=True) != scope()


async def test_an_answer_with_parallel_tool_calls_is_not_one_for_a_request_that_forbids_them(
    db: Database, embedder: LocalEmbedder
) -> None:
    """A Responses client's `parallel_tool_calls: false` asks for one call a turn: an answer
    that made two is not its answer (its request carries no dialect extras saying so)."""
    semantic = cache(db, embedder)
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]

    def responses(**fields: Any) -> ChatRequest:
        body = {"model": MODEL, "input": "Look up the weather in Paris and in Rome", "tools": tools, **fields}
        return parse_responses_request(json.dumps(body).encode()).chat

    calls = [ToolCall("call_1", "lookup", '{"city": "Paris"}'), ToolCall("call_2", "lookup", '{"city": "Rome"}')]
    both = ChatCompletion(id="chatcmpl-1", model=MODEL, created=1,
                          choices=[Choice(tool_calls=calls, finish_reason=FinishReason.TOOL_CALLS)])
    await semantic.store(responses(), meta(), both)
    assert await semantic.lookup(responses(), meta()) is not None
    assert await semantic.lookup(responses(parallel_tool_calls=False), meta()) is None


async def test_a_changed_workspace_makes_its_entries_stale(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder)
    await db.execute("INSERT INTO rag_workspaces (name) VALUES ('docs')")
    question = ask("How many vacation days do I get?")
    await semantic.store(question, meta(workspace="docs"), answer("25 days [1]"))
    assert await semantic.lookup(question, meta(workspace="docs")) is not None
    await db.execute("UPDATE rag_workspaces SET revision = revision + 1 WHERE name = 'docs'")
    assert await semantic.lookup(question, meta(workspace="docs")) is None


async def test_an_answer_from_a_deleted_workspace_is_not_one_from_its_namesake(
    db: Database, embedder: LocalEmbedder
) -> None:
    """A question asked as its workspace is deleted stores its answer after the deletion
    cleared the workspace's entries; the workspace made again under that name (its revisions
    counted from 0 again) must not be answered with the old documents' answer."""
    semantic, store = cache(db, embedder), RagStore(db)
    await store.ensure_workspace("docs")
    question = ask("How many vacation days do I get?")
    asking = RequestMeta(trace_id="asked-during-delete", request_id="r", workspace="docs", route="rag")
    assert await semantic.lookup(question, asking) is None  # then retrieval, the backend...
    assert await store.delete_workspace("docs")
    await store.ensure_workspace("docs")
    await semantic.store(question, asking, answer("30 days [1]"))  # from the deleted documents
    assert await semantic.lookup(question, meta(workspace="docs")) is None


async def test_changed_workspace_settings_make_its_entries_stale(db: Database, embedder: LocalEmbedder) -> None:
    # A PUT of top_k or score_threshold changes which passages an answer would be given.
    semantic, store = cache(db, embedder), RagStore(db)
    await store.configure_workspace("docs", {"top_k": 3}, language=None)
    question = ask("How many vacation days do I get?")
    await semantic.store(question, meta(workspace="docs"), answer("25 days [1][2][3]"))
    await store.configure_workspace("docs", {"top_k": 3}, language=None)  # the same: still valid
    assert await semantic.lookup(question, meta(workspace="docs")) is not None
    await store.configure_workspace("docs", {"top_k": 1}, language=None)
    assert await semantic.lookup(question, meta(workspace="docs")) is None
    await semantic.store(question, meta(workspace="docs"), answer("25 days [1]"))
    await store.configure_workspace("docs", {"score_threshold": 0.9}, language=None)
    assert await semantic.lookup(question, meta(workspace="docs")) is None
    # The answer to that miss was retrieved with these settings; changed before it is stored,
    # it must not count as the new settings' answer.
    await store.configure_workspace("docs", {"top_k": 2}, language=None)
    await semantic.store(question, meta(workspace="docs"), answer("25 days [1]"))
    assert await semantic.lookup(question, meta(workspace="docs")) is None


async def test_expired_entries_miss_and_are_purged(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder, ttl_seconds=0.3)
    await semantic.store(ask("What is the tallest mountain?"), meta(), answer("Everest"))
    assert await semantic.lookup(ask("What is the tallest mountain?"), meta()) is not None
    await trio.sleep(0.5)
    assert await semantic.lookup(ask("What is the tallest mountain?"), meta()) is None
    await semantic.store(ask("What is the longest river?"), meta(), answer("The Nile"))
    assert await db.fetchval("SELECT count(*) FROM semantic_cache") == 1


async def test_numbers_and_negations_must_match_literally(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder)
    for question, reply in (("What is 2+2?", "4"), ("Is it safe to take ibuprofen with alcohol?", "It is risky."),
                            ("Summarize the meeting on March 3", "...")):
        await semantic.store(ask(question), meta(), answer(reply))
    assert await semantic.lookup(ask("What is 2+3?"), meta()) is None
    assert await semantic.lookup(ask("Is it not safe to take ibuprofen with alcohol?"), meta()) is None
    assert await semantic.lookup(ask("Summarize the meeting on March 4"), meta()) is None
    assert await semantic.lookup(ask("what is 2+2?"), meta()) is not None


async def test_text_the_model_cannot_read_must_match_literally(db: Database, embedder: LocalEmbedder) -> None:
    # The model reads a Thai or Amharic word, or an emoji, as [UNK]: every such question
    # embedded as every other, and a question about tom yum was answered about Bangkok.
    semantic = cache(db, embedder)
    bangkok = "กรุงเทพมหานครเป็นเมืองหลวงของประเทศอะไร"  # Bangkok is the capital of which country?
    await semantic.store(ask(bangkok), meta(), answer("Thailand."))
    await semantic.store(ask("I would like a 🍕"), meta(), answer("Here is a pizza place."))
    await semantic.store(ask("ሰላም እንዴት ነህ"), meta(), answer("I am fine."))  # Amharic: hello, how are you?
    assert await semantic.lookup(ask("วิธีทำต้มยำกุ้งให้อร่อยต้องใช้อะไรบ้าง"), meta()) is None  # how to make tom yum?
    assert await semantic.lookup(ask("🐍🐍"), meta()) is None
    assert await semantic.lookup(ask("I would like a 🐍"), meta()) is None
    assert await semantic.lookup(ask("ቡና የት ነው ያለው"), meta()) is None  # Amharic: where is the coffee?
    hit = await semantic.lookup(ask(bangkok), meta())
    assert hit is not None and hit.completion.choices[0].content == "Thailand."
    assert await semantic.lookup(ask("I'd like a 🍕"), meta()) is not None  # the rest is still by meaning


async def test_long_conversations_that_differ_late_miss(db: Database, embedder: LocalEmbedder) -> None:
    # The model reads 256 tokens: one embedding of the whole text would not see the end.
    preamble = "Here is the background of the project. " * 60
    semantic = cache(db, embedder)
    await semantic.store(ask(preamble + "Now write the summary in English."), meta(), answer("Summary."))
    assert await semantic.lookup(ask(preamble + "Now write the summary in English."), meta()) is not None
    assert await semantic.lookup(ask(preamble + "Now translate the whole thing into Korean."), meta()) is None
    key = conversation_key(ask(preamble + "x"), model=MODEL, workspace=None, revision=None)
    assert len(key.segments) > 1


async def test_opt_in_and_opt_out(db: Database, embedder: LocalEmbedder) -> None:
    question = ask("What is the capital of Italy?", model="other-model")
    per_model = cache(db, embedder)  # only MODEL is opted in
    await per_model.store(question, meta(), answer("Rome"))
    assert await db.fetchval("SELECT count(*) FROM semantic_cache") == 0
    await per_model.store(question, meta("semantic"), answer("Rome"))
    assert await per_model.lookup(question, meta()) is None
    assert await per_model.lookup(question, meta("semantic")) is not None

    everything = cache(db, embedder, enabled=True, models=())
    assert await everything.lookup(question, meta()) is not None
    for header in ("off", "no-cache", "exact"):
        assert await everything.lookup(question, meta(header)) is None


async def test_listed_models_match_their_aliases_targets_and_latest_names(db: Database, embedder: LocalEmbedder) -> None:
    router = Router([BackendRoute("oa", prefixes=("gpt-",), default=True), BackendRoute("ol", prefixes=("llama",))],
                    aliases={"myllama": "llama3.2", "gpt-alias": "gpt-4o-mini"})
    settings = SemanticCacheSettings(models=("llama3.2", "gpt-alias"))
    semantic = SemanticCache(settings, lambda: db, embedder, router)
    for model in ("llama3.2", "llama3.2:latest", "myllama", "gpt-alias", "gpt-4o-mini"):
        assert semantic.enabled_for(ask("Hi", model=model), meta()), model
    for model in ("gpt-4o", "llama3.1", "other-alias"):
        assert not semantic.enabled_for(ask("Hi", model=model), meta()), model
    # One model under two of its names shares its answers.
    await semantic.store(ask("Which river is the longest?", model="myllama"), meta(), answer("The Nile"))
    hit = await semantic.lookup(ask("Which river is the longest?", model="llama3.2:latest"), meta())
    assert hit is not None and hit.completion.choices[0].content == "The Nile"


async def test_incomplete_answers_are_not_stored_and_outages_are_misses(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder)
    await semantic.store(ask("Tell me a story"), meta(), answer("Once upon", reason=None))
    await semantic.store(ask("Tell me a story"), meta(), answer("[filtered]", reason=FinishReason.CONTENT_FILTER))
    assert await db.fetchval("SELECT count(*) FROM semantic_cache") == 0

    down = cache(None, embedder)
    assert await down.lookup(ask("Tell me a story"), meta()) is None
    await down.store(ask("Tell me a story"), meta(), answer("Once upon a time."))


async def test_one_keys_answers_are_never_anothers(db: Database, embedder: LocalEmbedder) -> None:
    semantic = cache(db, embedder)
    question = ask("What did our Q3 board memo conclude?")
    await semantic.store(question, meta(tenant="key-1"), answer("Key 1's confidential summary."))
    assert await semantic.lookup(question, meta(tenant="key-1")) is not None
    assert await semantic.lookup(question, meta(tenant="key-2")) is None
    assert await semantic.lookup(question, meta()) is None


async def test_a_stalled_database_is_a_miss_not_a_wait(
    pg_database_url: str, embedder: LocalEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PostgreSQL that keeps its connections open and answers nothing (a lock, a stall): the
    # chat asking the cache used to wait for it for as long as it lasted, never answered.
    monkeypatch.setattr(proxy.services.semantic_cache, "LOOKUP_TIMEOUT", 1.0)
    fake = OpenAIBackend(default=Script(tokens=["Paris."]))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url
    ) as url:
        client = openai_sdk.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                        default_headers={"x-cache": "semantic"})
        holder = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_database_url))
        try:
            await trio.to_thread.run_sync(holder.execute, "LOCK TABLE semantic_cache IN ACCESS EXCLUSIVE MODE")
            with trio.fail_after(30):
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}])
        finally:
            await trio.to_thread.run_sync(holder.close)
        await client.close()
    assert raw.parse().choices[0].message.content == "Paris."
    assert raw.headers.get("x-cache") != "semantic" and len(fake.requests) == 1


async def test_a_hit_is_an_answer_of_its_own_id_and_time(pg_database_url: str, embedder: LocalEmbedder) -> None:
    # A hit answers a request of its own (its own trace id, log line, charge): it reused the
    # first answer's id and `created`, so what counts answers by id (a gateway in front, the
    # client's logs or tracing) took it for the first one again.
    fake = OpenAIBackend(default=Script(tokens=["Paris."]))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), backend("claude", server.url, prefixes=("claude",)),
        database_url=pg_database_url,
    ) as url:
        oa = openai_sdk.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                    default_headers={"x-cache": "semantic"})
        an = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0,
                                      default_headers={"x-cache": "semantic"})

        def entries() -> int:
            with psycopg.connect(pg_database_url) as conn:
                return conn.execute("SELECT count(*) FROM semantic_cache").fetchone()[0]  # type: ignore[index,no-any-return]

        async def stored(count: int) -> None:
            for _ in range(200):  # stored once its client has the answer
                if await trio.to_thread.run_sync(entries) >= count:
                    return
                await trio.sleep(0.05)
            raise AssertionError("the answer was not stored")

        missed = await oa.chat.completions.with_raw_response.create(model=MODEL, messages=question)  # type: ignore[arg-type]
        assert missed.headers["x-cache"] == "miss"  # asked, looked up, not found
        first = missed.parse()
        await stored(1)
        await trio.sleep(1.1)  # a second later: `created` tells them apart too
        raw = await oa.chat.completions.with_raw_response.create(model=MODEL, messages=question)  # type: ignore[arg-type]
        hit = raw.parse()
        assert raw.headers["x-cache"] == "semantic" and hit.choices[0].message.content == "Paris."
        assert hit.id.startswith("chatcmpl-") and hit.id != first.id and hit.created > first.created
        chunks = [chunk async for chunk in await oa.chat.completions.create(
            model=MODEL, messages=question, stream=True)]  # type: ignore[arg-type]
        assert {chunk.id for chunk in chunks} not in ({first.id}, {hit.id}) and len({c.id for c in chunks}) == 1

        message = await an.messages.create(model="claude-x", max_tokens=64, messages=question)  # type: ignore[arg-type]
        await stored(2)
        again = await an.messages.with_raw_response.create(model="claude-x", max_tokens=64, messages=question)  # type: ignore[arg-type]
        assert again.headers["x-cache"] == "semantic"
        replayed = await again.parse()
        assert replayed.id.startswith("msg_") and replayed.id != message.id
        await oa.close()
        await an.close()
    assert len(fake.requests) == 2


async def test_a_retry_with_its_idempotency_key_replays_the_hit_it_was_given(
    pg_database_url: str, embedder: LocalEmbedder,
) -> None:
    # A hit's id and `created` are fresh for each lookup: a retry with the key looked the cache
    # up again and got another answer id (a client or gateway deduplicating by id kept both).
    # A replay of the key's run no longer takes the cache's entry for its own either: a
    # Response answered from it read back as a 404.
    fake = OpenAIBackend(default=Script(tokens=["Paris."]))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url,
    ) as url:
        oa = openai_sdk.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                    default_headers={"x-cache": "semantic"})
        await oa.chat.completions.create(model=MODEL, messages=question)  # type: ignore[arg-type]
        for _ in range(200):  # stored once its client has the answer
            with psycopg.connect(pg_database_url) as conn:
                if conn.execute("SELECT count(*) FROM semantic_cache").fetchone()[0]:  # type: ignore[index]
                    break
            await trio.sleep(0.05)
        for stream in (False, True):
            key = {"idempotency-key": f"retry-{stream}"}
            ids = set()
            for attempt in range(3):
                if stream:
                    chunks = [chunk async for chunk in await oa.chat.completions.create(
                        model=MODEL, messages=question, stream=True, extra_headers=key)]  # type: ignore[arg-type]
                    ids.add((chunks[0].id, chunks[0].created))
                else:
                    raw = await oa.chat.completions.with_raw_response.create(
                        model=MODEL, messages=question, extra_headers=key)  # type: ignore[arg-type]
                    assert attempt or raw.headers["x-cache"] == "semantic"  # the first is the cache's
                    ids.add((raw.parse().id, raw.parse().created))
                await trio.sleep(0.6)  # its run's row written: a retry replays it
            assert len(ids) == 1, ids
        response = await oa.responses.create(model=MODEL, input="What is the capital of France?")
        assert (await oa.responses.retrieve(response.id)).output_text == "Paris."
        await oa.close()
    assert len(fake.requests) == 1
