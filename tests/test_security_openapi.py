"""`/openapi.json` describes every served route; schemathesis fuzzes the live gateway from it
(with a real key, PostgreSQL and NATS) and may find no 5xx and no crash."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import httpx
import hypothesis
import jsonschema_rs
import pytest
import schemathesis
import trio
from schemathesis import GenerationMode

from proxy.config import Settings
from proxy.http._openapi import OPERATIONS, app_rules, served_operations
from proxy.http.app import create_app
from tests.fakes import Exchange, OpenAIBackend, Request, Script, Usage
from tests.fakes.base import Call
from tests.harness import backend
from tests.test_auth_helpers import bearer, gateway, new_key, wait_for_key
from tests.test_responses_stored import journaled_stack

pytest_plugins = ["tests.infra_servers"]

# Examples per operation, of valid and of invalid data: the whole run stays well under a
# minute on two cores (generating the larger bodies costs more than serving them).
EXAMPLES = {GenerationMode.POSITIVE: 6, GenerationMode.NEGATIVE: 4}
# Stream resume waits briefly on NATS for an unknown trace before its 404.
SLOW = {"/v1/streams/{trace_id}": 1}


def test_every_served_route_is_documented() -> None:
    app = create_app(Settings())
    served = served_operations(app_rules(app))
    undocumented = sorted(served - set(OPERATIONS))
    assert not undocumented, f"add these to proxy/http/_openapi.py OPERATIONS: {undocumented}"


class SturdyOpenAIBackend(OpenAIBackend):
    """The fake, refusing (as real servers do) embedding sizes it would choke on in-process."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/embeddings" and request.method == "POST":
            body = request.json()
            dimensions = body.get("dimensions") if isinstance(body, dict) else None
            if isinstance(dimensions, int) and dimensions > 4096:
                await self.send_error(exchange, 400, "dimensions is too large")
                return
        await super().route(request, exchange, call)


_STORES_DOWN = frozenset({"journal_unavailable", "database_unavailable", "nats_unavailable", "auth_unavailable"})


def _code(body: bytes) -> object:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error.get("code") if isinstance(error, dict) else None


def fuzz(document: dict[str, Any], url: str, key: str) -> list[str]:
    """Run schemathesis (blocking: call it from a thread); the failures, as curl commands."""
    config = schemathesis.Config.from_dict({"headers": bearer(key), "base-url": url, "request-timeout": 30})
    schema = schemathesis.openapi.from_dict(document, config=config)
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=SLOW.get(operation.path, EXAMPLES[mode]), deadline=None, database=None, derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                response = case.call()
                # The gateway's own failures are 500s; 502-504 report the backend's state, but
                # PostgreSQL and NATS are up: a 503 blaming them is a request misread as an outage.
                if response.status_code == 500 or response.status_code > 504 or (
                    response.status_code == 503 and _code(response.content) in _STORES_DOWN
                ):
                    failures.append(f"{response.status_code} {response.text[:300]!r}: {case.as_curl_command()}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong (no parameters, no body)
    assert calls > 100
    return failures


async def test_schemathesis_finds_no_server_error(
    aio_loop: object, pg_database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    fake = SturdyOpenAIBackend(default=Script(tokens=["Hi"], usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), max_body_bytes=1 << 20
    ) as url:
        key = await new_key(pg_database_url, "fuzzer", "--admin")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            document = (await client.get("/openapi.json")).json()
            assert document["openapi"] == "3.1.0"
            failures = await trio.to_thread.run_sync(fuzz, document, url, key)
            assert not failures, "\n".join(failures[:10])
            assert (await client.get("/health")).status_code == 200
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


async def test_the_document_is_served_without_a_key_and_lists_only_served_routes(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("b", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "any")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/openapi.json")
            assert answer.status_code == 200
            document = answer.json()
            app = create_app(Settings())
            served = served_operations(app_rules(app))
            listed = {(path, method) for path, methods in document["paths"].items() for method in methods}
            assert listed == served
            assert document["paths"]["/health"]["get"]["security"] == []
            assert "security" not in document["paths"]["/v1/chat/completions"]["post"]
            assert document["security"] == [{"bearer": []}, {"apiKey": []}]
            schemathesis.openapi.from_dict(document)  # loads as OpenAPI 3.1


def test_each_operation_documents_the_error_shape_its_path_answers_in() -> None:
    # The document's own rule: `/v1/messages*` answers in Anthropic's shape, `/api/*` in Ollama's.
    # Message Batches were documented with OpenAI's errors, and their create body as any object.
    app = create_app(Settings())
    for path, method in served_operations(app_rules(app)):
        errors = OPERATIONS[(path, method)]["responses"].get("4XX")
        if errors is None:
            continue
        ollama = path.startswith("/api/") or path == "/"  # Ollama's "Ollama is running"
        expected = "AnthropicError" if path.startswith("/v1/messages") else "OllamaError" if ollama else "OpenAIError"
        assert errors == {"$ref": f"#/components/responses/{expected}"}, (method, path)
    body = OPERATIONS[("/v1/messages/batches", "post")]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["requests"]
    assert body["properties"]["requests"]["items"]["required"] == ["custom_id", "params"]
    assert body["properties"]["requests"]["items"]["properties"]["params"] == OPERATIONS[("/v1/messages", "post")][
        "requestBody"]["content"]["application/json"]["schema"]


async def test_background_responses_and_their_cancel_answer_as_documented(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # The document allowed a Response only `completed` or `incomplete`: a client generated from it
    # refused the `queued` of a background creation and the `cancelled` of its cancel, and it did
    # not list `background` or `previous_response_id` among the fields a request may set.
    documented = OPERATIONS[("/v1/responses", "post")]["requestBody"]["content"]["application/json"]["schema"]
    assert {"background", "previous_response_id"} <= set(documented["properties"])
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(50)], pace=0.1))
    async with journaled_stack(pg_database_url, nats_url, fake) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
            created = await http.post("/v1/responses", json={"model": "m", "input": "Count", "background": True})
            assert created.status_code == 200, created.text
            cancelled = await http.post(f"/v1/responses/{created.json()['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
    for (path, method), answer in [(("/v1/responses", "post"), created), (("/v1/responses/{response_id}/cancel", "post"), cancelled)]:
        schema = OPERATIONS[(path, method)]["responses"]["200"]["content"]["application/json"]["schema"]
        assert jsonschema_rs.validator_for(schema).is_valid(answer.json()), (path, answer.json()["status"])
    assert (created.json()["status"], cancelled.json()["status"]) == ("queued", "cancelled")


def test_every_path_variable_is_declared_and_lists_document_their_query() -> None:
    # Nine Files, Batches and Message Batches operations left `{file_id}`/`{batch_id}` undeclared,
    # which OpenAPI requires (client generators refuse such a document), and their lists did
    # not say how to page.
    app = create_app(Settings())
    for path, method in served_operations(app_rules(app)):
        declared = {p["name"] for p in OPERATIONS[(path, method)].get("parameters", []) if p.get("in") == "path"}
        assert set(re.findall(r"{(\w+)}", path)) == declared, (method, path)
    for path, names in [("/v1/files", {"purpose", "after", "limit", "order"}), ("/v1/batches", {"after", "limit"}),
                        ("/v1/messages/batches", {"limit", "after_id", "before_id"})]:
        query = {p["name"] for p in OPERATIONS[(path, "get")].get("parameters", []) if p.get("in") == "query"}
        assert query == names, path
