"""The admin API for keys (`/v1/keys`) end to end: real PostgreSQL, the gateway as served, keys
made over HTTP used by the openai SDK, changes applied by another gateway on the database."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import psycopg
import pytest
import trio

import proxy.http._keys
import proxy.services.limits
from proxy.cli import build_parser
from proxy.keys_command import run as run_keys
from tests.fakes import Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    Stack,
    bearer,
    eventually,
    gateway,
    keyed_stack,
    keys_cli,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]

CHAT = {"model": "qwen3-8b", "messages": MESSAGES}


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with keyed_stack(pg_database_url, nats_url, Usage(5, 1)) as started:
        yield started


async def admin_client(stack: Stack) -> httpx.AsyncClient:
    key = await new_key(stack.db, "root", "--admin")
    await wait_for_key(stack.url, key)
    return httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10)


async def cli_records(db: str) -> dict[int, dict[str, Any]]:
    code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(db, "list", "--json"))
    assert code == 0, err
    return {entry["id"]: entry for entry in map(json.loads, out.splitlines())}


async def test_the_first_key_comes_from_the_cli_not_from_an_open_gateway(stack: Stack) -> None:
    # No key exists: the gateway asks none, so it cannot tell an admin from anyone who reaches
    # it (loopback included: a local reverse proxy makes every client loopback).
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as anyone:
        refused = await anyone.post("/v1/keys", json={"name": "mine", "admin": True})
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "admin_key_required" and error["type"] == "permission_error"
        assert "llm-proxy keys create" in error["message"]
        assert (await anyone.get("/v1/keys")).status_code == 403
        assert await sql(stack.db, "SELECT id FROM api_keys") == []
    # With `auth = "off"` no key is ever asked: the API stays shut even once keys exist.
    await new_key(stack.db, "root", "--admin")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True), auth="off") as url, \
            httpx.AsyncClient(base_url=url, timeout=10) as anyone:
        refused = await anyone.post("/v1/keys", json={"name": "mine"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert '"off"' in refused.json()["error"]["message"]
    assert len(await sql(stack.db, "SELECT id FROM api_keys")) == 1


async def test_a_key_created_over_http_works_at_once_and_matches_keys_list(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with await admin_client(stack) as admin:
        created = await admin.post("/v1/keys", json={
            "name": "ci-bot", "models": ["qwen3-*"], "workspaces": ["docs"], "rpm": 100, "tpm": 50000, "expires": "30d",
        })
        assert created.status_code == 201, created.text
        assert created.headers["cache-control"] == "no-store"
        assert created.headers["location"] == f"/v1/keys/{created.json()['id']}"
        record = created.json()
        secret = record.pop("key")
        assert secret.startswith("sk-llmp-") and record["prefix"] == secret[:16]
        assert record["object"] == "api_key" and record["status"] == "active" and record["admin"] is False
        assert (record["models"], record["workspaces"], record["rpm"], record["tpm"]) == (["qwen3-*"], ["docs"], 100, 50000)

        # Both surfaces say the same, field for field.
        record.pop("object")
        assert (await cli_records(stack.db))[record["id"]] == record

        # No waiting: the gateway that created it knows it before answering.
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=secret, max_retries=0) as client:
            reply = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
            assert reply.choices[0].message.content == "Hello"
            with pytest.raises(openai.PermissionDeniedError) as outside:
                await client.chat.completions.create(model="llama3", messages=MESSAGES)  # type: ignore[arg-type]
            assert outside.value.code == "model_not_allowed"

        # The log says who made it (an audit trail), never the key.
        made = [r.getMessage() for r in caplog.records if " created by key " in r.getMessage()]
        assert len(made) == 1
        assert made[0].startswith(f"API key {record['id']} ({record['prefix']}...) 'ci-bot' created by key 1 (sk-llmp-")
        # ... and what the key may do: an auditor sees every grant without the database.
        assert made[0].split(" 'root': ")[1].startswith(
            "models qwen3-*; workspaces docs; 100 requests/min; 50000 tokens/min; expires 20")
        assert all(secret not in r.getMessage() for r in caplog.records)

        admin_made = await admin.post("/v1/keys", json={"name": "ops", "admin": True})
        assert admin_made.status_code == 201 and admin_made.json()["admin"] is True
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(admin_made.json()["key"])) as ops:
            assert (await ops.get("/v1/keys")).status_code == 200
            assert (await ops.patch(f"/v1/keys/{record['id']}", json={"models": None, "rpm": None})).status_code == 200
        logged = [r.getMessage() for r in caplog.records if r.name == "llm_proxy.auth" and "by key" in r.getMessage()]
        assert " 'ops' created by key 1 " in logged[-2]
        assert logged[-2].endswith(" 'root': models *; workspaces *; admin")
        assert " 'ci-bot' changed (models, rpm) by key " in logged[-1]
        assert logged[-1].split("'ops': ")[1].startswith("models *; workspaces docs; 50000 tokens/min; expires 20")


async def test_listings_and_records_never_show_a_key(stack: Stack) -> None:
    async with await admin_client(stack) as admin:
        secret = (await admin.post("/v1/keys", json={"name": "shown"})).json()["key"]
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(secret)) as user:
            assert (await user.post("/v1/chat/completions", json=CHAT)).status_code == 200

        listing = await admin.get("/v1/keys")
        assert listing.status_code == 200
        body = listing.json()
        assert body["object"] == "list" and [k["name"] for k in body["data"]] == ["root", "shown"]
        shown = body["data"][1]
        assert secret not in listing.text and "key" not in shown and "digest" not in shown

        async def counted() -> dict[str, Any] | None:
            record: dict[str, Any] = (await admin.get(f"/v1/keys/{shown['id']}")).json()
            return record if record["requests"] == 1 else None

        one = await eventually(counted)  # usage is written in batches
        assert secret not in json.dumps(one) and one["name"] == "shown"
        assert (one["prompt_tokens"], one["completion_tokens"]) == (5, 1)

        for missing in ("999", "abc", "1" * 40, "\u00b2", "\u0661"):  # `²` and Arabic-Indic 1 are no ids
            answer = await admin.get(f"/v1/keys/{missing}")
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "key_not_found"


async def test_patched_limits_are_enforced_at_once_by_another_gateway(stack: Stack) -> None:
    async with await admin_client(stack) as admin, gateway(
        stack.db, stack.nats, backend("vllm", stack.server_url, default=True)
    ) as other_url:
        made = (await admin.post("/v1/keys", json={"name": "limited"})).json()
        await wait_for_key(other_url, made["key"])
        async with httpx.AsyncClient(base_url=other_url, headers=bearer(made["key"]), timeout=10) as user:
            for _ in range(3):
                assert (await user.post("/v1/chat/completions", json=CHAT)).status_code == 200

            patched = await admin.patch(f"/v1/keys/{made['id']}", json={"rpm": 2, "name": "throttled"})
            assert patched.status_code == 200, patched.text
            assert (patched.json()["rpm"], patched.json()["name"]) == (2, "throttled")

            async def throttled() -> httpx.Response | None:
                answer = await user.post("/v1/chat/completions", json=CHAT)
                return answer if answer.status_code == 429 else None

            refused = await eventually(throttled, within=3.0)
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert refused.headers["x-ratelimit-limit-requests"] == "2"

            # null lifts the limit again; fields left out are unchanged.
            lifted = await admin.patch(f"/v1/keys/{made['id']}", json={"rpm": None})
            assert (lifted.json()["rpm"], lifted.json()["name"]) == (None, "throttled")

            async def free() -> bool:
                return (await user.post("/v1/chat/completions", json=CHAT)).status_code == 200

            await eventually(free, within=3.0)
        assert (await cli_records(stack.db))[made["id"]]["name"] == "throttled"


async def test_a_budget_given_over_http_is_enforced_and_lifted(stack: Stack) -> None:
    """Each chat uses 6 tokens (5 + 1): a budget of 10 admits two, then OpenAI's 429
    `insufficient_quota`; the record shows the period's count; null lifts the budget."""
    async with await admin_client(stack) as admin:
        made = (await admin.post("/v1/keys", json={"name": "team", "budget": 10, "budget_period": "7d"})).json()
        assert (made["budget"], made["budget_period"], made["budget_used"]) == (10, "7d", 0)
        assert made == {**(await cli_records(stack.db))[made["id"]], "object": "api_key", "key": made["key"]}
        await wait_for_key(stack.url, made["key"])
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(made["key"]), timeout=10) as user:

            async def spent() -> httpx.Response | None:
                answer = await user.post("/v1/chat/completions", json=CHAT)
                return answer if answer.status_code == 429 else None

            refused = await eventually(spent, within=5.0)
            assert refused.json()["error"]["code"] == "insufficient_quota"
            record = (await admin.get(f"/v1/keys/{made['id']}")).json()
            assert record["budget_used"] >= 10 and record["budget_resets_at"] is not None

            lifted = await admin.patch(f"/v1/keys/{made['id']}", json={"budget": None})
            assert lifted.status_code == 200 and lifted.json()["budget"] is None, lifted.text

            async def free() -> bool:
                return (await user.post("/v1/chat/completions", json=CHAT)).status_code == 200

            await eventually(free, within=3.0)


