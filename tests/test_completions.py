"""OpenAI's legacy text completions (`POST /v1/completions`) with the official `openai` SDK,
relayed to fake OpenAI-compatible and Ollama backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import trio

from proxy.config import Timeouts
from tests.fakes import OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, hang_up_once_received, refusing_port, running_gateway
from tests.test_auth_helpers import bearer, eventually, gateway, keys_cli, new_key, wait_for_key
from tests.test_metrics import total

pytest_plugins = ["tests.infra_servers"]


@dataclass
class Setup:
    fake: OpenAIBackend
    url: str
    client: openai.AsyncOpenAI


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = OpenAIBackend()
    async with (
        fake.serve() as server,
        running_gateway(
            backend("vllm", server.url, default=True),
            backend("claude", "http://127.0.0.1:9", kind="anthropic", prefixes=("claude",)),
            aliases={"coder": "qwen2.5-coder-7b"},
        ) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield Setup(fake, url, client)
        await client.close()


async def test_non_streaming_text_with_suffix(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["return", " a + b"], usage=Usage(12, 2)))
    reply = await setup.client.completions.create(
        model="m", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))", max_tokens=16, temperature=0.2,
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "return a + b" and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (12, 2)
    sent = setup.fake.requests[-1]
    assert sent.path == "/v1/completions"
    assert sent.json == {
        "model": "m", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))", "max_tokens": 16,
        "temperature": 0.2,
    }


@pytest.mark.parametrize(("header", "value"), [("x-pipeline", "fanout"), ("x-workspace", "docs"), ("x-route", "rag")])
async def test_a_route_header_on_a_relayed_call_is_a_400_not_ignored(setup: Setup, header: str, value: str) -> None:
    # Ignored, the client got the model's plain answer and took it for the pipeline's (or RAG's).
    asked = len(setup.fake.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        await setup.client.completions.create(model="m", prompt="x", extra_headers={header: value})
    assert refused.value.param == header and len(setup.fake.requests) == asked
    await setup.client.completions.create(model="m", prompt="x", extra_headers={"x-route": "direct"})


async def test_streaming_text_is_relayed_as_sent(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["x", " = ", "1"], usage=Usage(5, 3)))
    stream = await setup.client.completions.create(
        model="m", prompt="# set x\n", suffix="\nprint(x)", stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x = 1"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    sent = setup.fake.requests[-1].json
    assert sent["suffix"] == "\nprint(x)" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    # Byte for byte: the backend's frames, its `[DONE]` included.
    async with httpx.AsyncClient(base_url=setup.url) as client:
        response = await client.post("/v1/completions", json={"model": "m", "prompt": "a", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [line for line in response.text.split("\n\n") if line]
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["object"] == "text_completion"


async def test_token_prompts_are_forwarded(setup: Setup) -> None:
    for prompt in ([1, 2, 3], [[1, 2], [3]], ["a", "b"]):
        reply = await setup.client.completions.create(model="m", prompt=prompt)
        assert reply.choices[0].text
        assert setup.fake.requests[-1].json["prompt"] == prompt


async def test_alias_reaches_the_backend_as_its_upstream_model(setup: Setup) -> None:
    await setup.client.completions.create(model="coder", prompt="x")
    assert setup.fake.requests[-1].json["model"] == "qwen2.5-coder-7b"


async def test_unknown_model_is_a_404() -> None:
    fake = OpenAIBackend(models=("m",))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, models=("m",))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            await client.completions.create(model="no-such-model", prompt="x")
        assert info.value.code == "model_not_found"
        await client.close()
    assert not [r for r in fake.requests if r.path == "/v1/completions"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "", "prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "suffix": 3}, "suffix"),
    ],
)
async def test_invalid_body_is_a_400_naming_the_field(setup: Setup, body: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.post("/completions", body=body, cast_to=httpx.Response)
    assert info.value.param == param
    assert not setup.fake.requests


async def test_body_that_is_not_an_object_is_a_400(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as client:
        response = await client.post("/v1/completions", content=b"[1]", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_model_on_an_anthropic_backend_is_a_400(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.completions.create(model="claude-sonnet-4", prompt="x")
    assert "OpenAI-compatible or Ollama backend" in info.value.message
    assert info.value.param == "model"


async def test_a_refused_completion_is_counted_as_a_completion_not_a_chat(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError):
        await setup.client.completions.create(model="claude-sonnet-4", prompt="x")
    async with httpx.AsyncClient(base_url=setup.url) as http:
        text = (await http.get("/metrics")).text
    refused = {"source": "refused", "status": "400", "outcome": "error"}
    assert total(text, "llm_proxy_requests_total", kind="completion", **refused) == 1
    assert total(text, "llm_proxy_requests_total", kind="chat") == 0


async def test_unreachable_backend_is_a_503() -> None:
    port = refusing_port()
    async with running_gateway(backend("dead", f"http://127.0.0.1:{port}", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model="m", prompt="x", stream=stream)
            assert info.value.status_code == 503 and "unreachable" in info.value.message
        await client.close()


async def test_a_model_whose_backend_cannot_answer_is_answered_by_its_stand_in() -> None:
    """`[fallbacks]` holds for the relayed APIs as for chats: a completion (streamed or not)
    and a rerank whose backend is down reach the stand-in, which the answer names."""
    port = refusing_port()
    local = OllamaBackend(default=Script(tokens=["fim", " text"]))
    spare = OpenAIBackend()
    async with local.serve() as ollama_server, spare.serve() as spare_server, running_gateway(
        backend("dead", f"http://127.0.0.1:{port}", models=("coder", "reranker")),
        backend("ollama", ollama_server.url, kind="ollama", models=("qwen2.5-coder:7b",)),
        backend("spare", spare_server.url, models=("bge-reranker",)),
        fallbacks={"coder": ("qwen2.5-coder:7b",), "reranker": ("bge-reranker",)},
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        raw = await client.completions.with_raw_response.create(model="coder", prompt="def f(")
        assert raw.parse().choices[0].text == "fim text" and raw.headers["x-fallback-model"] == "qwen2.5-coder:7b"
        stream = await client.completions.create(model="coder", prompt="def f(", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "fim text"
        await client.close()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            reranked = await http.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["a", "b"]})
        assert reranked.status_code == 200 and reranked.headers["x-fallback-model"] == "bge-reranker"
    assert [r.json["model"] for r in local.requests if r.path == "/v1/completions"] == ["qwen2.5-coder:7b"] * 2
    assert [r.json["model"] for r in spare.requests if r.path == "/v1/rerank"] == ["bge-reranker"]


async def test_backend_error_is_relayed_with_its_status(setup: Setup) -> None:
    setup.fake.set_script(Script(status=500, error_message="engine crashed"))
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await setup.client.completions.create(model="m", prompt="x", stream=stream)
        assert info.value.status_code == 500 and "engine crashed" in info.value.message
    # A body that is not OpenAI's error shape is the gateway's own error, in OpenAI's shape.
    setup.fake.set_script(Script(status=502, error_body=b"<html>bad gateway</html>"))
    with pytest.raises(openai.APIStatusError) as answer:
        await setup.client.completions.create(model="m", prompt="x")
    assert answer.value.status_code == 502 and "bad gateway" in answer.value.message


@pytest.mark.parametrize("error_body", [
    # vLLM: OpenAI's shape, with its own type and the status as `code`.
    {"error": {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
               "type": "BadRequestError", "param": None, "code": 400}},
    # llama.cpp
    {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
               "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}},
])
async def test_a_prompt_too_long_is_context_length_exceeded(setup: Setup, error_body: dict[str, object]) -> None:
    setup.fake.set_script(Script(status=400, error_body=error_body))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await setup.client.completions.create(model="m", prompt="x" * 100, stream=stream)
        assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
        assert isinstance(info.value.body, dict) and "context" in info.value.body["message"]


async def test_a_fastapi_validation_error_is_said_with_its_field(setup: Setup) -> None:
    body = {"detail": [{"loc": ["body", "logprobs"], "msg": "Input should be less than or equal to 20", "type": "x"}]}
    setup.fake.set_script(Script(status=422, error_body=body))
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await setup.client.completions.create(model="m", prompt="x", logprobs=99, stream=stream)
        assert isinstance(info.value.body, dict)
        assert info.value.body["message"] == "logprobs: Input should be less than or equal to 20"
        assert info.value.param == "logprobs"


async def test_first_token_timeout_is_a_504() -> None:
    fake = OpenAIBackend(default=Script(stall_before_headers=True))
    quick = Timeouts(connect=2, first_token=0.3, idle=5, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model="m", prompt="x", stream=True)
        assert info.value.status_code == 504
        await fake.wait_disconnect(2.0)
        await client.close()


async def test_failure_mid_stream_ends_with_one_error_event() -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c", "d"], stall_after=2))
    quick = Timeouts(connect=2, first_token=5, idle=0.3, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        await fake.wait_disconnect(2.0)
    assert response.status_code == 200
    frames = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert [f["choices"][0]["text"] for f in frames[:-1]] == ["a", "b"]
    assert "idle" in frames[-1]["error"]["message"]


async def test_disconnect_mid_stream_closes_the_backend_request(setup: Setup) -> None:
    setup.fake.set_script(Script(n_tokens=1000, pace=0.01))
    async with httpx.AsyncClient(base_url=setup.url) as client:
        async with client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as response:
            lines = response.aiter_lines()
            for _ in range(6):
                await lines.__anext__()
    gone = await setup.fake.wait_disconnect(2.0)
    assert 0 < gone.frames_sent < 1000
    await setup.fake.wait_idle(2.0)


async def test_disconnect_while_waiting_closes_the_backend_request(setup: Setup) -> None:
    setup.fake.set_script(Script(n_tokens=100, pace=0.2))  # a 20 s generation
    async with httpx.AsyncClient(base_url=setup.url) as client:
        await hang_up_once_received(setup.fake, lambda: client.post("/v1/completions", json={"model": "m", "prompt": "x"}))
    await setup.fake.wait_disconnect(2.0)
    await setup.fake.wait_idle(2.0)


async def test_metrics_count_completions_with_their_tokens() -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c"], usage=Usage(7, 3)))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, models=("m",))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.completions.create(model="m", prompt="hi")
        async for _chunk in await client.completions.create(
            model="m", prompt="hi", stream=True, stream_options={"include_usage": True}
        ):
            pass
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            fake.set_script(Script(n_tokens=200, pace=0.02))
            async with http.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as response:
                async for _line in response.aiter_lines():
                    break

            async def counted() -> str | None:
                text = (await http.get("/metrics")).text
                return text if total(text, "llm_proxy_requests_total", outcome="cancelled") else None

            text = await eventually(counted)
        await client.close()
    served = {"kind": "completion", "dialect": "openai", "model": "m", "backend": "vllm", "source": "backend"}
    assert total(text, "llm_proxy_requests_total", **served, status="200", outcome="ok") == 2
    assert total(text, "llm_proxy_requests_total", **served, status="200", outcome="cancelled") == 1
    # The backend's usage for the two it answered; the one left early is charged an estimate.
    assert total(text, "llm_proxy_prompt_tokens_total", model="m", backend="vllm") == 2 * 7 + 1
    assert total(text, "llm_proxy_completion_tokens_total", model="m", backend="vllm") > 2 * 3
    assert total(text, "llm_proxy_time_to_first_token_seconds_count", model="m", backend="vllm") >= 1


async def test_ollama_backend_is_asked_on_its_openai_endpoint() -> None:
    fake = OllamaBackend(default=Script(tokens=["fim", " text"]))
    async with fake.serve() as server, running_gateway(backend("ollama", server.url, kind="ollama", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        reply = await client.completions.create(model="qwen2.5-coder:7b", prompt="def f(", suffix="):")
        assert reply.choices[0].text == "fim text"
        stream = await client.completions.create(model="qwen2.5-coder:7b", prompt="def f(", stream=True)
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == "fim text"
        await client.close()
    sent = [r for r in fake.requests if r.path == "/v1/completions"]
    assert len(sent) == 2 and sent[0].json["suffix"] == "):"


async def test_every_ending_gives_its_backend_connection_back(setup: Setup) -> None:
    # The replica's count of requests in flight picks the next replica: it must come back to
    # zero however a completion ended (whole, streamed, refused by the backend, client gone).
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as client:
        request = {"model": "m", "prompt": "x"}
        answer = await client.post("/v1/completions", json=request, headers={"x-request-id": "fim-42"})
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "fim-42"
        assert setup.fake.requests[-1].headers["x-request-id"] == "fim-42"
        assert (await client.post("/v1/completions", json={**request, "stream": True})).status_code == 200
        setup.fake.set_script(Script(status=429, error_message="slow down"))
        refused = await client.post("/v1/completions", json=request)
        assert refused.status_code == 429 and refused.json()["error"]["message"] == "slow down"
        setup.fake.set_script(Script(n_tokens=500, pace=0.01))
        async with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
            async for _line in response.aiter_lines():
                break
        await setup.fake.wait_disconnect(2.0)

        async def settled() -> str | None:
            text = (await client.get("/metrics")).text
            return text if total(text, "llm_proxy_requests_total", outcome="cancelled") else None

        text = await eventually(settled)
    in_flight = [line for line in text.splitlines() if line.startswith("llm_proxy_backend_replica_in_flight{")]
    assert in_flight and all(line.endswith(" 0.0") for line in in_flight)


async def test_the_guard_applies_and_a_key_is_charged_its_tokens(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b"], usage=Usage(9, 2)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "fim", "--models", "coder-*")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"model": "coder-7b", "prompt": "def f(", "suffix": "):"}
            assert (await client.post("/v1/completions", json=body)).status_code == 401
            other = await client.post("/v1/completions", json={**body, "model": "llama3"}, headers=bearer(key))
            assert other.status_code == 403, other.text  # the key's model scope
            answer = await client.post("/v1/completions", json=body, headers=bearer(key))
            assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "ab"
            streamed = await client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}, headers=bearer(key))
            assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")

        async def listed() -> dict[str, object] | None:
            code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(pg_database_url, "list", "--json"))
            assert code == 0
            entry: dict[str, object] = json.loads(out.splitlines()[0])
            return entry if entry["prompt_tokens"] == 18 else None

        entry = await eventually(listed, within=10.0)
    assert entry["completion_tokens"] == 4


async def test_a_stream_without_usage_is_charged_an_estimate(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["a", "b", "c"], usage=Usage(50, 3)))
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as client:
        body = {"model": "m", "prompt": "x" * 40, "suffix": "y" * 8, "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200 and '"usage"' not in response.text  # not asked, not sent

        async def charged() -> str | None:
            text = (await client.get("/metrics")).text
            return text if total(text, "llm_proxy_prompt_tokens_total") else None

        text = await eventually(charged)
    assert total(text, "llm_proxy_prompt_tokens_total") == 12  # 48 characters
    assert total(text, "llm_proxy_completion_tokens_total") >= 3


async def test_the_total_timeout_bounds_whole_answers_and_streams() -> None:
    fake = OpenAIBackend(default=Script(n_tokens=100, pace=0.05))  # 5 s of generation
    quick = Timeouts(connect=2, first_token=5, idle=5, total=0.5)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            whole = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
            assert whole.status_code == 504 and "did not finish" in whole.json()["error"]["message"]
            await fake.wait_disconnect(2.0)
            streamed = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    assert streamed.status_code == 200
    frames = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line.startswith("data: ")]
    assert frames[0]["choices"][0]["text"] and "did not finish" in frames[-1]["error"]["message"]
