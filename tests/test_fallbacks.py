"""`[fallbacks]`: a model whose backend cannot answer is stood in for by another model, on
another backend, as long as the client has received nothing yet — on real servers."""

from __future__ import annotations

from dataclasses import replace

import httpx
import openai
import pytest
import trio

from proxy.config import ConfigError, Timeouts, load_settings
from proxy.dialects.events import Finished
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script
from tests.harness import backend, hang_up_once_received, refusing_port, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_persistence import rows, stream_frames, wait_for_row

pytest_plugins = ["tests.infra_servers"]

ASK = [{"role": "user", "content": "hi"}]


def _chats(fake: OpenAIBackend) -> list[str]:
    return [r.json["model"] for r in fake.requests if r.path.endswith("/chat/completions")]


async def test_a_model_whose_backend_is_down_is_answered_by_its_stand_in() -> None:
    small = OpenAIBackend(default=Script(tokens=["from", " small"]))
    down = f"http://127.0.0.1:{refusing_port()}"
    async with small.serve() as server, running_gateway(
        backend("big", down, models=("qwen3-32b",)),
        backend("small", server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="qwen3-32b", messages=ASK)
        assert raw.headers["x-fallback-model"] == "qwen3-8b"
        assert raw.parse().choices[0].message.content == "from small"
        stream = await client.chat.completions.create(model="qwen3-32b", messages=ASK, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "from small"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            # The metrics count the answer where it was made.
            metrics = (await http.get("/metrics")).text
            # A model that has no stand-in fails as before.
            alone = await http.post("/v1/chat/completions", json={"model": "qwen3-32b-solo", "messages": ASK})
    assert _chats(small) == ["qwen3-8b", "qwen3-8b"]
    assert 'backend="small",dialect="openai",kind="chat",model="qwen3-32b"' in metrics
    assert alone.status_code == 404


@pytest.mark.parametrize(("status", "falls_back"), [(500, True), (502, True), (503, True), (429, True), (400, False), (409, False)])
async def test_which_backend_errors_make_a_request_fall_back(status: int, falls_back: bool) -> None:
    big, small = OpenAIBackend(default=Script(status=status)), OpenAIBackend(default=Script(tokens=["small"]))
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, default=True),
        backend("small", small_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK})
    if falls_back:
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "small"
    else:  # the request itself is at fault: another model would refuse it too
        assert answer.status_code == status and "x-fallback-model" not in answer.headers
        assert _chats(small) == []


async def test_a_stream_that_broke_after_its_first_byte_is_not_restarted_elsewhere() -> None:
    big = OpenAIBackend(default=Script(tokens=["a", "b", "c", "d"], fail_after=3))
    small = OpenAIBackend(default=Script(tokens=["small"]))
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, default=True),
        backend("small", small_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = (await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK, "stream": True})).text
    assert '"error"' in body and "small" not in body
    assert _chats(small) == []


async def test_stand_ins_are_tried_in_order_from_any_dialect() -> None:
    last = OllamaBackend(default=Script(tokens=["last", " resort"]))
    downs = [f"http://127.0.0.1:{refusing_port()}" for _ in range(2)]
    async with last.serve() as server, running_gateway(
        backend("big", downs[0], models=("big",)),
        backend("mid", downs[1], models=("mid",)),
        backend("local", server.url, kind="ollama", models=("llama3.2",)),
        fallbacks={"big": ("mid", "llama3.2")},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/api/chat", json={"model": "big", "messages": ASK, "stream": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"] == "last resort"
    assert answer.headers["x-fallback-model"] == "llama3.2"


def test_fallbacks_are_validated_at_start_up(tmp_path: pytest.TempPathFactory) -> None:
    config = tmp_path / "g.toml"  # type: ignore[operator]
    config.write_text('[fallbacks]\n"qwen3-32b" = ["qwen3-8b", "llama3.2"]\n')
    assert load_settings(config, environ={}).fallbacks == {"qwen3-32b": ("qwen3-8b", "llama3.2")}
    for bad, message in (
        ('"a" = ["a"]', "`fallbacks.a` lists the model itself"),
        ('"a" = ["b", "b"]', "`fallbacks.a` lists a model twice"),
        ('"a" = []', "`fallbacks.a` must list at least one model"),
        ('"a" = "b"', "`fallbacks.a` must be of type array"),
    ):
        config.write_text(f"[fallbacks]\n{bad}\n")
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_settings(config, environ={})