async def test_a_key_revoked_over_http_is_refused_on_its_next_request_everywhere(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with await admin_client(stack) as admin, gateway(
        stack.db, stack.nats, backend("vllm", stack.server_url, default=True)
    ) as other_url:
        made = (await admin.post("/v1/keys", json={"name": "doomed"})).json()
        await wait_for_key(other_url, made["key"])
        here = httpx.AsyncClient(base_url=stack.url, headers=bearer(made["key"]), timeout=10)
        there = httpx.AsyncClient(base_url=other_url, headers=bearer(made["key"]), timeout=10)
        async with here, there:
            assert (await there.get("/v1/models")).status_code == 200

            revoked = await admin.delete(f"/v1/keys/{made['id']}")
            assert revoked.status_code == 200
            assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
            again = await admin.delete(f"/v1/keys/{made['id']}")  # idempotent: the same record
            assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
            # The audit trail names who revoked it, once; a repeat says it changed nothing.
            said = [r.getMessage() for r in caplog.records if "'doomed' revoked" in r.getMessage()]
            assert len(said) == 2 and " 'doomed' revoked by key 1 " in said[0]
            assert f" 'doomed' revoked again (revoked since {revoked.json()['revoked_at']}) by key 1 " in said[1]

            refused = await here.get("/v1/models")  # the gateway that revoked it: at once
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "revoked_api_key"

            async def refused_there() -> bool:
                return (await there.get("/v1/models")).status_code == 401

            await eventually(refused_there, within=2.0, every=0.01)
            assert (await there.get("/v1/models")).json()["error"]["code"] == "revoked_api_key"

        assert (await admin.delete("/v1/keys/999")).status_code == 404
        assert (await cli_records(stack.db))[made["id"]]["status"] == "revoked"


async def test_only_admin_keys_may_manage_keys(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with await admin_client(stack) as admin:
        made = (await admin.post("/v1/keys", json={"name": "plain"})).json()
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(made["key"]), timeout=10) as plain:
        for method, path, body in (
            ("POST", "/v1/keys", {"name": "escalate", "admin": True}),
            ("GET", "/v1/keys", None),
            ("GET", f"/v1/keys/{made['id']}", None),
            ("PATCH", f"/v1/keys/{made['id']}", {"models": None}),
            ("DELETE", "/v1/keys/1", None),
        ):
            refused = await plain.request(method, path, json=body)
            assert refused.status_code == 403, (method, path)
            assert refused.json() == {"error": {
                "message": "Managing API keys needs an admin key (`llm-proxy keys create --admin`).",
                "type": "permission_error", "param": None, "code": "admin_key_required",
            }}
    # The operator hears of it (once: a caller may loop), never the key.
    tried = [r for r in caplog.records if r.name == "llm_proxy.auth" and r.levelno == logging.WARNING]
    assert [r.getMessage() for r in tried] == [
        f"API key {made['id']} ({made['prefix']}...) 'plain' refused POST /v1/keys: not an admin key allowed to manage keys"
    ]
    assert all(made["key"] not in r.getMessage() for r in caplog.records)
    # An admin key limited to some workspaces or models could grant more than it may use.
    scoped = await new_key(stack.db, "team-a admin", "--admin", "--workspaces", "team-a*")
    await wait_for_key(stack.url, scoped)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(scoped), timeout=10) as team_admin:
        refused = await team_admin.post("/v1/keys", json={"name": "everything"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert "not limited to some models or workspaces" in refused.json()["error"]["message"]
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as anonymous:
        missing = await anonymous.get("/v1/keys")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"].startswith("Bearer")
    records = await cli_records(stack.db)
    assert [r["name"] for r in records.values()] == ["root", "plain", "team-a admin"]
    assert records[1]["status"] == "active"


async def test_bad_input_is_a_400_naming_the_field(stack: Stack) -> None:
    creations: list[tuple[dict[str, Any], str]] = [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x\u0000"}, "name"),
        ({"name": "ops\u001b[2J\u001b[H"}, "name"),  # would clear the operator's terminal in `keys list`
        ({"name": "team-a\nteam-b"}, "name"),
        ({"name": "\u202eevil"}, "name"),  # a right-to-left override disguises one name as another
        ({"name": "x", "models": ["gpt-4o\u001b[8m"]}, "models[0]"),
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": "x", "rpm": "10"}, "rpm"),
        ({"name": "x", "tpm": 2**40}, "tpm"),
        ({"name": "x", "models": "gpt-4o"}, "models"),
        ({"name": "x", "models": []}, "models"),
        ({"name": "x", "models": [f"m{i}-*" for i in range(1001)]}, "models"),  # every gateway compiles them
        ({"name": "x", "workspaces": ["docs", 3]}, "workspaces[1]"),
        ({"name": "x", "expires": "soon"}, "expires"),
        ({"name": "x", "expires": "2001-01-01"}, "expires"),
        ({"name": "x", "expires": "99999999999d"}, "expires"),
        ({"name": "x", "expires_at": "9999-12-31T23:00:00-05:00"}, "expires_at"),
        ({"name": "x", "admin": "yes"}, "admin"),
        ({"name": "x", "budget": 0}, "budget"),
        ({"name": "x", "budget": 2**63}, "budget"),
        ({"name": "x", "budget": 100, "budget_period": "monthly"}, "budget_period"),
        ({"name": "x", "budget": 100, "budget_period": "909045912652 D"}, "budget_period"),  # was a 500
        ({"name": "x", "colour": "red"}, "colour"),
    ]
    async with await admin_client(stack) as admin:
        for body, param in creations:
            answer = await admin.post("/v1/keys", json=body)
            assert answer.status_code == 400, (body, answer.text)
            error = answer.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
            assert param.split("[")[0] in error["message"]
        root = (await admin.get("/v1/keys")).json()["data"][0]
        for body, param in (({"admin": False}, "admin"), ({"id": 7}, "id"), ({"name": None}, "name"),
                            ({"tpm": -1}, "tpm"), ({"expires": "1h", "expires_at": "2h"}, "expires_at"),
                            ({"budget_period": 30}, "budget_period")):
            answer = await admin.patch(f"/v1/keys/{root['id']}", json=body)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
        not_json = await admin.post("/v1/keys", content=b"{name", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
        assert (await admin.get(f"/v1/keys/{root['id']}")).json() == root  # nothing changed
    assert len(await sql(stack.db, "SELECT id FROM api_keys")) == 1
    many = [f"m{i}-*" for i in range(1001)]
    code, _, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "create", "--name", "x", "--models", *many))
    assert code == 2 and "at most 1000 model patterns" in err


async def test_the_openapi_document_describes_the_keys_api(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/v1/keys"]) == {"get", "post"}
    assert set(paths["/v1/keys/{key_id}"]) == {"get", "patch", "delete"}
    created = paths["/v1/keys"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert "key" in created["required"]
    assert "key" not in paths["/v1/keys"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "properties"]["data"]["items"]["properties"]
    # What the routes refuse, the document says: names and patterns without control characters,
    # at most 1000 patterns, a null period.
    body = paths["/v1/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for schema in (body["name"], body["models"]["items"]):
        assert re.search(schema["pattern"], "team-a é") and not re.search(schema["pattern"], "ops\u001b[2J")
    assert body["models"]["maxItems"] == 1000 and "null" in body["budget_period"]["type"]
    period = body["budget_period"]["pattern"]
    assert re.search(period, "30d") and re.search(period, " 4W ") and not re.search(period, "0d")  # a 400


async def test_an_admin_page_on_an_allowed_origin_may_change_a_key(stack: Stack) -> None:
    # A browser sends PATCH only once the preflight's Access-Control-Allow-Methods names it
    # (PATCH is not a "simple" method, and the match is case-sensitive).
    page = "http://localhost:5173"  # among the default cors_origins
    async with await admin_client(stack) as admin:
        made = (await admin.post("/v1/keys", json={"name": "ci"})).json()
        preflight = await admin.options(f"/v1/keys/{made['id']}", headers={
            "origin": page, "access-control-request-method": "PATCH",
            "access-control-request-headers": "authorization, content-type",
        })
        assert preflight.status_code == 204
        assert "PATCH" in [m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")]
        changed = await admin.patch(f"/v1/keys/{made['id']}", json={"rpm": 10}, headers={"origin": page})
        assert changed.status_code == 200 and changed.json()["rpm"] == 10
        assert changed.headers["access-control-allow-origin"] == page


async def test_keys_list_stays_one_line_per_key_whatever_the_names(stack: Stack) -> None:
    async with await admin_client(stack) as admin:
        assert (await admin.post("/v1/keys", json={"name": "  ci-bot \n"})).json()["name"] == "ci-bot"  # trimmed
        long = (await admin.post("/v1/keys", json={"name": "n" * 200, "models": ["m" * 200]})).json()
    code, _, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "create", "--name", "red\x1b[31m"))
    assert code == 2 and "control character" in err
    # Rows written before names were checked (or by SQL) are shown escaped, never interpreted.
    await sql(stack.db, "UPDATE api_keys SET name = %s WHERE name = 'ci-bot'", "ops\x1b[2J\nroot\u202e")
    code, table, _ = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "list"))
    assert code == 0
    lines = table.splitlines()
    assert len(lines) == 1 + 3  # the header, root, the two keys
    assert "\x1b" not in table and "\u202e" not in table
    assert "ops\\x1b[2J\\nroot\\u202e" in table
    assert max(map(len, lines)) < 250  # a 200-character name and pattern are cut short (--json has them)
    row = next(line for line in lines if line.startswith(f"{long['id']} "))
    assert "n" * 29 + "..." in row and "n" * 33 not in row
    assert (await cli_records(stack.db))[long["id"]]["name"] == "n" * 200


async def test_a_scope_of_star_is_no_scope(stack: Stack) -> None:
    # `*` matches every model and workspace: a key given it is a key without a scope, one that
    # may list workspaces or, an admin key, manage keys (as `keys update --models '*'` has it).
    async with await admin_client(stack) as admin:
        made = await admin.post("/v1/keys", json={"name": "ops", "admin": True, "models": ["*"], "workspaces": [" * "]})
        assert made.status_code == 201
        assert (made.json()["models"], made.json()["workspaces"]) == (None, None)
        changed = await admin.patch(f"/v1/keys/{made.json()['id']}", json={"workspaces": ["docs", "*"]})
        assert changed.json()["workspaces"] is None
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(made.json()["key"]), timeout=10) as ops:
        assert (await ops.get("/v1/keys")).status_code == 200
        assert (await ops.get("/v1/workspaces")).status_code == 200
    await new_key(stack.db, "cli-ops", "--admin", "--models", "*", "--workspaces", "*")
    assert next(r for r in (await cli_records(stack.db)).values() if r["name"] == "cli-ops")["models"] is None
    # A key stored with `*` before (or by SQL) is unscoped too.
    old = await new_key(stack.db, "old-ops", "--admin", "--models", "qwen3-*")
    await wait_for_key(stack.url, old)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(old), timeout=10) as ops:
        assert (await ops.get("/v1/keys")).status_code == 403
        await sql(stack.db, "UPDATE api_keys SET models = '{*}' WHERE name = 'old-ops'")

        async def manages() -> bool:
            return (await ops.get("/v1/keys")).status_code == 200

        assert await eventually(manages, within=8.0)


