"""API keys end to end: the CLI, the three SDKs, scopes, revocation, expiry, the log."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import psycopg
import pytest
import trio
from psycopg.conninfo import make_conninfo

from proxy.infra.embedded import EmbeddedPostgres
from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    bearer,
    eventually,
    gateway,
    keys_cli,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]


@dataclass
class Stack:
    url: str
    db: str
    fake: OpenAIBackend


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True),
        aliases={"fast": "llama3"}, access_log=True,
    ) as url:
        yield Stack(url, pg_database_url, fake)


def chat_body(model: str = "qwen3-8b", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, **extra}


async def test_auto_mode_is_open_until_the_first_key_exists_then_closed(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200
        key = await new_key(stack.db, "first")

        async def closed() -> bool:
            return (await client.post("/v1/chat/completions", json=chat_body())).status_code == 401

        # The CLI's insert notifies the running gateway: no restart, no polling interval.
        await eventually(closed, within=2.0)
        missing = await client.post("/v1/chat/completions", json=chat_body())
        assert missing.json()["error"]["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == 'Bearer realm="llm-proxy"'
        wrong = await client.post("/v1/chat/completions", json=chat_body(), headers=bearer("sk-llmp-nope"))
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        ok = await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200  # always open


async def test_every_sdk_sends_its_key_and_parses_our_401(stack: Stack) -> None:
    key = await new_key(stack.db, "sdk")
    await wait_for_key(stack.url, key)

    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as good:
        reply = await good.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == "Hello"
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as oai:
            await bad.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
    assert oai.value.status_code == 401 and "Invalid API key" in oai.value.message

    # The Anthropic SDK sends `x-api-key`.
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=key, max_retries=0) as claude:
        message = await claude.messages.create(model="qwen3-8b", max_tokens=20, messages=MESSAGES)  # type: ignore[arg-type]
        assert message.content[0].text == "Hello"  # type: ignore[union-attr]
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as ant:
            await stranger.messages.create(model="qwen3-8b", max_tokens=20, messages=MESSAGES)  # type: ignore[arg-type]
    assert ant.value.status_code == 401 and ant.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # On the paths both APIs share, an Anthropic client is refused in Anthropic's shape too.
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key="sk-wrong", max_retries=0) as stranger:
        with pytest.raises(anthropic.AuthenticationError) as listing:
            await stranger.models.list()
    assert listing.value.body["type"] == "error"  # type: ignore[index]
    assert listing.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    # Ollama clients take headers; the key may come as a bearer token or as x-api-key.
    for headers in (bearer(key), {"x-api-key": key}):
        async with ollama.AsyncClient(host=stack.url, headers=headers) as llama:
            chat = await llama.chat(model="qwen3-8b", messages=MESSAGES, stream=False)
            assert chat.message.content == "Hello"
    async with ollama.AsyncClient(host=stack.url) as anonymous:
        with pytest.raises(ollama.ResponseError) as oll:
            await anonymous.chat(model="qwen3-8b", messages=MESSAGES, stream=False)
    assert oll.value.status_code == 401 and "Missing API key" in oll.value.error


async def test_model_scope_filters_listings_and_refuses_other_models_in_each_dialect(stack: Stack) -> None:
    key = await new_key(stack.db, "scoped", "--models", "qwen3-*", "fast")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        listed = {m["id"] for m in (await client.get("/v1/models")).json()["data"]}
        assert listed == {"fast"}  # the alias is visible by its own name; nothing else matches
        tags = {m["name"] for m in (await client.get("/api/tags")).json()["models"]}
        assert tags == {"fast"}
        assert (await client.post("/v1/chat/completions", json=chat_body("qwen3-8b"))).status_code == 200
        assert (await client.post("/v1/chat/completions", json=chat_body("fast"))).status_code == 200
        assert stack.fake.requests[-1].json["model"] == "llama3"

        refused = await client.post("/v1/chat/completions", json=chat_body("llama3"))
        assert refused.status_code == 403
        assert refused.json()["error"] == {
            "message": "This API key may not use the model `llama3`.", "type": "permission_error",
            "param": "model", "code": "model_not_allowed",
        }
        # `fast` is an alias of `llama3`: the name the client uses is what the scope names.
        anthropic_403 = await client.post("/v1/messages", json=chat_body("llama3", max_tokens=5))
        assert anthropic_403.status_code == 403 and anthropic_403.json()["error"]["type"] == "permission_error"
        count = await client.post("/v1/messages/count_tokens", json=chat_body("llama3"))
        assert count.status_code == 403 and count.json()["type"] == "error"
        for path in ("/api/chat", "/api/generate"):
            body = {"model": "llama3", "messages": MESSAGES, "prompt": "hi", "stream": False}
            ollama_403 = await client.post(path, json=body)
            assert ollama_403.status_code == 403, path
            assert ollama_403.json() == {"error": "This API key may not use the model `llama3`."}
        # `show` answers for a model the key cannot see as for one that does not exist.
        hidden = await client.post("/api/show", json={"model": "llama3"})
        assert hidden.status_code == 404 and hidden.json() == {"error": "model 'llama3' not found"}


async def test_a_scope_naming_a_model_with_or_without_latest_allows_both_spellings(stack: Stack) -> None:
    # As /api/tags lists it (`llama3.2:latest`), or as people type it (`qwen3-8b`).
    tagged = await new_key(stack.db, "tagged", "--models", "llama3.2:latest", "fake-model:latest")
    bare = await new_key(stack.db, "bare", "--models", "qwen3-8b")
    await wait_for_key(stack.url, tagged)
    await wait_for_key(stack.url, bare)
    for key, names in ((tagged, ("llama3.2:latest", "llama3.2")), (bare, ("qwen3-8b", "qwen3-8b:latest"))):
        async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as llama:
            for name in names:
                reply = await llama.chat(model=name, messages=MESSAGES, stream=False)
                assert reply.message.content == "Hello", name
                assert (await llama.show(name)).details is not None, name
            with pytest.raises(ollama.ResponseError) as other:
                await llama.chat(model="llama3.1", messages=MESSAGES, stream=False)
            assert other.value.status_code == 403
    # The backend lists `fake-model`; the key naming `fake-model:latest` sees it.
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=tagged, max_retries=0) as client:
        assert [m.id async for m in client.models.list()] == ["fake-model"]


async def test_revocation_takes_effect_at_once_on_a_running_gateway(stack: Stack) -> None:
    key = await new_key(stack.db, "doomed")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        prefix = key[:14]
        code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "revoke", prefix))
        assert code == 0 and "revoked key" in out
        started = trio.current_time()
        await eventually(lambda: _status_is(client, 401), within=2.0, every=0.01)
        assert trio.current_time() - started < 1.0
        refused = await client.get("/v1/models")
        assert refused.json()["error"]["code"] == "revoked_api_key"


async def test_a_key_made_elsewhere_is_known_at_its_first_request_before_its_notice(stack: Stack) -> None:
    """Several instances on one database: a key one of them makes (`POST /v1/keys`) and the
    client uses at once may reach another before that one's notice of it (PostgreSQL's
    NOTIFY, a moment later): it was a 401 `invalid_api_key` until the notice or the 5 s poll
    came. Made here with no notice at all (its notifying trigger off for the session)."""
    await wait_for_key(stack.url, await new_key(stack.db, "first"))
    unnoticed = make_conninfo(stack.db, options="-c session_replication_role=replica")
    key = await new_key(unnoticed, "made-elsewhere")
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        answer = await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key))
        assert answer.status_code == 200, answer.text
        # A key nobody made is refused as ever.
        forged = await client.get("/v1/models", headers=bearer(key[:-6] + "AAAAAA"))
        assert (forged.status_code, forged.json()["error"]["code"]) == (401, "invalid_api_key")


async def _status_is(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/v1/models")).status_code == status


async def test_an_expired_key_is_refused_without_any_database_change(stack: Stack) -> None:
    key = await new_key(stack.db, "brief")
    await sql(stack.db, "UPDATE api_keys SET expires_at = now() + interval '1.5 seconds'")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        # The expiry is checked against the clock at every request; no reload needed.
        expired = await eventually(lambda: _status_is(client, 401), within=4.0)
        assert expired
        assert (await client.get("/v1/models")).json()["error"]["code"] == "expired_api_key"


async def test_keys_cli_lists_scopes_and_usage_and_revokes_by_id_or_prefix(stack: Stack) -> None:
    key = await new_key(stack.db, "ci-bot", "--models", "qwen3-*", "--workspaces", "docs", "--rpm", "100",
                        "--tpm", "5000", "--expires", "30d")
    assert key.startswith("sk-llmp-") and len(key) == 51
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200

    async def listed() -> dict[str, object] | None:
        code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "list", "--json"))
        assert code == 0
        entry: dict[str, object] = json.loads(out.splitlines()[0])
        return entry if entry["requests"] == 3 else None

    entry = await eventually(listed)
    assert entry["name"] == "ci-bot" and entry["status"] == "active"
    assert (entry["models"], entry["workspaces"], entry["rpm"], entry["tpm"]) == (["qwen3-*"], ["docs"], 100, 5000)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (15, 3)
    assert key not in json.dumps(entry) and entry["prefix"] == key[:16]

    code, table, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "list"))
    assert code == 0 and "ci-bot" in table and key not in table and "active" in table

    code, _, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "revoke", "sk-"))
    assert code == 1 and "at least 6" in err
    code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "revoke", str(entry["id"])))
    assert code == 0
    code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "list", "--json"))
    assert json.loads(out)["status"] == "revoked"

    code, _, err = await trio.to_thread.run_sync(
        lambda: keys_cli(stack.db, "create", "--name", "x", "--expires", "2001-01-01")
    )
    assert code == 2 and "not in the future" in err
    code, _, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "create", "--name", "x", "--rpm", "0"))
    assert code == 2 and "--rpm" in err


async def test_the_request_log_names_the_key_and_never_contains_it(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    key = await new_key(stack.db, "logged")
    caplog.set_level(logging.DEBUG)
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        ok = await client.post("/v1/chat/completions", json=chat_body(), headers={"x-api-key": key})
        assert ok.status_code == 200
        await client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key + "x"))
        await client.post("/v1/messages", json=chat_body(max_tokens=5), headers={"x-api-key": key[:-1]})

    def request_lines() -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.name == REQUEST_LOGGER]

    async def all_logged() -> bool:  # a line is written as its exchange ends, maybe after the response
        sources = [getattr(r, "source", None) for r in request_lines()]
        return sources.count("refused") >= 2 and len(sources) > sources.count("refused")

    await eventually(all_logged)
    lines = request_lines()
    served = [r for r in lines if getattr(r, "source", None) != "refused"]
    refused = [r for r in lines if getattr(r, "source", None) == "refused"]
    assert served and all(getattr(r, "api_key_id", None) is not None for r in served)
    # The two bad keys were turned away: logged, with no key to name.
    assert [(getattr(r, "status", None), getattr(r, "api_key_id", 0)) for r in refused] == [(401, None), (401, None)]
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert key not in everything and key[:-1] not in everything and key[16:30] not in everything


async def test_required_mode_needs_a_key_even_before_any_exists_and_off_mode_never(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Hi"]))
    async with fake.serve() as server:
        async with gateway(pg_database_url, nats_url, backend("b", server.url, default=True), auth="required") as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/v1/models")).status_code == 401
        await new_key(pg_database_url, "exists")
        async with gateway(pg_database_url, nats_url, backend("b", server.url, default=True), auth="off") as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.post("/v1/chat/completions", json=chat_body())).status_code == 200


async def test_keys_cannot_be_verified_while_the_database_has_never_answered(aio_loop: object, nats_url: str) -> None:
    # Fail closed: a gateway that cannot know whether keys exist does not serve as if none did.
    fake = OpenAIBackend(default=Script(tokens=["Hi"]))
    unreachable = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1"
    async with fake.serve() as server, gateway(unreachable, nats_url, backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/v1/chat/completions", json=chat_body())
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "auth_unavailable"
            assert answer.headers["retry-after"] == "5"
            assert (await client.get("/health")).status_code == 200


def test_keys_commands_leave_a_running_gateways_embedded_database_running(tmp_path: Path) -> None:
    # `serve` runs the embedded PostgreSQL on its data directory; `keys` adopts it, and must
    # not stop it on the way out (that would take the gateway's database away).
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")}
    with EmbeddedPostgres(tmp_path / "pgdata") as server:
        assert server.url is not None
        created = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "create", "--name", "cli", "--data-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert created.returncode == 0, created.stderr
        assert created.stdout.startswith("sk-llmp-") and "cannot be shown again" in created.stderr
        with psycopg.connect(server.url) as conn:  # still up
            assert conn.execute("SELECT name FROM api_keys").fetchall() == [("cli",)]
        listed = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "list", "--data-dir", str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert listed.returncode == 0 and "cli" in listed.stdout
        assert created.stdout.strip() not in listed.stdout
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_a_workspace_a_key_may_not_use_is_refused_naming_where_it_was_named(stack: Stack) -> None:
    """The 403 names `x-workspace` as the culprit only when that header named the workspace:
    one named in the URL's path is not a header the client could fix."""
    key = await new_key(stack.db, "docs-only", "--workspaces", "docs")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        in_path = await client.get("/v1/workspaces/secrets/documents/8d0c5b8e-2f5a-4a38-9a8e-0e6a1c1b9f00")
        in_header = await client.post("/v1/chat/completions", json=chat_body(), headers={"x-workspace": "secrets"})
    assert in_path.status_code == 403 and in_header.status_code == 403
    assert in_path.json()["error"]["code"] == in_header.json()["error"]["code"] == "workspace_not_allowed"
    assert in_path.json()["error"]["param"] is None and "`secrets`" in in_path.json()["error"]["message"]
    assert in_header.json()["error"]["param"] == "x-workspace"