async def test_the_completion_log_names_the_backend_that_answered(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    small = OpenAIBackend(default=Script(tokens=["logged"]))
    async with small.serve() as server, running_gateway(
        backend("big", f"http://127.0.0.1:{refusing_port()}", default=True),
        backend("small", server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
        database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        keyed = {"idempotency-key": "fallback-1"}
        first = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK}, headers=keyed)
        again = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK}, headers=keyed)
        row = await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
        [(logged_backend, upstream)] = await trio.to_thread.run_sync(
            rows, pg_database_url, "SELECT backend, upstream_model FROM chat_log WHERE trace_id = %s",
            first.headers["x-trace-id"],
        )
        # A stand-in's answer is not the model's: the exact cache does not keep it.
        cached = {"x-cache": "exact"}
        for _ in range(2):
            answer = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK}, headers=cached)
            assert answer.headers["x-cache"] == "miss"
            await wait_for_row(pg_database_url, answer.headers["x-trace-id"], "completed")
    assert first.json()["choices"][0]["message"]["content"] == "logged" == again.json()["choices"][0]["message"]["content"]
    assert row[0] == "completed"
    assert (logged_backend, upstream) == ("small", "qwen3-8b")
    assert _chats(small) == ["qwen3-8b"] * 3  # the replay made no call; each cache miss one


