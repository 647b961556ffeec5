"""CORS: browser pages from allowed origins may call the gateway (preflights answered, the
headers browser code needs exposed); pages from any other origin cannot make a route run;
clients that send no `Origin` see nothing of it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import DEFAULT_CORS_ORIGINS, ConfigError, load_settings
from proxy.http import _cors
from tests.fakes import OpenAIBackend
from tests.fakes.script import Script
from tests.harness import backend, running_gateway

LOCAL_PAGE = "http://localhost:5173"
FOREIGN_PAGE = "https://evil.example"
# One path of each dialect, served by the front door, and two of Quart's.
DIALECT_PATHS = {"/v1/chat/completions": "openai", "/api/generate": "ollama", "/v1/messages": "anthropic"}
QUART_PATHS = {"/v1/models": "openai", "/api/tags": "ollama"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}


def preflight_headers(origin: str, **extra: str) -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os, anthropic-dangerous-direct-browser-access, x-route",
        **extra,
    }


def error_code(dialect: str, answer: httpx.Response) -> str:
    body: Any = answer.json()
    if dialect == "ollama":
        assert isinstance(body["error"], str)
        return "origin_not_allowed" if "cors_origins" in body["error"] else body["error"]
    if dialect == "anthropic":
        assert body["type"] == "error"
        return "origin_not_allowed" if "cors_origins" in body["error"]["message"] else body["error"]["type"]
    return str(body["error"]["code"])


def cors_headers(answer: httpx.Response) -> set[str]:
    return {name for name in answer.headers if name.startswith("access-control-")}


async def test_a_preflight_from_an_allowed_origin_is_answered_on_every_dialect() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path in [*DIALECT_PATHS, *QUART_PATHS]:
                answer = await client.options(path, headers=preflight_headers(LOCAL_PAGE))
                assert answer.status_code == 204, path
                assert answer.headers["access-control-allow-origin"] == LOCAL_PAGE
                assert "POST" in answer.headers["access-control-allow-methods"]
                assert answer.headers["access-control-allow-headers"] == preflight_headers(LOCAL_PAGE)["access-control-request-headers"]
                assert int(answer.headers["access-control-max-age"]) > 0
                assert "Origin" in answer.headers["vary"] and "Access-Control-Request-Headers" in answer.headers["vary"]
                assert "access-control-allow-credentials" not in answer.headers  # bearer keys, not cookies
                assert "access-control-allow-private-network" not in answer.headers
                # A 204 has no framing headers (RFC 9110 §8.6): Envoy turns one that has into a 502.
                assert "content-length" not in answer.headers and "transfer-encoding" not in answer.headers
                assert answer.content == b""
            # Chromium's Private Network Access: a public page asking to reach this address.
            private = await client.options(
                "/v1/chat/completions",
                headers=preflight_headers(LOCAL_PAGE, **{"access-control-request-private-network": "true"}),
            )
            assert private.status_code == 204 and private.headers["access-control-allow-private-network"] == "true"
            # Ollama's default origins: desktop-app webviews too.
            for origin in ("tauri://localhost", "vscode-webview://1a2b3c", "http://127.0.0.1", "https://[::1]:8443"):
                answer = await client.options("/api/chat", headers=preflight_headers(origin))
                assert answer.status_code == 204 and answer.headers["access-control-allow-origin"] == origin, origin
    assert fake.requests == []


async def test_a_preflight_from_another_origin_is_refused_in_the_paths_dialect() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path, dialect in {**DIALECT_PATHS, **QUART_PATHS}.items():
                for origin in (FOREIGN_PAGE, "http://localhost.evil.example", "null"):
                    answer = await client.options(path, headers=preflight_headers(origin))
                    assert answer.status_code == 403, (path, origin)
                    assert error_code(dialect, answer) == "origin_not_allowed"
                    assert cors_headers(answer) == set()


async def test_a_streamed_chat_from_an_allowed_origin_carries_the_cors_headers() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            async with client.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"origin": LOCAL_PAGE}
            ) as response:
                raw = await response.aread()
            assert response.status_code == 200 and raw.endswith(b"data: [DONE]\n\n")
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["access-control-allow-origin"] == LOCAL_PAGE
            assert response.headers["vary"] == "Origin"
            exposed = {name.strip() for name in response.headers["access-control-expose-headers"].split(",")}
            assert {"x-request-id", "x-trace-id", "request-id", "retry-after", "x-ratelimit-remaining-requests"} <= exposed
            assert "x-trace-id" in response.headers
            # An Anthropic client and a route Quart serves get them too.
            messages = await client.post(
                "/v1/messages", json={**CHAT, "max_tokens": 16},
                headers={"origin": LOCAL_PAGE, "anthropic-version": "2023-06-01"},
            )
            assert messages.status_code == 200 and messages.headers["access-control-allow-origin"] == LOCAL_PAGE
            models = await client.get("/v1/models", headers={"origin": LOCAL_PAGE})
            assert models.status_code == 200 and models.headers["access-control-allow-origin"] == LOCAL_PAGE
            assert models.headers.get_list("access-control-allow-origin") == [LOCAL_PAGE]  # once, not per layer
    assert [r.path for r in fake.requests if r.method == "POST"] == ["/v1/chat/completions"] * 2


async def test_a_request_from_a_disallowed_origin_is_refused_before_any_route_runs() -> None:
    """A page the user visits sends "simple" requests (text/plain POST: no preflight): they
    must not reach a backend, nor the workspaces' ingestion."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path, dialect in DIALECT_PATHS.items():
                answer = await client.post(
                    path, content=json.dumps(CHAT),
                    headers={"origin": FOREIGN_PAGE, "content-type": "text/plain"},
                )
                assert answer.status_code == 403, path
                assert error_code(dialect, answer) == "origin_not_allowed"
                assert cors_headers(answer) == set()
            ingest = await client.post(
                "/v1/workspaces/docs/documents", content=b"secret plans",
                headers={"origin": FOREIGN_PAGE, "content-type": "text/plain"},
            )
            assert ingest.status_code == 403 and error_code("openai", ingest) == "origin_not_allowed"
            models = await client.get("/api/tags", headers={"origin": FOREIGN_PAGE})
            assert models.status_code == 403 and error_code("ollama", models) == "origin_not_allowed"
            # A shared cache (nginx `proxy_cache`) must not give this 403 to an allowed page.
            assert models.headers["vary"] == "Origin"
            # The same request without an Origin (curl, an SDK) is served.
            served = await client.post("/v1/chat/completions", json=CHAT)
            assert served.status_code == 200
    assert len(fake.requests) == 1