async def test_a_record_read_can_be_sent_back_changed(stack: Stack) -> None:
    # Read, modify, write: a tool PATCHes the settable fields of the record it read. A key
    # without a budget shows `budget_period: null`; sent back, that is the default period.
    settable = ("name", "models", "workspaces", "rpm", "tpm", "budget", "budget_period", "expires_at")
    async with await admin_client(stack) as admin:
        made = (await admin.post("/v1/keys", json={"name": "ci", "rpm": 10, "expires": "30d"})).json()
        record = (await admin.get(f"/v1/keys/{made['id']}")).json()
        assert record["budget_period"] is None
        sent = {field: record[field] for field in settable} | {"rpm": 20}
        changed = await admin.patch(f"/v1/keys/{made['id']}", json=sent)
        assert changed.status_code == 200, changed.text
        assert changed.json()["rpm"] == 20 and changed.json()["budget"] is None
        budgeted = await admin.patch(f"/v1/keys/{made['id']}", json={"budget": 1000})
        assert budgeted.json()["budget_period"] == "30d"


async def test_an_admin_key_past_its_budget_or_rate_may_still_revoke_a_key(stack: Stack) -> None:
    # Its limits meter model calls; an operator revoking a leaked key must not wait for a reset.
    admin_key = await new_key(stack.db, "root", "--admin", "--budget", "5", "--rpm", "1")
    leaked = await new_key(stack.db, "leaked")
    await wait_for_key(stack.url, admin_key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(admin_key), timeout=10) as admin:
        assert (await admin.post("/v1/chat/completions", json=CHAT)).status_code == 200  # 6 tokens of 5; rpm spent

        async def spent() -> bool:
            return (await admin.post("/v1/chat/completions", json=CHAT)).status_code == 429

        assert await eventually(spent)
        leaked_id = (await sql(stack.db, "SELECT id FROM api_keys WHERE name = 'leaked'"))[0][0]
        revoked = await admin.delete(f"/v1/keys/{leaked_id}")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
        assert (await admin.patch(f"/v1/keys/{leaked_id}", json={"name": "leaked (revoked)"})).status_code == 200
        assert (await admin.post("/v1/keys", json={"name": "replacement"})).status_code == 201
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(leaked), timeout=10) as thief:
        assert (await thief.get("/v1/models")).json()["error"]["code"] == "revoked_api_key"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_keys_list_on_a_narrow_terminal_keeps_one_line_per_key(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    await new_key(stack.db, "team-a", "--budget", "5000000", "--models", "qwen3-*", "--expires", "30d")
    await new_key(stack.db, "ops", "--admin")

    def listed(columns: int, out: io.StringIO) -> tuple[int, str, str]:
        monkeypatch.setenv("COLUMNS", str(columns))  # as shutil.get_terminal_size reads it first
        err = io.StringIO()
        code = run_keys(build_parser().parse_args(["keys", "list"]), stack.db, out, err)
        return code, out.getvalue(), err.getvalue()

    code, table, said = await trio.to_thread.run_sync(lambda: listed(100, _Terminal()))
    assert code == 0
    lines = table.splitlines()
    assert len(lines) == 3 and all(len(line) <= 100 for line in lines), table
    header = lines[0].split()
    for kept in ("ID", "NAME", "STATUS", "BUDGET", "RESETS", "MODELS"):  # MODELS, narrow, fits again
        assert kept in header
    assert "5000000/30d" in lines[1] and "team-a" in lines[1] and "active" in lines[1]
    assert "LAST USED" in said and "--json" in said
    # A pipe (a script, `grep`) still gets every column, and nothing on stderr.
    code, table, said = await trio.to_thread.run_sync(lambda: listed(100, io.StringIO()))
    assert code == 0 and "LAST USED" in table.splitlines()[0] and said == ""


async def test_the_key_list_comes_a_page_at_a_time(stack: Stack) -> None:
    """OpenAI's list pagination: 20 keys a page unless `limit` says otherwise, the next page
    `after` the last id while `has_more` (the whole table, with every key's usage, came in
    one answer whatever its size); bad values are a 400 naming the parameter."""
    async with await admin_client(stack) as admin:
        for i in range(24):
            assert (await admin.post("/v1/keys", json={"name": f"team-{i:02}", "budget": 100})).status_code == 201
        first = (await admin.get("/v1/keys")).json()
        assert first["object"] == "list" and len(first["data"]) == 20 and first["has_more"] is True
        ids = [record["id"] for record in first["data"]]
        assert ids == sorted(ids) and (first["first_id"], first["last_id"]) == (ids[0], ids[-1])
        assert first["data"][1]["budget_used"] == 0 and first["data"][1]["budget_reserved"] == 0
        rest = (await admin.get("/v1/keys", params={"after": first["last_id"]})).json()
        assert [record["name"] for record in rest["data"]] == [f"team-{i:02}" for i in range(19, 24)]
        assert rest["has_more"] is False and rest["last_id"] == rest["data"][-1]["id"]
        small = (await admin.get("/v1/keys", params={"limit": 2, "after": ids[0]})).json()
        assert [record["id"] for record in small["data"]] == ids[1:3] and small["has_more"] is True
        empty = (await admin.get("/v1/keys", params={"after": rest["last_id"]})).json()
        assert (empty["data"], empty["has_more"], empty["first_id"], empty["last_id"]) == ([], False, None, None)
        for name, value in (("limit", "0"), ("limit", "101"), ("limit", "x"), ("after", "-1")):
            answer = await admin.get("/v1/keys", params={name: value})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == name
    async with httpx.AsyncClient(base_url=stack.url) as client:
        listed = (await client.get("/openapi.json")).json()["paths"]["/v1/keys"]["get"]
    assert {parameter["name"] for parameter in listed["parameters"]} == {"limit", "after"}
    assert {"has_more", "first_id", "last_id"} <= set(listed["responses"]["200"]["content"]["application/json"]["schema"]["required"])


async def test_the_last_key_able_to_manage_keys_cannot_be_revoked_or_limited(stack: Stack) -> None:
    """Revoking or scoping (models, workspaces) the last unrestricted admin key over HTTP left no key able
    to use the API (only the CLI on the database host could recover): it is a 400 naming the
    key, and nothing changes. With another such key, an admin may revoke its own; two admins
    revoking each other at once cannot both succeed."""
    await new_key(stack.db, "scoped admin", "--admin", "--models", "qwen*")  # no manager: scoped
    async with await admin_client(stack) as root:
        [(root_id,)] = await sql(stack.db, "SELECT id FROM api_keys WHERE name = 'root'")
        for method, body, field in (
            ("DELETE", None, "id"),
            ("PATCH", {"models": ["qwen*"]}, "models"),
            ("PATCH", {"workspaces": ["docs"]}, "workspaces"),
        ):
            refused = await root.request(method, f"/v1/keys/{root_id}", json=body)
            assert refused.status_code == 400, (body, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "last_admin_key" and error["param"] == field, error
            assert f"API key {root_id} (" in error["message"] and "'root'" in error["message"]
        record = (await root.get(f"/v1/keys/{root_id}")).json()  # unchanged, and still in charge
        assert (record["status"], record["models"], record["workspaces"], record["expires_at"]) == ("active", None, None, None)
        assert (await root.patch(f"/v1/keys/{root_id}", json={"name": "root (renamed)", "rpm": 100})).status_code == 200

        deputy = (await root.post("/v1/keys", json={"name": "deputy", "admin": True})).json()
        assert (await root.delete(f"/v1/keys/{root_id}")).status_code == 200  # itself: the deputy remains
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(deputy["key"]), timeout=10) as second:
        assert (await second.delete(f"/v1/keys/{deputy['id']}")).json()["error"]["code"] == "last_admin_key"
        third = (await second.post("/v1/keys", json={"name": "third", "admin": True})).json()
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(third["key"]), timeout=10) as other:
            answers: dict[str, int] = {}

            async def revoke(client: httpx.AsyncClient, key_id: int, who: str) -> None:
                answers[who] = (await client.delete(f"/v1/keys/{key_id}")).status_code

            async with trio.open_nursery() as nursery:
                nursery.start_soon(revoke, second, third["id"], "deputy")
                nursery.start_soon(revoke, other, deputy["id"], "third")
    assert sorted(answers.values()) == [200, 400], answers
    [(left,)] = await sql(stack.db, "SELECT count(*) FROM api_keys WHERE admin AND models IS NULL AND revoked_at IS NULL")
    assert left == 1


