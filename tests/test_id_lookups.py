"""Ids a client sends that no store could hold (a NUL: PostgreSQL's text has none; a NATS
wildcard) are "not found" in the resource's own words, and such a field a 400, never a 5xx
(a 503 tells the client to retry an outage that is not there). On a gateway with its journal (PostgreSQL, NATS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.migrations import migrate
from proxy.infra.postgres import InvalidValue, open_database
from proxy.infra.resources import Resources
from proxy.services.persistence import Persistence, PersistenceSettings
from tests.fakes import Usage
from tests.test_auth_helpers import MESSAGES, Stack, bearer, keyed_stack, new_key, wait_for_key
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with keyed_stack(pg_database_url, nats_url, Usage(5, 1)) as started:
        yield started


NOT_FOUND = "Response with id '{}' not found"
# (method, path, body, status, what the error says, its param)
CASES: list[tuple[str, str, Any, int, str, str]] = [
    ("GET", "/v1/responses/resp_%00", None, 404, NOT_FOUND.format("resp_\x00"), "response_id"),
    ("GET", "/v1/responses/resp_a%00b?stream=true", None, 404, NOT_FOUND.format("resp_a\x00b"), "response_id"),
    ("GET", "/v1/responses/resp_%00/input_items", None, 404, NOT_FOUND.format("resp_\x00"), "response_id"),
    ("DELETE", "/v1/responses/resp_%00", None, 404, NOT_FOUND.format("resp_\x00"), "response_id"),
    ("POST", "/v1/responses/resp_%00/cancel", None, 404, NOT_FOUND.format("resp_\x00"), "response_id"),
    ("GET", "/v1/streams/abc%00", None, 404, "No stream `abc\x00` is known here.", "trace_id"),
    ("POST", "/v1/responses", {"model": "m", "input": "hi", "previous_response_id": "resp_\x00"}, 400,
     "Previous response with id 'resp_\x00' not found", "previous_response_id"),
    ("POST", "/v1/responses", {"model": "m", "input": [{"type": "item_reference", "id": "msg_a\x00b_0"}]}, 404,
     "Item with id 'msg_a\x00b_0' not found.", "input[0]"),
    ("GET", "/v1/keys/%00", None, 404, "No API key with id `\x00`.", "id"),
    ("GET", "/v1/conversations/conv_%00", None, 404, "Conversation with id 'conv_\x00' not found.", "conversation_id"),
    # A body field: before, a 500 (PostgreSQL was asked whether such a text search language exists).
    ("PUT", "/v1/workspaces/ws1", {"language": "\x00"}, 400, "Invalid `language` '\\x00'", "language"),
]


async def test_ids_holding_a_nul_are_not_found_in_every_api(stack: Stack) -> None:
    # Before, each was a 503 `journal_unavailable` with `Retry-After`: psycopg refuses to send
    # a NUL, and the refusal read as the database being down.
    key = await new_key(stack.db, "root", "--admin")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=20) as client:
        for method, path, body, status, says, param in CASES:
            answer = await client.request(method, path, json=body)
            error = answer.json()["error"]
            assert (answer.status_code, error["param"]) == (status, param), (path, body, answer.text)
            assert says in error["message"], (path, answer.text)
            assert "retry-after" not in answer.headers


async def test_a_stream_id_is_never_a_nats_wildcard(stack: Stack) -> None:
    # `evt.chat.*` is every trace's events: no id the gateway makes reads them all.
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        chat = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert chat.status_code == 200
        await wait_for_row(stack.db, chat.headers["x-trace-id"], "completed")
        for trace in ("*", ">", "a.b"):
            with trio.fail_after(5):
                answer = await client.get(f"/v1/streams/{trace}")
            assert answer.status_code == 404, (trace, answer.text[:300])
            assert answer.json()["error"]["message"] == f"No stream `{trace}` is known here."
        with trio.fail_after(5):
            answer = await client.get("/v1/responses/resp_*")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "response_not_found"


async def test_a_journal_read_of_a_value_postgresql_cannot_hold_is_the_requests_fault(
    aio_loop: object, pg_database_url: str,
) -> None:
    # What a lookup that no route checked gets: a 400, not the 503 of an outage.
    async with open_database(pg_database_url) as db:
        await migrate(db)
        resources = Resources(pg_database_url, None)
        resources.database = db
        persistence = Persistence(resources, PersistenceSettings())
        with pytest.raises(GatewayError) as refused:
            await persistence.journal_read(lambda store: store.stored_run("a\x00b"), "the row of a NUL")
        assert refused.value.kind is ErrorKind.INVALID_REQUEST and refused.value.code == "invalid_value"
        assert refused.value.retry_after is None
        assert isinstance(refused.value.__cause__, InvalidValue)


async def test_an_unknown_id_is_not_found_at_once_on_a_gateway_alone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each waited (1 s, 2 s) for a row another gateway process might be writing: with none
    # alive, and the run not this one's, nothing is on its way.
    monkeypatch.setattr("proxy.services.persistence._YOUNG_ROW_SECONDS", 60.0)
    monkeypatch.setattr("proxy.services.persistence._UNSEEN_WAIT", 60.0)
    monkeypatch.setattr("proxy.http._stored_completions._ELSEWHERE_SECONDS", 60.0)
    unknown = "0123456789abcdef0123456789abcdef"
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        with trio.fail_after(10):
            for path in (f"/v1/responses/resp_{unknown}", f"/v1/responses/resp_{unknown}/input_items",
                         f"/v1/streams/{unknown}", f"/v1/chat/completions/chatcmpl-{unknown}"):
                answer = await client.get(path)
                assert answer.status_code == 404, (path, answer.text)
        # Made here and stored: found as before.
        chat = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
        made = chat.json()["id"]
        assert (await client.get(f"/v1/responses/{made}")).status_code == 200


async def test_an_unknown_id_is_waited_for_only_while_the_process_that_made_it_is_alive(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An id begins with the tag of the process that made it (as that process's instance id
    # does): while that process is alive, its run's row may be on its way, and is waited for.
    monkeypatch.setattr("proxy.services.persistence._YOUNG_ROW_SECONDS", 0.5)
    monkeypatch.setattr("proxy.services.persistence._UNSEEN_WAIT", 0.5)
    async with open_database(stack.db) as db:
        await db.execute("INSERT INTO gateway_instances (id) VALUES ('fedcba98' || '00000000')")
    theirs, nobodys = "fedcba9876543210fedcba9876543210", "0badc0de76543210fedcba9876543210"
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        for path in (f"/v1/responses/resp_{theirs}", f"/v1/streams/{theirs}"):
            started = trio.current_time()
            answer = await client.get(path)
            assert answer.status_code == 404 and trio.current_time() - started >= 0.5, path
        monkeypatch.setattr("proxy.services.persistence._YOUNG_ROW_SECONDS", 60.0)
        monkeypatch.setattr("proxy.services.persistence._UNSEEN_WAIT", 60.0)
        with trio.fail_after(10):  # made by no process alive, or of a shape no gateway makes
            for path in (f"/v1/responses/resp_{nobodys}", f"/v1/streams/{nobodys}", "/v1/responses/resp_foo",
                         "/v1/streams/foo"):
                answer = await client.get(path)
                assert answer.status_code == 404, (path, answer.text)
