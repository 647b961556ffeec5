"""`GET /metrics`: Prometheus's view of what the gateway served — on a real gateway, and
through `--workers 2`, where a scrape reaching either worker sees them both."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.infra.logging import REQUEST_LOGGER
from proxy.infra.metrics import _ANSWERED_MAX
from tests.fakes import OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_cli import free_port
from tests.test_startup import running, wait_healthy

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(value for found, value in samples(text, name) if all(found.get(k) == v for k, v in labels.items()))


async def test_metrics_count_requests_outcomes_latency_and_tokens() -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c"], usage=Usage(7, 3)))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, models=("m",))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        for _ in range(2):
            async for _chunk in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            missing = await http.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model-xyz"})
            assert missing.status_code == 404
            # A client that leaves in the middle of a stream.
            fake.set_script(Script(n_tokens=200, pace=0.02))
            async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                async for _line in response.aiter_lines():
                    break

            async def counted() -> str | None:
                text = (await http.get("/metrics")).text
                return text if total(text, "llm_proxy_requests_total", outcome="cancelled") else None

            text = await eventually(counted)
            assert (await http.get("/metrics")).headers["content-type"].startswith("text/plain")

    served = {"kind": "chat", "dialect": "openai", "model": "m", "backend": "vllm", "source": "backend"}
    assert total(text, "llm_proxy_requests_total", **served, status="200", outcome="ok") == 5
    assert total(text, "llm_proxy_requests_total", **served, status="200", outcome="cancelled") == 1
    # An unknown model is counted, but its name is not a label (one series per typo, unbounded).
    assert total(text, "llm_proxy_requests_total", model="", backend="", status="404", outcome="error") == 1
    assert "no-such-model-xyz" not in text
    assert total(text, "llm_proxy_request_duration_seconds_count", model="m", stream="false") == 3
    assert total(text, "llm_proxy_request_duration_seconds_count", model="m", stream="true") == 3
    assert total(text, "llm_proxy_time_to_first_token_seconds_count", model="m", backend="vllm") == 3
    assert total(text, "llm_proxy_prompt_tokens_total", model="m", backend="vllm") >= 5 * 7
    assert total(text, "llm_proxy_completion_tokens_total", model="m", backend="vllm") >= 5 * 3


async def test_embeddings_are_counted_as_their_own_kind() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, models=("m",))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answer = await http.post("/v1/embeddings", json={"model": "m", "input": ["one", "two"]})
            assert answer.status_code == 200, answer.text
            text = (await http.get("/metrics")).text
    assert total(text, "llm_proxy_requests_total", kind="embeddings", model="m", status="200", outcome="ok") == 1
    assert total(text, "llm_proxy_requests_total", kind="chat") == 0
    assert total(text, "llm_proxy_prompt_tokens_total", kind="embeddings", model="m") > 0


async def test_a_name_a_backend_answers_without_listing_it_is_labelled_within_a_bound() -> None:
    """A name the backend answered but does not list (Claude Code's `claude-sonnet-4-5`, which
    Anthropic lists only dated) is labelled as asked (it was `model=""`); one the backend
    refused is not, nor, past a bound, more names a backend that takes any (llama.cpp's) answered."""
    fake = OpenAIBackend(models=None, scripts={"qwen3-8b": Script(tokens=["hi"])})
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await http.get("/metrics")  # a scrape reads the backends' lists: qwen3-8b is known from now on
            for model in ["qwen3-8b", "qwen3-8b-alias", "qwen3-8b-alias"]:
                assert (await http.post("/v1/chat/completions", json={**CHAT, "model": model})).status_code == 200
            fake.set_script(Script(status=404))
            assert (await http.post("/v1/chat/completions", json={**CHAT, "model": "typo-1"})).status_code == 404
            fake.set_script(Script(tokens=["hi"]))
            for i in range(_ANSWERED_MAX + 4):
                assert (await http.post("/v1/chat/completions", json={**CHAT, "model": f"made-up-{i}"})).status_code == 200
            text = (await http.get("/metrics")).text
    assert total(text, "llm_proxy_requests_total", model="qwen3-8b", backend="vllm") == 1
    assert total(text, "llm_proxy_requests_total", model="qwen3-8b-alias", backend="vllm", status="200") == 2
    assert total(text, "llm_proxy_prompt_tokens_total", model="qwen3-8b-alias", backend="vllm") > 0
    assert total(text, "llm_proxy_requests_total", model="", backend="vllm", status="404") == 1
    assert "typo" not in text
    labelled = {found["model"] for found, _ in samples(text, "llm_proxy_requests_total") if found["model"].startswith("made-up-")}
    assert len(labelled) == _ANSWERED_MAX - 1  # the alias took one place
    assert total(text, "llm_proxy_requests_total", model="", backend="vllm", status="200") == 5


async def test_a_model_the_default_backend_lists_is_labelled_from_the_first_request() -> None:
    # No scrape and no `/v1/models` call before the requests: the gateway has never listed its
    # backends. Before, qwen3-8b's first requests were counted with model="" for good.
    fake = OpenAIBackend(models=None, scripts={"qwen3-8b": Script(tokens=["hi"], usage=Usage(5, 1))})
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for model in ["qwen3-8b", "qwen3-8b"]:
                assert (await http.post("/v1/chat/completions", json={**CHAT, "model": model})).status_code == 200
            fake.set_script(Script(status=404))
            assert (await http.post("/v1/chat/completions", json={**CHAT, "model": "typo-1"})).status_code == 404
            text = (await http.get("/metrics")).text
    assert total(text, "llm_proxy_requests_total", model="qwen3-8b", backend="vllm", status="200") == 2
    assert total(text, "llm_proxy_prompt_tokens_total", model="qwen3-8b", backend="vllm") == 10
    assert total(text, "llm_proxy_requests_total", model="", backend="vllm") == 1
    assert "typo" not in text


def test_with_two_workers_every_scrape_counts_both(tmp_path: Path) -> None:
    fake_command = [sys.executable, "-m", "tests.fakes", "openai"]
    with running(fake_command) as fake:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        assert ready[:1] == ["READY"], ready
        config = tmp_path / "g.toml"
        config.write_text(f'embedded = false\n[[backends]]\nname = "vllm"\nbase_url = "{ready[1]}/v1"\ndefault = true\n')
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL", "PROMETHEUS"))}
        env["TMPDIR"] = str(tmp_path)
        command = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", f"127.0.0.1:{port}",
                   "--workers", "2"]
        url = f"http://127.0.0.1:{port}"
        with running(command, env) as gateway:
            wait_healthy(url, gateway)
            for _ in range(20):  # a connection each: the kernel spreads them over both workers
                with httpx.Client(base_url=url, timeout=10) as http:
                    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
            for _ in range(8):
                with httpx.Client(base_url=url, timeout=10) as http:
                    text = http.get("/metrics").text
                    assert total(text, "llm_proxy_requests_total", status="200") == 20
            # Both workers served some: each counted into its own file.
            [directory] = tmp_path.glob("llm-proxy-metrics-*")
            assert len(list(directory.glob("counter_*.db"))) == 2
    # The workers' count files go with the gateway.
    assert not list(tmp_path.glob("llm-proxy-metrics-*"))