async def test_a_stalled_or_locked_database_is_a_503_within_bounds_that_changes_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key's row locked by another writer (or PostgreSQL stalled): creating, changing,
    # revoking or listing keys waited for it for as long as it lasted.
    monkeypatch.setattr(proxy.http._keys, "DATABASE_WAIT", 1.0)
    async with await admin_client(stack) as admin:
        other = (await admin.post("/v1/keys", json={"name": "other", "rpm": 60})).json()

        async def refused_while_locked(lock: str, *requests: tuple[str, str, dict[str, Any] | None]) -> None:
            holder = await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))
            try:
                await trio.to_thread.run_sync(holder.execute, lock)
                for method, path, body in requests:
                    with trio.fail_after(20):
                        answer = await admin.request(method, path, json=body)
                    assert answer.status_code == 503, (method, path, answer.text)
                    assert answer.json()["error"]["code"] == "database_unavailable", answer.text
                    assert answer.headers["retry-after"] == "2"
            finally:
                await trio.to_thread.run_sync(holder.close)

        # Reads go on under EXCLUSIVE: the writes wait.
        await refused_while_locked(
            "LOCK TABLE api_keys IN EXCLUSIVE MODE",
            ("POST", "/v1/keys", {"name": "late"}),
            ("PATCH", f"/v1/keys/{other['id']}", {"rpm": 5}),
            ("DELETE", f"/v1/keys/{other['id']}", None),
        )
        await refused_while_locked(
            "LOCK TABLE api_key_usage IN ACCESS EXCLUSIVE MODE",
            ("GET", "/v1/keys", None),
            ("GET", f"/v1/keys/{other['id']}", None),
        )
        # A key made just before its record could be read is answered all the same: a 503
        # would leave a key made that nobody holds.
        with contextlib.closing(await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))) as holder:
            await trio.to_thread.run_sync(holder.execute, "LOCK TABLE api_key_usage IN ACCESS EXCLUSIVE MODE")
            with trio.fail_after(20):
                made = await admin.post("/v1/keys", json={"name": "made", "budget": 1000})
        assert made.status_code == 201, made.text
        assert made.json()["key"].startswith("sk-llmp-") and made.json()["requests"] == 0
        assert made.json()["budget_used"] == 0 and made.json()["budget_resets_at"] is not None
        await wait_for_key(stack.url, made.json()["key"])
        # Nothing refused was done; sent again, each is.
        names = {record["name"]: record for record in (await admin.get("/v1/keys")).json()["data"]}
        assert set(names) == {"root", "other", "made"}
        assert names["other"]["status"] == "active" and names["other"]["rpm"] == 60
        assert (await admin.patch(f"/v1/keys/{other['id']}", json={"rpm": 5})).json()["rpm"] == 5
        assert (await admin.delete(f"/v1/keys/{other['id']}")).json()["status"] == "revoked"


