"""DNS rebinding: while the gateway asks no API key, a page whose name was re-pointed at it
(same origin, so no `Origin` to refuse) is turned away by its `Host`; local names, addresses
and the operator's `allowed_hosts` are served; a gateway that asks keys is unaffected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import ConfigError, load_settings
from proxy.domain.hosts import HostPolicy
from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}
REBOUND = "rebind.evil.example"


def port_of(url: str) -> int:
    return httpx.URL(url).port or 80


async def test_a_rebound_name_is_refused_in_each_dialect_while_no_key_is_asked() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        host = {"host": f"{REBOUND}:{port_of(url)}"}
        async with httpx.AsyncClient(base_url=url) as client:
            for path in ("/v1/models", "/ready", "/openapi.json", "/metrics", "/v1/streams/abc"):
                answer = await client.get(path, headers=host)
                assert answer.status_code == 403, path
                assert answer.json()["error"]["code"] == "host_not_allowed", path
                assert "allowed_hosts" in answer.json()["error"]["message"]
            chat = await client.post("/v1/chat/completions", json=CHAT, headers=host)
            assert chat.status_code == 403 and chat.json()["error"]["code"] == "host_not_allowed"
            tags = await client.get("/api/tags", headers=host)
            assert tags.status_code == 403 and "allowed_hosts" in tags.json()["error"]  # Ollama's shape
            generate = await client.post("/api/generate", json={"model": "m", "prompt": "hi"}, headers=host)
            assert generate.status_code == 403 and "LLM_PROXY_ALLOWED_HOSTS" in generate.json()["error"]
            claude: Any = (await client.post(
                "/v1/messages", json={**CHAT, "max_tokens": 5}, headers={**host, "anthropic-version": "2023-06-01"}
            )).json()
            assert claude["type"] == "error" and claude["error"]["type"] == "permission_error"
            assert "allowed_hosts" in claude["error"]["message"]
            # Liveness tells nothing, and load balancers probe it by address or any name.
            assert (await client.get("/health", headers=host)).status_code == 200
    assert fake.requests == []


async def test_local_names_and_addresses_are_served() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        port = port_of(url)
        async with httpx.AsyncClient(base_url=url) as client:
            for name in (
                f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", f"app.localhost:{port}",
                f"192.168.1.20:{port}", "llm-proxy:8080",  # a LAN address; a container's name behind nginx
                f"0.0.0.0:{port}",
            ):
                answer = await client.get("/v1/models", headers={"host": name})
                assert answer.status_code == 200, name
            # A name with a dot is looked up in public DNS, whatever it looks like.
            for name in ("localhost.evil.example", "llm-proxy.", "127.0.0.1.nip.io"):
                assert (await client.get("/v1/models", headers={"host": name})).status_code == 403, name


async def test_the_operators_names_are_served() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, default=True), allowed_hosts=("llm.example.com", "*.corp.example")
    ) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for name in ("llm.example.com", "LLM.example.com:443", "gpu.corp.example", "a.b.corp.example:8080"):
                assert (await client.get("/v1/models", headers={"host": name})).status_code == 200, name
            for name in ("corp.example", "example.com", REBOUND):
                assert (await client.get("/v1/models", headers={"host": name})).status_code == 403, name
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), allowed_hosts=("*",)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/v1/models", headers={"host": REBOUND})).status_code == 200


async def test_a_gateway_that_asks_keys_does_not_look_at_the_host() -> None:
    # The key is the protection: a rebound page has none (and a proxy's name keeps working).
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), auth="required") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/v1/models", headers={"host": REBOUND})
            assert answer.status_code == 401


def test_the_setting_is_read_from_the_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('allowed_hosts = ["LLM.example.com", "*.corp.example"]\n')
    assert load_settings(config, {}).allowed_hosts == ("llm.example.com", "*.corp.example")
    assert load_settings(None, {}).allowed_hosts == ()
    env = {"LLM_PROXY_ALLOWED_HOSTS": "a.example, *"}
    assert load_settings(config, env).allowed_hosts == ("a.example", "*")


@pytest.mark.parametrize("entry", ["https://llm.example.com", "llm.example.com:443", "llm.example.com/v1", "*example.com", ""])
def test_an_entry_that_is_not_a_host_name_fails_at_start_up_naming_the_key(tmp_path: Path, entry: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'allowed_hosts = ["{entry}"]\n')
    with pytest.raises(ConfigError, match="allowed_hosts"):
        load_settings(config, {})


def test_the_bind_address_name_is_served() -> None:
    # `bind = "gpu-box.lan:8080"`: the name the operator gave is how clients reach it.
    policy = HostPolicy((), "GPU-box.lan")
    assert policy.allows("gpu-box.lan:8080") and policy.allows("gpu-box.lan.")
    assert not policy.allows("box.lan") and not policy.allows("evil.gpu-box.lan")
    assert policy.allows(None) and policy.allows("")  # HTTP/1.0: no Host, never a browser


async def test_a_rebound_page_behind_a_proxy_that_rewrites_host_is_refused_while_no_key_is_asked() -> None:
    """nginx's default (`proxy_pass http://127.0.0.1:8080`) sends the gateway its own address as
    `Host`, whatever name the browser used: the `Host` check cannot see a rebound name there.
    A rebound page's POSTs carry its name in `Origin`, and the browser says they are
    same-origin (`Sec-Fetch-Site`), as they are to it; such a page may also set
    `X-Forwarded-Host` itself. Either way its chat ran. The page's own name is held to the
    rule `Host` is held to; a name of the operator's (`allowed_hosts`) is served as before."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, default=True), allowed_hosts=("llm.example.com",)
    ) as url:
        behind_nginx = {"host": f"127.0.0.1:{port_of(url)}", "content-type": "text/plain"}
        async with httpx.AsyncClient(base_url=url) as client:
            for page in (
                {"origin": f"http://{REBOUND}", "sec-fetch-site": "same-origin"},
                {"origin": f"http://{REBOUND}", "x-forwarded-host": REBOUND},  # set by the page itself
            ):
                chat = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers={**behind_nginx, **page})
                assert chat.status_code == 403, page
                assert chat.json()["error"]["code"] == "host_not_allowed" and REBOUND in chat.json()["error"]["message"]
                # A route Quart serves (a workspace's ingestion) as well.
                ingest = await client.post("/v1/workspaces/docs/documents", content='{"content": "x"}', headers={**behind_nginx, **page})
                assert ingest.status_code == 403 and ingest.json()["error"]["code"] == "host_not_allowed", page
            assert fake.requests == []
            # The operator's app, under the gateway's address behind that proxy; a local page.
            for page in (
                {"origin": "https://llm.example.com", "sec-fetch-site": "same-origin"},
                {"origin": "http://localhost:3000", "sec-fetch-site": "same-site"},  # allowed by `cors_origins`
            ):
                chat = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers={**behind_nginx, **page})
                assert chat.status_code == 200, page