async def test_first_token_latency_is_told_apart_by_kind() -> None:
    # A speech stream's first audio bytes and a chat's first token were one histogram series
    # per model: under `model=""` (every name the gateway does not know) they were averaged.
    fake = OpenAIBackend(default=Script(tokens=["a", "b"]))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async for _chunk in await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True):
            pass
        async with client.audio.speech.with_streaming_response.create(model="tts", voice="af", input="Hi.") as speech:
            assert await speech.read()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            text = (await http.get("/metrics")).text
        await client.close()
    first_token = "llm_proxy_time_to_first_token_seconds_count"
    assert total(text, first_token, kind="chat", backend="vllm") == 1
    assert total(text, first_token, kind="speech", backend="vllm") == 1


async def test_token_counts_and_model_loads_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """Claude Code counts tokens before nearly every turn and `ollama run` preloads its model:
    the gateway answers these without a chat, and an operator must still see each one (its
    own `kind`, its model, backend, status, time and key) in the log and in `/metrics`."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    vllm, local = OpenAIBackend(), OllamaBackend(models=["llama3.2"])
    async with (
        vllm.serve() as vllm_server, local.serve() as ollama_server,
        running_gateway(
            backend("vllm", vllm_server.url, models=("m",), default=True),
            backend("ollama", ollama_server.url, kind="ollama", models=("llama3.2",)),
            access_log=True,
        ) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        counted = await claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "How many?"}])
        assert counted.input_tokens > 0
        gpt = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert (await gpt.responses.input_tokens.count(model="m", input="How many?")).input_tokens > 0
        bad = await http.post("/v1/responses/input_tokens", json={"model": "m", "input": "x", "stream": True})
        assert bad.status_code == 400
        ollama_client = ollama.AsyncClient(host=url)
        assert (await ollama_client.generate(model="llama3.2", prompt="")).done_reason == "load"
        assert (await ollama_client.chat(model="m", messages=[])).done_reason == "load"
        assert (await ollama_client.generate(model="llama3.2", keep_alive=0)).done_reason == "unload"

        async def scraped() -> str | None:
            text = (await http.get("/metrics")).text
            return text if total(text, "llm_proxy_requests_total", kind="unload") else None

        text = await eventually(scraped)

    ok = {"status": "200", "outcome": "ok"}
    assert total(text, "llm_proxy_requests_total", kind="count_tokens", dialect="anthropic", model="m", backend="vllm", **ok) == 1
    assert total(text, "llm_proxy_requests_total", kind="count_tokens", dialect="responses", model="m", backend="vllm", **ok) == 1
    assert total(text, "llm_proxy_requests_total", kind="count_tokens", status="400", outcome="error") == 1
    assert total(text, "llm_proxy_requests_total", kind="preload", dialect="ollama", model="llama3.2", backend="ollama", **ok) == 1
    assert total(text, "llm_proxy_requests_total", kind="preload", dialect="ollama", model="m", backend="vllm", **ok) == 1
    assert total(text, "llm_proxy_requests_total", kind="unload", model="llama3.2", backend="ollama", **ok) == 1
    assert total(text, "llm_proxy_requests_total", kind="chat") == 0
    assert total(text, "llm_proxy_prompt_tokens_total") == 0  # nothing was generated

    names = ("kind", "dialect", "model", "backend", "status", "api_key_id")
    lines = [{name: getattr(r, name, None) for name in names} for r in caplog.records if r.name == REQUEST_LOGGER]
    assert lines == [
        {"kind": "count_tokens", "dialect": "anthropic", "model": "m", "backend": "vllm", "status": 200, "api_key_id": None},
        {"kind": "count_tokens", "dialect": "responses", "model": "m", "backend": "vllm", "status": 200, "api_key_id": None},
        {"kind": "count_tokens", "dialect": "responses", "model": "m", "backend": "", "status": 400, "api_key_id": None},
        {"kind": "preload", "dialect": "ollama", "model": "llama3.2", "backend": "ollama", "status": 200, "api_key_id": None},
        {"kind": "preload", "dialect": "ollama", "model": "m", "backend": "vllm", "status": 200, "api_key_id": None},
        {"kind": "unload", "dialect": "ollama", "model": "llama3.2", "backend": "ollama", "status": 200, "api_key_id": None},
    ]
    logged = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert all(isinstance(getattr(r, "total_ms", None), float) for r in logged)
    assert not any("How many?" in r.getMessage() or "How many?" in str(r.__dict__) for r in logged)  # never the prompt