async def test_a_change_made_just_before_postgresql_stalls_is_answered_as_made(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PATCH and DELETE committed their change, then read the key's use under a second deadline:
    # PostgreSQL stalling in between answered 503 "try again" for a change that was made.
    monkeypatch.setattr(proxy.http._keys, "DATABASE_WAIT", 1.0)
    async with await admin_client(stack) as admin:
        other = (await admin.post("/v1/keys", json={"name": "other", "rpm": 60, "budget": 1000})).json()
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other["key"], max_retries=0) as client:
            await client.chat.completions.create(**CHAT)
        # The change touches only `api_keys`: the lock stalls what is read after it commits.
        with contextlib.closing(await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))) as holder:
            await trio.to_thread.run_sync(holder.execute, "LOCK TABLE api_key_usage IN ACCESS EXCLUSIVE MODE")
            with trio.fail_after(20):
                changed = await admin.patch(f"/v1/keys/{other['id']}", json={"name": "renamed", "rpm": 5})
                revoked = await admin.delete(f"/v1/keys/{other['id']}")
        assert changed.status_code == 200, changed.text
        record = changed.json()
        assert (record["id"], record["name"], record["rpm"], record["status"]) == (other["id"], "renamed", 5, "active")
        assert record["requests"] is None and record["prompt_tokens"] is None  # not read: not said to be 0
        assert record["budget"] == 1000 and record["budget_used"] is None
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
        assert revoked.json()["name"] == "renamed" and revoked.json()["requests"] is None
        # Both changes were made, and this gateway applied them: the key is refused at once.
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other["key"], max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                await client.chat.completions.create(**CHAT)
        after = (await admin.get(f"/v1/keys/{other['id']}")).json()
        assert (after["name"], after["rpm"], after["status"]) == ("renamed", 5, "revoked") and after["requests"] is not None