async def test_guessed_keys_ask_the_database_a_bounded_number_of_times(stack: Stack) -> None:
    """A key not known here makes the key ring ask the database again before its 401 (a key
    made on another instance a moment ago); a client guessing keys as fast as it can had it
    read the keys table back to back, one query after another for as long as it kept going.
    Reloads for unknown keys are spaced out, so guessing costs the database a few reads a
    second, however many guesses come."""
    await wait_for_key(stack.url, await new_key(stack.db, "first"))

    async def reads() -> int:
        found = await sql(stack.db, "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
                                    " WHERE relname = 'api_keys'")
        return int(found[0][0])

    await trio.sleep(2.5)  # PostgreSQL publishes a session's counts within a second of its last statement
    before = await reads()
    guesses = 0
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:

        async def guess(n: int) -> None:
            nonlocal guesses
            with trio.move_on_after(2.0):
                while True:
                    answer = await client.get("/v1/models", headers=bearer(f"sk-llmp-guess{n}-{guesses}"))
                    assert answer.status_code == 401
                    guesses += 1

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(guess, n)
    await trio.sleep(2.5)
    read = await reads() - before
    assert guesses >= 8
    # Two seconds of guessing: a handful of reloads (and the ring's own 5 s poll), not one per guess.
    assert read <= 30, (read, guesses)