async def test_an_idempotent_replay_of_a_stand_ins_answer_names_the_stand_in(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    small = OpenAIBackend(default=Script(tokens=["stood", " in"]))
    # The stand-in is an alias: the journal keeps the upstream model, the header the name.
    async with small.serve() as server, running_gateway(
        backend("big", f"http://127.0.0.1:{refusing_port()}", default=True),
        backend("small", server.url, models=("qwen3-8b",)),
        aliases={"small-model": "qwen3-8b"},
        fallbacks={"qwen3-32b": ("small-model",)},
        database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answers = []
        for stream in (False, True):
            body = {"model": "qwen3-32b", "messages": ASK, "stream": stream}
            keyed = {"idempotency-key": f"replayed-stand-in-{stream}"}
            first = await http.post("/v1/chat/completions", json=body, headers=keyed)
            await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
            again = await http.post("/v1/chat/completions", json=body, headers=keyed)
            answers.append((first, again))
    for first, again in answers:
        assert again.headers.get("idempotent-replayed") == "true"
        assert first.headers["x-fallback-model"] == "small-model" == again.headers.get("x-fallback-model")
    (whole, whole_again), (streamed, streamed_again) = answers
    assert whole.json()["choices"][0]["message"]["content"] == "stood in" == whole_again.json()["choices"][0]["message"]["content"]
    assert "stood" in streamed.text and "stood" in streamed_again.text
    assert _chats(small) == ["qwen3-8b"] * 2  # the replays made no call


async def test_a_live_run_a_stand_in_answers_is_named_to_those_who_follow_it(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    small = OpenAIBackend(default=Script(n_tokens=20, pace=0.05))
    async with small.serve() as server, running_gateway(
        backend("big", f"http://127.0.0.1:{refusing_port()}", default=True),
        backend("small", server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
        database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = {"model": "qwen3-32b", "messages": ASK, "stream": True}
        keyed = {"idempotency-key": "followed-stand-in"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=keyed) as first:
            chunks = first.aiter_bytes()
            await chunks.__anext__()  # the stand-in has begun
            trace_id = first.headers["x-trace-id"]
            followers: dict[str, httpx.Response] = {}

            async def attach() -> None:
                followers["attached"] = await http.post("/v1/chat/completions", json=body, headers=keyed)

            async def resume() -> None:
                followers["resumed"] = await http.get(f"/v1/streams/{trace_id}")

            async with trio.open_nursery() as nursery:  # while the run is live
                nursery.start_soon(attach)
                nursery.start_soon(resume)
                async for _ in chunks:
                    pass
    attached, resumed = followers["attached"], followers["resumed"]
    assert first.headers["x-fallback-model"] == "qwen3-8b"
    assert attached.headers["x-attached-to"] == trace_id and attached.headers.get("x-fallback-model") == "qwen3-8b"
    finished = stream_frames(resumed.text)[-1][1]
    assert isinstance(finished, Finished) and finished.winner == "qwen3-8b"
    assert _chats(small) == ["qwen3-8b"]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_run_a_stand_in_answers_is_named_to_a_retry_waiting_on_another_instance(
    aio_loop: object, pg_database_url: str, nats_url: str, streamed: bool
) -> None:
    """A retry that reaches another instance while its key's run goes on reads that run's
    events through NATS: the stand-in that answered is named to it too. A streamed retry's
    head waits for the run's first event, which says it (it went without any of the answer's
    headers)."""
    small = OpenAIBackend(default=Script(n_tokens=20, pace=0.05))
    gateway = {
        "fallbacks": {"qwen3-32b": ("qwen3-8b",)}, "database_url": pg_database_url, "nats_url": nats_url,
    }
    down = f"http://127.0.0.1:{refusing_port()}"
    async with small.serve() as server, running_gateway(
        backend("big", down, default=True), backend("small", server.url, models=("qwen3-8b",)), **gateway
    ) as first_url, running_gateway(
        backend("big", down, default=True), backend("small", server.url, models=("qwen3-8b",)), **gateway
    ) as second_url, httpx.AsyncClient(timeout=20) as http:
        body = {"model": "qwen3-32b", "messages": ASK}
        keyed = {"idempotency-key": f"stand-in-elsewhere-{streamed}-{pg_database_url[-12:]}"}
        async with http.stream("POST", f"{first_url}/v1/chat/completions", json=body | {"stream": True},
                               headers=keyed) as first:
            chunks = first.aiter_bytes()
            await chunks.__anext__()  # the stand-in has begun
            retry = await http.post(f"{second_url}/v1/chat/completions", json=body | {"stream": streamed}, headers=keyed)
            async for _ in chunks:
                pass
    assert first.headers["x-fallback-model"] == "qwen3-8b"
    assert retry.status_code == 200 and retry.headers["x-attached-to"] == first.headers["x-trace-id"]
    assert retry.headers.get("x-fallback-model") == "qwen3-8b"
    assert ("data: [DONE]" in retry.text) is streamed
    assert _chats(small) == ["qwen3-8b"]


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_backend_that_fails_before_its_first_token_with_a_200_falls_back(kind: str) -> None:
    # Ollama answers 200 and then `{"error": ...}` when a model cannot load.
    fake = OpenAIBackend if kind == "openai" else OllamaBackend
    big = fake(default=Script(tokens=["a", "b"], fail_after=0))
    small = OpenAIBackend(default=Script(tokens=["small"]))
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, kind=kind, default=True),
        backend("small", small_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        streamed = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK, "stream": True})
    assert streamed.headers["x-fallback-model"] == "qwen3-8b"
    assert "small" in streamed.text and '"error"' not in streamed.text


async def test_an_alias_or_the_latest_tag_finds_the_models_stand_ins() -> None:
    small = OpenAIBackend(default=Script(tokens=["small"]))
    down = f"http://127.0.0.1:{refusing_port()}"
    async with small.serve() as server, running_gateway(
        backend("big", down, kind="ollama", models=("llama3.2", "qwen3-32b")),
        backend("small", server.url, models=("qwen3-8b",)),
        aliases={"gpt-4o": "qwen3-32b"},
        fallbacks={"llama3.2": ("qwen3-8b",), "qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for model in ("llama3.2:latest", "gpt-4o"):
            answer = await http.post("/v1/chat/completions", json={"model": model, "messages": ASK})
            assert answer.status_code == 200, (model, answer.text)
            assert answer.headers["x-fallback-model"] == "qwen3-8b"


async def test_a_client_that_leaves_while_the_model_is_silent_is_not_handed_to_a_stand_in() -> None:
    big = OpenAIBackend(default=Script(stall_before_headers=True))
    small = OpenAIBackend(default=Script(tokens=["small"]))
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, default=True),
        backend("small", small_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await hang_up_once_received(big, lambda: http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK}))
            await big.wait_disconnect()
            await trio.sleep(0.2)  # what a stand-in call would have taken to start

            async def counted_lines() -> list[str]:
                metrics = (await http.get("/metrics")).text
                return [line for line in metrics.splitlines() if line.startswith("llm_proxy_requests_total{")]

            [counted] = await eventually(counted_lines)  # counted once the cancelled handler has ended
    assert _chats(small) == []
    assert 'backend="big"' in counted and 'outcome="cancelled"' in counted


async def test_the_first_backends_total_timeout_bounds_its_stand_ins_too() -> None:
    big, small = OpenAIBackend(default=Script(stall_before_headers=True)), OpenAIBackend(default=Script(stall_before_headers=True))
    quick = Timeouts(connect=2.0, first_token=0.5, idle=10.0, total=1.5)
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, default=True, timeouts=quick),
        backend("small", small_server.url, models=("qwen3-8b",), timeouts=replace(quick, first_token=30.0, total=30.0)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = trio.current_time()
        answer = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK, "stream": True})
        took = trio.current_time() - started
    assert answer.status_code == 504 and answer.headers["x-fallback-model"] == "qwen3-8b"
    assert _chats(small) == ["qwen3-8b"]
    assert took < 10  # not the stand-in's own 30 s


# An agent's turn after a failed bash command, with an Anthropic-defined tool and its own.
_LOOKUP = {"name": "lookup", "description": "Look a word up.", "input_schema": {"type": "object", "properties": {}}}
_AGENT_TURN = {
    "max_tokens": 100,
    "tools": [{"type": "bash_20250124", "name": "bash"}, _LOOKUP],
    "messages": [
        {"role": "user", "content": "list /nope"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "ls /nope"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ls: cannot access '/nope'", "is_error": True},
        ]},
    ],
}