@pytest.fixture
async def folding_stack(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Stack]:
    """`stack` whose usage writer folds old hours into days at each write, not once an hour."""
    monkeypatch.setattr(proxy.services.limits, "_ROLLUP_EVERY", 0.0)
    async with keyed_stack(pg_database_url, nats_url, Usage(5, 1)) as started:
        yield started


async def test_a_keys_old_hours_of_usage_become_days_its_totals_unchanged(folding_stack: Stack) -> None:
    # `api_key_usage` kept a row per key and hour it was used, for ever: a busy key's year was
    # 8760 rows. Hours of the days before yesterday (UTC) are now one row per day.
    stack = folding_stack
    async with await admin_client(stack) as admin:
        made = (await admin.post("/v1/keys", json={"name": "user", "budget": 100000})).json()
        key_id, secret = made["id"], made["key"]
        hours = [(5, 0), (5, 3), (5, 13), (5, 23), (3, 7), (1, 5)]  # (days ago, hour UTC)
        for days, hour in hours:
            await sql(
                stack.db,
                "INSERT INTO api_key_usage (key_id, hour, requests, errors, prompt_tokens, completion_tokens, last_used_at)"
                " SELECT %s, at, 2, 1, 10, 3, at + interval '10 minutes' FROM (SELECT date_trunc('day', now() AT TIME ZONE"
                " 'UTC') AT TIME ZONE 'UTC' - make_interval(days => %s, hours => -%s) AS at) t",
                key_id, days, hour,
            )
        before = (await admin.get(f"/v1/keys/{key_id}")).json()
        assert (before["requests"], before["errors"], before["prompt_tokens"]) == (12, 6, 60)
        async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=secret, max_retries=0) as client:
            await client.chat.completions.create(**CHAT)

        def day(days: int, hour: int = 0) -> str:
            return f"date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - make_interval(days => {days}, hours => -{hour})"

        async def folded() -> list[tuple[Any, ...]]:
            found = await sql(
                stack.db,
                f"SELECT CASE hour WHEN {day(5)} THEN 'day-5' WHEN {day(3)} THEN 'day-3' WHEN {day(1, 5)} THEN 'hour-1d5h'"
                " WHEN date_trunc('hour', now()) THEN 'now' ELSE hour::text END, requests, errors, prompt_tokens,"
                " completion_tokens, last_used_at = " + day(5, 23) + " + interval '10 minutes'"
                " FROM api_key_usage u WHERE key_id = %s ORDER BY u.hour",
                key_id,
            )
            return found if len(found) == 4 else []

        rows = await eventually(folded, within=10)
        assert rows == [
            ("day-5", 8, 4, 40, 12, True),  # four hours in one row, their last use kept
            ("day-3", 2, 1, 10, 3, False),
            ("hour-1d5h", 2, 1, 10, 3, False),  # yesterday's hours stay hours
            ("now", 1, 0, 5, 1, False),
        ]
        after = (await admin.get(f"/v1/keys/{key_id}")).json()
        # The totals the key's record and `keys list` show, and its budget, are what they were.
        assert (after["requests"], after["errors"], after["prompt_tokens"], after["completion_tokens"]) == (13, 6, 65, 19)
        assert after["budget_used"] == 6
        listed = {record["id"]: record for record in (await admin.get("/v1/keys")).json()["data"]}
        assert listed[key_id]["requests"] == 13