async def test_a_page_served_under_the_gateways_own_address_is_not_refused() -> None:
    """A web app and the gateway behind one reverse proxy (`https://llm.example.com/` the app,
    `/v1` the gateway) are one origin; the browser still sends `Origin` on its POSTs. Ollama's
    CORS layer lets such requests through whatever its origins say; so does the gateway."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        # With no key asked, a page's name is one `allowed_hosts` names (see test_hosts).
        backend("b", server.url, default=True), cors_origins=(), allowed_hosts=("llm.example.com", "chat.example.com"),
    ) as url:
        address = url.removeprefix("http://")
        async with httpx.AsyncClient(base_url=url) as client:
            for headers in (
                {"origin": url},  # the gateway's own address: no page could be anything else
                {"origin": "https://llm.example.com", "host": "llm.example.com"},  # nginx `proxy_set_header Host $host`
                {"origin": "https://LLM.example.com", "host": "llm.example.com"},
                # nginx's default Host (its upstream's address), the public name in X-Forwarded-Host.
                {"origin": "https://chat.example.com", "host": address, "x-forwarded-host": "chat.example.com"},
                {"origin": "https://chat.example.com", "host": address, "x-forwarded-host": "chat.example.com, edge.internal"},
                # A proxy that passes neither: the browser itself says the page is this origin.
                {"origin": "https://chat.example.com", "host": address, "sec-fetch-site": "same-origin"},
            ):
                answer = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert answer.status_code == 200, (headers, answer.text)
                preflight = await client.options("/v1/chat/completions", headers={**preflight_headers(headers["origin"]), **headers})
                assert preflight.status_code == 204, headers
            # Any other page is still refused: another port, another name, a proxy's second entry.
            for headers in (
                {"origin": "http://127.0.0.1:1"},
                {"origin": "https://evil.example", "host": "llm.example.com"},
                {"origin": "https://llm.example.com.evil.example", "host": "llm.example.com"},
                {"origin": "https://edge.internal", "host": address, "x-forwarded-host": "chat.example.com, edge.internal"},
                {"origin": "null", "host": address},
                {"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
                {"origin": "https://wiki.example.com", "host": address, "sec-fetch-site": "same-site"},  # a sibling site
            ):
                refused = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert refused.status_code == 403 and error_code("openai", refused) == "origin_not_allowed", headers
    assert len(fake.requests) == 6


async def test_a_preflight_needs_no_key_when_keys_are_required() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), auth="required") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path in [*DIALECT_PATHS, *QUART_PATHS]:
                answer = await client.options(path, headers=preflight_headers(LOCAL_PAGE))
                assert answer.status_code == 204, path
                assert answer.headers["access-control-allow-origin"] == LOCAL_PAGE
            # The request itself needs its key; the page can read why it was refused.
            refused = await client.post("/v1/chat/completions", json=CHAT, headers={"origin": LOCAL_PAGE})
            assert refused.status_code == 401
            assert refused.headers["access-control-allow-origin"] == LOCAL_PAGE
    assert fake.requests == []


async def test_a_request_without_an_origin_gets_no_cors_headers() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path in DIALECT_PATHS:
                with_origin = await client.post(path, json={**CHAT, "max_tokens": 16}, headers={"origin": LOCAL_PAGE})
                without = await client.post(path, json={**CHAT, "max_tokens": 16})
                assert with_origin.status_code == without.status_code == 200, path
                assert "access-control-allow-origin" in with_origin.headers
                assert cors_headers(without) == set() and "vary" not in without.headers
            # Nor is an OPTIONS without one a preflight: the route's own 405.
            plain = await client.options("/v1/chat/completions", headers={"access-control-request-method": "POST"})
            assert plain.status_code == 405 and cors_headers(plain) == set()


async def test_configured_origins_replace_the_local_default() -> None:
    fake = OpenAIBackend()
    origins = ("https://app.example.com", "https://*.corp.example:*")
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), cors_origins=origins) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for origin, allowed in {
                "https://app.example.com": True,
                "https://APP.example.com": True,  # origins compare without case
                "https://app.example.com:8443": False,
                "http://app.example.com": False,
                "https://wiki.corp.example:8080": True,
                "https://a.b.corp.example": True,
                "https://corp.example": False,
                "https://evilcorp.example": False,
                LOCAL_PAGE: False,
            }.items():
                answer = await client.options("/v1/chat/completions", headers=preflight_headers(origin))
                assert answer.status_code == (204 if allowed else 403), origin
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), cors_origins=("*",)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            anywhere = await client.post("/v1/chat/completions", json=CHAT, headers={"origin": FOREIGN_PAGE})
            assert anywhere.status_code == 200 and anywhere.headers["access-control-allow-origin"] == FOREIGN_PAGE


def test_the_setting_defaults_to_local_origins_and_is_overridden_by_the_environment(tmp_path: Path) -> None:
    assert load_settings(None, {}).cors_origins == DEFAULT_CORS_ORIGINS
    assert "http://localhost:*" in DEFAULT_CORS_ORIGINS and "*" not in DEFAULT_CORS_ORIGINS
    config = tmp_path / "config.toml"
    config.write_text('cors_origins = ["https://App.example.com", "http://localhost:*"]\n')
    assert load_settings(config, {}).cors_origins == ("https://app.example.com", "http://localhost:*")
    override = load_settings(config, {"LLM_PROXY_CORS_ORIGINS": " https://a.example , * "})
    assert override.cors_origins == ("https://a.example", "*")
    config.write_text("cors_origins = []\n")
    assert load_settings(config, {}).cors_origins == ()  # no page may call
    # A file:// page's requests come as `Origin: null`, which only `*` allows: no dead entry.
    assert not any(entry.startswith("file:") for entry in DEFAULT_CORS_ORIGINS)
    # Blank is unset (the default stays); blank entries are a mistake, not "no page at all".
    assert load_settings(None, {"LLM_PROXY_CORS_ORIGINS": "  "}).cors_origins == DEFAULT_CORS_ORIGINS
    for blanks in (" , ", "http://localhost:*,"):
        with pytest.raises(ConfigError, match="`LLM_PROXY_CORS_ORIGINS` has an empty entry"):
            load_settings(None, {"LLM_PROXY_CORS_ORIGINS": blanks})


@pytest.mark.parametrize(
    "entry",
    ["https://app.example.com/", "app.example.com", "https://app.*.com", "https://*:*", "http://localhost:99999",
     "https://app.example.com/path", "http://localhost:x"],
)
def test_an_invalid_origin_fails_at_start_up_naming_the_key(tmp_path: Path, entry: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'cors_origins = ["http://localhost:*", "{entry}"]\n')
    with pytest.raises(ConfigError, match="`cors_origins`"):
        load_settings(config, {})
    with pytest.raises(ConfigError, match="`LLM_PROXY_CORS_ORIGINS`"):
        load_settings(None, {"LLM_PROXY_CORS_ORIGINS": f"http://localhost:*,{entry}"})
    config.write_text('cors_origins = "https://app.example.com"\n')
    with pytest.raises(ConfigError, match="`cors_origins`"):
        load_settings(config, {})


async def test_a_browser_page_can_read_that_an_error_is_not_worth_retrying() -> None:
    """The gateway says `x-should-retry: false` when the backend refuses its own key; the
    OpenAI and Anthropic SDKs in a page read it only if it is exposed, and retried otherwise."""
    fake = OpenAIBackend(default=Script(status=401, error_message="Incorrect API key provided"))
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/v1/chat/completions", json=CHAT, headers={"origin": LOCAL_PAGE})
    assert answer.status_code == 502 and answer.headers["x-should-retry"] == "false"
    exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].split(",")}
    assert "x-should-retry" in exposed


async def test_a_page_can_read_a_created_keys_location_a_405s_methods_and_a_401s_scheme() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), auth="required") as url:
        async with httpx.AsyncClient(base_url=url, headers={"origin": LOCAL_PAGE}) as client:
            refused = await client.post("/v1/chat/completions", json=CHAT)
            wrong_method = await client.delete("/v1/chat/completions")
    for answer in (refused, wrong_method):
        exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].split(",")}
        assert {"location", "allow", "www-authenticate"} <= exposed
    assert refused.status_code == 401 and refused.headers["www-authenticate"]


async def test_a_page_refused_in_a_loop_is_logged_once_not_on_every_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.http")
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(20):
                answer = await client.get("/v1/models", headers={"origin": FOREIGN_PAGE})
                assert answer.status_code == 403
            other = await client.get("/v1/models", headers={"origin": "https://other.example"})
            assert other.status_code == 403
    refusals = [record.getMessage() for record in caplog.records if "not in cors_origins" in record.getMessage()]
    assert len(refusals) == 2, refusals
    assert FOREIGN_PAGE in refusals[0] and "https://other.example" in refusals[1]


def test_the_refusal_log_forgets_old_origins_and_logs_an_origin_again_after_a_minute(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.http")
    now = [1000.0]
    monkeypatch.setattr(_cors.time, "monotonic", lambda: now[0])
    refusals = _cors.RefusalLog()
    for i in range(_cors.REFUSAL_LOG_ORIGINS * 4):
        refusals.refused(f"https://page{i}.example", "GET", "/v1/models")
    assert len(refusals._seen) <= _cors.REFUSAL_LOG_ORIGINS
    caplog.clear()
    page = f"https://page{_cors.REFUSAL_LOG_ORIGINS * 4 - 1}.example"
    for _ in range(5):
        refusals.refused(page, "GET", "/v1/models")
    assert caplog.records == []
    now[0] += _cors.REFUSAL_LOG_INTERVAL
    refusals.refused(page, "GET", "/v1/models")
    assert len(caplog.records) == 1 and "5 more refused since" in caplog.records[0].getMessage()


# Headers a page reads without their being exposed, and the transport's own.
_SAFELISTED = {
    "cache-control", "content-language", "content-length", "content-type", "expires", "last-modified", "pragma",
    "date", "server", "vary", "connection", "transfer-encoding", "x-accel-buffering",
}


async def test_every_header_a_backends_answer_is_given_is_one_a_page_can_read() -> None:
    """The OpenAI SDK in a page reads `openai-processing-ms`, `retry-after-ms` and the backend's
    request id off its answers as a server's would: each header the gateway sets or passes on,
    on an answer or a backend's 429, streamed or not, is exposed."""
    upstream = [("x-request-id", "req_hosted"), ("openai-processing-ms", "321"), ("x-ratelimit-remaining-requests", "9")]
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, headers={"origin": LOCAL_PAGE}) as client:
            answers = []
            for stream in (False, True):
                fake.push(Script(headers=upstream))
                answers.append(await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}))
                fake.push(Script(status=429, retry_after=2, headers=[("retry-after-ms", "1500"), *upstream]))
                answers.append(await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}))
    assert [answer.status_code for answer in answers] == [200, 429, 200, 429]
    for answer in answers:
        exposed = {name.strip() for name in answer.headers["access-control-expose-headers"].split(",")}
        given = {name for name in answer.headers if not name.startswith("access-control-")} - _SAFELISTED
        assert given <= exposed, given - exposed
