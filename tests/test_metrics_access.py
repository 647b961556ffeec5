"""`/metrics` shows every tenant's per-model traffic: `metrics_admin_only` keeps it for admin
keys (a scraper's), while by default any key may read it, as before."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from proxy.config import ConfigError, load_settings
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import MESSAGES, bearer, gateway, new_key, wait_for_key

pytest_plugins = ["tests.infra_servers"]


async def test_an_admin_only_metrics_endpoint_refuses_a_tenants_key(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    tenant = await new_key(pg_database_url, "tenant-a")
    scraper = await new_key(pg_database_url, "prometheus", "--admin")
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), metrics_admin_only=True
    ) as url:
        await wait_for_key(url, tenant)
        # Traffic of another key, which the metrics show per model and backend.
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=scraper, max_retries=0) as other:
            await other.chat.completions.create(model="secret-project-model", messages=MESSAGES)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=url) as client:
            refused = await client.get("/metrics", headers=bearer(tenant))
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "admin_key_required"
            assert "metrics_admin_only" in refused.json()["error"]["message"]
            assert (await client.get("/metrics")).status_code == 401
            served = await client.get("/metrics", headers=bearer(scraper))
            assert served.status_code == 200 and "llm_proxy_requests_total" in served.text
            # The tenant's own work is untouched.
            assert (await client.get("/v1/models", headers=bearer(tenant))).status_code == 200


async def test_by_default_any_key_reads_the_metrics(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend()
    tenant = await new_key(pg_database_url, "tenant-a")
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        await wait_for_key(url, tenant)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/metrics", headers=bearer(tenant))).status_code == 200


def test_the_setting_is_read_from_the_file_and_the_environment_and_cannot_contradict_public_paths(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    assert load_settings(None, {}).metrics_admin_only is False
    config.write_text("metrics_admin_only = true\n")
    assert load_settings(config, {}).metrics_admin_only is True
    assert load_settings(config, {"LLM_PROXY_METRICS_ADMIN_ONLY": "0"}).metrics_admin_only is False
    assert load_settings(None, {"LLM_PROXY_METRICS_ADMIN_ONLY": "yes"}).metrics_admin_only is True
    with pytest.raises(ConfigError, match="LLM_PROXY_METRICS_ADMIN_ONLY"):
        load_settings(None, {"LLM_PROXY_METRICS_ADMIN_ONLY": "admins"})
    config.write_text('metrics_admin_only = true\nauth_public_paths = ["/ready", "/metrics"]\n')
    with pytest.raises(ConfigError, match="auth_public_paths"):
        load_settings(config, {})