def _down() -> str:
    return f"http://127.0.0.1:{refusing_port()}"


async def test_an_anthropic_clients_request_is_translated_for_a_stand_in_of_another_kind() -> None:
    vllm = OpenAIBackend(default=Script(tokens=["no such directory"]))
    async with vllm.serve() as server, running_gateway(
        backend("claude", _down(), kind="anthropic", models=("claude-sonnet-4-5",)),
        backend("vllm", server.url, models=("qwen3-8b",)),
        fallbacks={"claude-sonnet-4-5": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/v1/messages", json={"model": "claude-sonnet-4-5", **_AGENT_TURN})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-fallback-model"] == "qwen3-8b"
    [sent] = [r.json for r in vllm.requests if r.path.endswith("/chat/completions")]
    # The bash tool as the function tool the model can call, not dropped; the failed call said.
    assert [tool["function"]["name"] for tool in sent["tools"]] == ["bash", "lookup"]
    assert "command" in sent["tools"][0]["function"]["parameters"]["properties"]
    [result] = [m for m in sent["messages"] if m["role"] == "tool"]
    assert str(result["content"]).startswith("Error: ls: cannot access")


async def test_a_claude_stand_in_gets_the_anthropic_clients_request_as_sent() -> None:
    claude = AnthropicBackend(default=Script(tokens=["no such directory"]))
    async with claude.serve() as server, running_gateway(
        backend("vllm", _down(), models=("qwen3-32b",)),
        backend("claude", server.url, kind="anthropic", models=("claude-sonnet-4-5",)),
        fallbacks={"qwen3-32b": ("claude-sonnet-4-5",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.post("/v1/messages", json={"model": "qwen3-32b", **_AGENT_TURN})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-fallback-model"] == "claude-sonnet-4-5"
    [sent] = [r.json for r in claude.requests if r.path == "/v1/messages"]
    # Claude runs its bash tool natively: it gets the tool's type, not a function tool of its schema.
    assert sent["tools"][0] == {"type": "bash_20250124", "name": "bash"}
    assert [tool["name"] for tool in sent["tools"]] == ["bash", "lookup"]
    [result] = [block for block in sent["messages"][-1]["content"] if block["type"] == "tool_result"]
    assert result["is_error"] is True
    assert "Error:" not in str(result["content"])


async def test_a_stand_in_that_cannot_be_given_the_request_is_passed_over() -> None:
    vllm, claude = OpenAIBackend(default=Script(tokens=["vllm"])), AnthropicBackend(default=Script(tokens=["searched"]))
    web_search = {**_AGENT_TURN, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    async with vllm.serve() as vllm_server, claude.serve() as claude_server, running_gateway(
        backend("claude", _down(), kind="anthropic", models=("claude-sonnet-4-5", "claude-solo")),
        backend("vllm", vllm_server.url, models=("qwen3-8b",)),
        backend("claude-too", claude_server.url, kind="anthropic", models=("claude-haiku-4-5",)),
        fallbacks={"claude-sonnet-4-5": ("qwen3-8b", "claude-haiku-4-5"), "claude-solo": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        # A server tool: vLLM cannot offer it, so the next stand-in (Claude) answers.
        answer = await http.post("/v1/messages", json={"model": "claude-sonnet-4-5", **web_search})
        # With no stand-in able to take it, the model's own failure is the answer, not the stand-in's 400.
        alone = await http.post("/v1/messages", json={"model": "claude-solo", **web_search})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-fallback-model"] == "claude-haiku-4-5"
    assert answer.json()["content"][0]["text"] == "searched"
    assert alone.status_code >= 500 and alone.json()["error"]["type"] != "invalid_request_error", alone.text
    assert "x-fallback-model" not in alone.headers
    assert vllm.requests == []


async def test_openai_and_ollama_clients_requests_are_checked_for_each_stand_in() -> None:
    claude, vllm = AnthropicBackend(default=Script(tokens=["claude"])), OpenAIBackend(default=Script(tokens=["vllm"]))
    async with claude.serve() as claude_server, vllm.serve() as vllm_server, running_gateway(
        backend("big", _down(), models=("qwen3-32b",)),
        backend("ollama-big", _down(), kind="ollama", models=("codellama",)),
        backend("claude", claude_server.url, kind="anthropic", models=("claude-haiku-4-5",)),
        backend("vllm", vllm_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("claude-haiku-4-5", "qwen3-8b"), "codellama": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        # Log probabilities, which Anthropic does not give: the Claude stand-in is passed over.
        logprobs = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK, "logprobs": True})
        # Fill-in-the-middle only Ollama does: a vLLM stand-in would complete the wrong text.
        suffix = await http.post(
            "/api/generate", json={"model": "codellama", "prompt": "def f(", "suffix": "return x", "stream": False},
        )
    assert logprobs.status_code == 200, logprobs.text
    assert logprobs.headers["x-fallback-model"] == "qwen3-8b"
    assert claude.requests == []
    assert suffix.status_code >= 500 and "suffix" not in suffix.text, suffix.text
    assert [r.json["model"] for r in vllm.requests if r.path.endswith("/chat/completions")] == ["qwen3-8b"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/chat"])
async def test_a_whole_answer_from_a_silent_model_comes_from_its_stand_in_after_the_first_token_timeout(
    path: str,
) -> None:
    # Only `total` bounded a whole answer, and the stand-ins share it: the first-token clock
    # now finds the silent model in time.
    big, small = OpenAIBackend(default=Script(stall_before_headers=True)), OpenAIBackend(default=Script(tokens=["small"]))
    quick = Timeouts(connect=2.0, first_token=1.0, idle=10.0, total=4.0)
    body = {"model": "qwen3-32b", "messages": ASK, "stream": False, **({"max_tokens": 9} if path == "/v1/messages" else {})}
    async with big.serve() as big_server, small.serve() as small_server, running_gateway(
        backend("big", big_server.url, default=True, timeouts=quick),
        backend("small", small_server.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        started = trio.current_time()
        answer = await http.post(path, json=body)
        took = trio.current_time() - started
    assert answer.status_code == 200 and answer.headers["x-fallback-model"] == "qwen3-8b"
    assert "small" in answer.text and ("usage" in answer.text or "eval_count" in answer.text)
    assert took < 3.0
