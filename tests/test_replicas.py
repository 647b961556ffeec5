"""A backend with replicas: requests shared by load, and a replica that is down or full
stood in for by another — on real servers (fake backends on loopback, the official SDK)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.config import ConfigError, Timeouts, load_settings
from proxy.infra.backends._replicas import create_client
from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script
from tests.harness import backend, refusing_port, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_transport import raw_server, read_request, reset

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chats(fake: OpenAIBackend) -> int:
    return sum(1 for request in fake.requests if request.path.endswith("/chat/completions"))


@asynccontextmanager
async def _replicated(
    *fakes: OpenAIBackend, extra_urls: tuple[str, ...] = (), timeouts: Timeouts | None = None, **settings: Any
) -> AsyncIterator[str]:
    """A gateway whose one backend has a replica per fake (then `extra_urls`)."""
    async with AsyncExitStack() as stack:
        urls = [f"{(await stack.enter_async_context(fake.serve())).url}/v1" for fake in fakes]
        urls += extra_urls
        config = replace(
            backend("vllm", "http://unused", default=True, timeouts=timeouts), base_url=urls[0], replicas=tuple(urls[1:])
        )
        yield await stack.enter_async_context(running_gateway(config, **settings))


def _url(fake: OpenAIBackend) -> str:
    assert fake.server is not None
    return f"{fake.server.url}/v1"


async def test_the_request_log_names_the_replica_that_answered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    first, second = OpenAIBackend(), OpenAIBackend()
    async with _replicated(first, second, access_log=True) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for body in (CHAT, {**CHAT, "stream": True}, {"model": "m", "prompt": "def f("}):
                path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
                for _ in range(2):
                    assert (await client.post(path, json=body)).status_code == 200
        replicas = {f"{server.url}/v1" for server in (first.server, second.server) if server is not None}
    logged = [getattr(r, "replica", None) for r in caplog.records if r.name == REQUEST_LOGGER]
    # Each pair of requests went to both replicas, and each line says which one answered it.
    assert len(logged) == 6 and set(logged) == replicas
    assert all(set(logged[i : i + 2]) == replicas for i in (0, 2, 4))


async def test_requests_are_shared_between_replicas() -> None:
    first, second = OpenAIBackend(), OpenAIBackend()
    async with _replicated(first, second) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(10):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert (_chats(first), _chats(second)) == (5, 5)


async def test_a_replica_busy_with_a_stream_gets_no_new_request_until_it_ends() -> None:
    busy, idle = OpenAIBackend(), OpenAIBackend()
    busy.set_script(Script(n_tokens=30, pace=0.05))
    idle.set_script(Script(n_tokens=30, pace=0.05))
    async with _replicated(busy, idle) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        streamed: list[str] = []

        async def stream() -> None:
            async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                streamed.append((await response.aread()).decode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)

            async def flowing() -> bool:
                return busy.active_streams + idle.active_streams > 0

            await eventually(flowing)
            streaming, other = (busy, idle) if busy.active_streams else (idle, busy)
            other.set_script(Script(tokens=["quick"]))
            for _ in range(4):
                answer = await client.post("/v1/chat/completions", json=CHAT)
                assert answer.json()["choices"][0]["message"]["content"] == "quick"
            assert (_chats(streaming), _chats(other)) == (1, 4)
        assert streamed and streamed[0].endswith("data: [DONE]\n\n")
        # The stream's end counts: the two replicas share the requests evenly again.
        streaming.set_script(Script(tokens=["quick"]))
        for _ in range(4):
            await client.post("/v1/chat/completions", json=CHAT)
        metrics = (await client.get("/metrics")).text
    assert (_chats(streaming), _chats(other)) == (3, 6)
    in_flight = [line for line in metrics.splitlines() if line.startswith("llm_proxy_backend_replica_in_flight{")]
    assert len(in_flight) == 2 and all(line.endswith(" 0.0") for line in in_flight)


async def test_a_replica_that_is_down_is_stood_in_for_and_then_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    up = OpenAIBackend(default=Script(tokens=["fine"]))
    down = f"http://127.0.0.1:{refusing_port()}/v1"  # nothing listens there
    async with _replicated(up, extra_urls=(down,)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "fine"
            chunks = [c async for c in await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            ready = await http.get("/ready")
            metrics = (await http.get("/metrics")).text
    assert _chats(up) == 6
    # Tried once, then set aside: one warning, not one per request.
    aside = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert len(aside) == 1 and down in aside[0].getMessage()
    # The backend serves, so it is ready; the replica that does not is shown, with why.
    assert ready.status_code == 200
    states = ready.json()["replicas"]["vllm"]
    assert states[down].startswith("set aside for ") and "cannot connect" in states[down]
    assert [v for k, v in states.items() if k != down] == ["ok"]
    assert f'llm_proxy_backend_replica_up{{backend="vllm",replica="{down}"}} 0.0' in metrics
    assert metrics.count("llm_proxy_backend_replica_up{") == 2


async def test_a_replica_that_answers_503_is_stood_in_for() -> None:
    full, free = OpenAIBackend(), OpenAIBackend(default=Script(tokens=["here"]))
    full.set_script(Script(status=503))
    async with _replicated(full, free) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(4):
            answer = await client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "here"
    assert _chats(free) == 4
    assert _chats(full) == 1  # set aside after its 503


async def test_every_replica_down_is_a_503_in_the_callers_dialect() -> None:
    urls = tuple(f"http://127.0.0.1:{refusing_port()}/v1" for _ in range(2))
    config = replace(backend("vllm", "http://unused", default=True), base_url=urls[0], replicas=urls[1:])
    async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(2):
            answer = await client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "backend_unreachable"


def test_base_url_takes_a_list_of_replicas_in_toml_and_a_comma_separated_one_in_the_environment(
    tmp_path: pytest.TempPathFactory,
) -> None:
    config = tmp_path / "llm-proxy.toml"  # type: ignore[operator]
    config.write_text(
        '[[backends]]\nname = "vllm"\nbase_url = ["http://gpu1:8000/v1/", "http://gpu2:8000/v1"]\ndefault = true\n'
    )
    [vllm] = load_settings(config, environ={}).backends
    assert vllm.urls == ("http://gpu1:8000/v1", "http://gpu2:8000/v1")
    [default] = load_settings(None, environ={"LLM_BASE_URL": "http://a:8000/v1, http://b:8000/v1"}).backends
    assert default.urls == ("http://a:8000/v1", "http://b:8000/v1")
    for bad, message in (
        ('["http://gpu1:8000/v1", "http://gpu1:8000/v1/"]', "lists one server twice"),
        ('["http://GPU1:80/v1", "http://gpu1/v1"]', "lists one server twice: 'http://GPU1:80/v1' and 'http://gpu1/v1'"),
        ("[]", "`backends[0].base_url` is required"),
        ('["http://gpu1:8000/v1", 3]', "`backends[0].base_url` must be a URL or a list of URLs"),
        ('["http://gpu1:8000/v1", "gpu2"]', "`backends[0].base_url` must be an http(s) URL"),
    ):
        config.write_text(f'[[backends]]\nname = "vllm"\nbase_url = {bad}\ndefault = true\n')
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            load_settings(config, environ={})


async def test_requests_in_flight_when_a_replica_fails_count_as_one_failure(caplog: pytest.LogCaptureFixture) -> None:
    up, full = OpenAIBackend(default=Script(tokens=["fine"])), OpenAIBackend()
    full.set_script(Script(status=503, header_delay=0.3))  # every request reaches it before it answers
    async with _replicated(up, full) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def chat() -> None:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(chat)
        states = (await client.get("/ready")).json()["replicas"]["vllm"]
    aside = [r for r in caplog.records if "set aside" in r.getMessage()]
    assert len(aside) == 1 and "for 5s" in aside[0].getMessage()
    [state] = [state for state in states.values() if state != "ok"]
    assert float(state.removeprefix("set aside for ").split("s")[0]) <= 5.0
    assert _chats(full) >= 2 and _chats(up) == 20


# Two replicas and a 6 s first-token budget: each replica may stay silent for 3 s. The
# client's own timeout (20 s) is far from both.
SHARED = Timeouts(connect=2.0, first_token=6.0, idle=10.0, total=60.0)
# A replica may stay silent for 1 s, whatever the budget.
QUICK = replace(SHARED, first_token=20.0, total=20.0, failover=1.0)
ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "hang",
    [Script(stall_before_headers=True), Script(stall_after=0)],
    ids=["no-response-head", "head-then-no-event"],
)
async def test_a_stream_from_a_replica_that_accepts_and_hangs_goes_to_another(
    hang: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    hung, healthy = OpenAIBackend(default=hang), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(hung, healthy, timeouts=SHARED, access_log=True) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for _ in range(4):
            chunks = [c async for c in await client.chat.completions.create(model="m", messages=ASK, stream=True)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            states = (await http.get("/ready")).json()["replicas"]["vllm"]
            metrics = (await http.get("/metrics")).text
        # The abandoned request was closed: the hung replica saw its client go.
        gone = await hung.wait_disconnect(1.0)
        hung_url, healthy_url = _url(hung), _url(healthy)
    assert gone.path == "/v1/chat/completions" and gone.frames_sent == 0
    # Set aside after it hung once: the following requests went straight to the other one.
    assert (_chats(hung), _chats(healthy)) == (1, 4)
    assert states[hung_url].startswith("set aside for ") and "sent no" in states[hung_url]
    assert f'llm_proxy_backend_replica_failovers_total{{backend="vllm",replica="{hung_url}"}} 1.0' in metrics
    assert f'llm_proxy_backend_replica_failovers_total{{backend="vllm",replica="{healthy_url}"}} 0.0' in metrics
    lines = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [(getattr(r, "status", None), getattr(r, "replica", None)) for r in lines] == [(200, healthy_url)] * 4
    assert [getattr(r, "passed_over", None) for r in lines].count([hung_url]) == 1


async def test_a_whole_answer_from_a_replica_that_accepts_and_hangs_comes_from_another() -> None:
    hung, healthy = OpenAIBackend(default=Script(stall_before_headers=True)), OpenAIBackend(default=Script(tokens=["fine"]))
    # A whole answer's head comes with the answer: its share is of `total` (half of 6 s here).
    async with _replicated(hung, healthy, timeouts=replace(SHARED, total=6.0)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for _ in range(3):
            answer = await client.chat.completions.create(model="m", messages=ASK)
            assert answer.choices[0].message.content == "fine"
        gone = await hung.wait_disconnect(1.0)
    assert not gone.headers_sent
    assert (_chats(hung), _chats(healthy)) == (1, 3)


async def test_timeouts_failover_sets_how_long_a_replica_may_stay_silent(tmp_path: pytest.TempPathFactory) -> None:
    config = tmp_path / "llm-proxy.toml"  # type: ignore[operator]
    config.write_text(
        '[timeouts]\nfailover = 20\n[[backends]]\nname = "vllm"\nbase_url = ["http://a/v1", "http://b/v1"]\n'
        'default = true\ntimeouts = { failover = 0.5 }\n'
    )
    [vllm] = load_settings(config, environ={}).backends
    assert vllm.timeouts.failover == 0.5 and vllm.timeouts.first_token == 300.0
    config.write_text('[timeouts]\nfailover = 20\n[[backends]]\nname = "vllm"\nbase_url = "http://a/v1"\ndefault = true\n')
    assert load_settings(config, environ={}).backends[0].timeouts.failover == 20.0
    assert Timeouts().failover is None  # not set: a share of the budget
    hung, healthy = OpenAIBackend(default=Script(stall_after=0)), OpenAIBackend(default=Script(tokens=["fine"]))
    # A 300 s first-token budget; the configured 0.5 s is what the hung replica gets.
    async with _replicated(hung, healthy, timeouts=replace(SHARED, first_token=300.0, failover=0.5)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            for body in ({**CHAT, "stream": True}, CHAT):
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
    assert (_chats(hung), _chats(healthy)) == (1, 2)


async def test_a_replica_that_sent_its_first_event_is_never_left_for_another() -> None:
    stalling = OpenAIBackend(default=Script(tokens=["a", "b", "c"], stall_after=2))
    other = OpenAIBackend(default=Script(tokens=["other"]))
    async with _replicated(stalling, other, timeouts=replace(SHARED, idle=1.0)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            for _ in range(2):
                async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
                    body = (await response.aread()).decode()
                if "other" not in body:
                    break
    # The client heard the role chunk and "a": the stall ends that stream with an error event;
    # the request is not sent again (the other replica got only the request that went there).
    assert response.status_code == 200 and '"a"' in body and '"b"' not in body
    assert body.rstrip().splitlines()[-1].startswith('data: {"error"') and "idle timeout" in body
    assert _chats(stalling) == 1 and _chats(other) <= 1


async def test_every_replica_silent_is_a_504_within_the_first_token_timeout() -> None:
    first, second = OpenAIBackend(default=Script(stall_before_headers=True)), OpenAIBackend(default=Script(stall_after=0))
    async with _replicated(first, second, timeouts=replace(SHARED, first_token=2.0)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        # Both were asked in turn, and both requests closed.
        await first.wait_disconnect(1.0)
        await second.wait_disconnect(1.0)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "backend_timeout"
    assert "first token within 2s" in answer.json()["error"]["message"]
    assert (_chats(first), _chats(second)) == (1, 1)


async def test_a_hung_replica_is_stood_in_for_by_its_twin_before_any_fallback_model() -> None:
    hung, healthy = OpenAIBackend(default=Script(stall_after=0)), OpenAIBackend(default=Script(tokens=["twin"]))
    stand_in = OpenAIBackend(default=Script(tokens=["stand-in"]))
    async with hung.serve() as a, healthy.serve() as b, stand_in.serve() as c, running_gateway(
        replace(backend("vllm", a.url, default=True, timeouts=QUICK), replicas=(f"{b.url}/v1",)),
        backend("small", c.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
        for stream in (True, False, True):
            body = {"model": "qwen3-32b", "messages": ASK, "stream": stream}
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and "twin" in answer.text
            assert "x-fallback-model" not in answer.headers
    assert (_chats(hung), _chats(healthy), _chats(stand_in)) == (1, 3, 0)


async def test_a_replica_whose_server_accepts_but_never_reads_is_left_and_its_connection_closed() -> None:
    # A paused container: the kernel completes the handshake, nobody reads the request.
    paused = trio.socket.socket()
    await paused.bind(("127.0.0.1", 0))
    paused.listen(8)
    healthy = OpenAIBackend(default=Script(tokens=["fine"]))
    paused_url = f"http://127.0.0.1:{paused.getsockname()[1]}/v1"
    with paused:
        async with _replicated(healthy, extra_urls=(paused_url,), timeouts=QUICK) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
            for stream in (True, False, True):
                if stream:
                    chunks = [c async for c in await client.chat.completions.create(model="m", messages=ASK, stream=True)]
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
                else:
                    answer = await client.chat.completions.create(model="m", messages=ASK)
                    assert answer.choices[0].message.content == "fine"
            # Its one connection holds the request the gateway sent, then the gateway's close.
            conn, _ = await paused.accept()
            with conn, trio.fail_after(2):
                received = b""
                while data := await conn.recv(65536):
                    received += data
            with trio.move_on_after(0.2) as nothing_more:
                await paused.accept()
    assert received.startswith(b"POST /v1/chat/completions ")
    assert nothing_more.cancelled_caught  # set aside: no further request went there
    assert _chats(healthy) == 3


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_replicas_of_other_dialects_that_hang_are_left_too(kind: str) -> None:
    fake, path = {"ollama": (OllamaBackend, "/api/chat"), "anthropic": (AnthropicBackend, "/v1/messages")}[kind]
    hung, healthy = fake(default=Script(stall_after=0)), fake(default=Script(tokens=["fine"]))
    async with hung.serve() as a, healthy.serve() as b, running_gateway(
        replace(backend("x", a.url, kind=kind, default=True, timeouts=QUICK), replicas=(b.url,)),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for stream in (True, False, True):
            if stream:
                chunks = [c async for c in await client.chat.completions.create(model="m", messages=ASK, stream=True)]
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
            else:
                answer = await client.chat.completions.create(model="m", messages=ASK)
                assert answer.choices[0].message.content == "fine"
        await hung.wait_disconnect(1.0)
    chats = [sum(1 for r in fake.requests if r.path == path) for fake in (hung, healthy)]
    assert chats == [1, 3]


@pytest.mark.parametrize("hang", [Script(stall_before_headers=True), Script(stall_after=0)], ids=["no-head", "no-event"])
async def test_one_request_at_a_time_tests_whether_a_hung_replica_is_back(
    hang: Script, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("proxy.infra.backends._replicas.SET_ASIDE_SECONDS", 0.5)
    hung, healthy = OpenAIBackend(default=hang), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(hung, healthy, timeouts=QUICK) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
        body = {**CHAT, "stream": True}
        while _chats(hung) == 0:
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
        await trio.sleep(0.6)  # its time set aside is over: the next request tests it

        async def chat() -> None:
            answer = await http.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and "fine" in answer.text

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(chat)
    # One request tested it (and waited its patience); the five others went to the healthy one.
    assert _chats(hung) == 2
    # Still hung: set aside for twice as long (a response head alone did not show it well).
    aside = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert [message.split(" for ")[1].split("s ")[0] for message in aside] == ["0.5", "1"]


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_a_replica_that_drops_the_connection_before_its_answer_is_stood_in_for(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A crashed vLLM worker behind a load balancer, a restarting container: the request is
    # read, then the connection goes (a RST, or a FIN) before any response head.
    async def crash(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        if how == "reset":
            reset(stream)
        else:
            await stream.aclose()

    healthy = OpenAIBackend(default=Script(tokens=["fine"]))
    async with raw_server(crash) as (crashing, served):
        async with _replicated(healthy, extra_urls=(f"{crashing}/v1",)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
            for stream in (False, True, False, True):
                if stream:
                    chunks = [c async for c in await client.chat.completions.create(model="m", messages=ASK, stream=True)]
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "fine"
                else:
                    answer = await client.chat.completions.create(model="m", messages=ASK)
                    assert answer.choices[0].message.content == "fine"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                states = (await http.get("/ready")).json()["replicas"]["vllm"]
    # Tried once, then set aside: the other requests went straight to the healthy one.
    assert len(served) == 1 and _chats(healthy) == 4
    assert states[f"{crashing}/v1"].startswith("set aside for ")
    assert len([r for r in caplog.records if "set aside" in r.getMessage()]) == 1


async def test_a_single_backend_that_drops_the_connection_is_still_a_502() -> None:
    async def crash(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        reset(stream)

    async with raw_server(crash) as (crashing, _), running_gateway(backend("vllm", f"{crashing}/v1", default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answer = await http.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "backend_connection_error"


async def test_a_relayed_call_to_a_replica_that_drops_the_connection_is_stood_in_for() -> None:
    async def crash(stream: trio.SocketStream, _: int) -> None:
        await read_request(stream, bytearray())
        reset(stream)

    healthy = OpenAIBackend(default=Script(tokens=["fine"]))
    async with raw_server(crash) as (crashing, served), _replicated(healthy, extra_urls=(f"{crashing}/v1",)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for stream in (False, True, False):
            if stream:
                chunks = [c async for c in await client.completions.create(model="m", prompt="x", stream=True)]
                assert "".join(c.choices[0].text for c in chunks if c.choices) == "fine"
            else:
                answer = await client.completions.create(model="m", prompt="x")
                assert answer.choices[0].text == "fine"
    assert len(served) == 1
    assert sum(1 for request in healthy.requests if request.path.endswith("/completions")) == 3


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_client_leaving_before_the_answer_sets_no_replica_aside(path: str) -> None:
    # Its leaving closes the backend connection under the pending read: no replica failed,
    # and nothing is asked of another one.
    slow = [OpenAIBackend(default=Script(header_delay=30)) for _ in range(2)]
    body = {"model": "m", "messages": ASK} if path.endswith("/chat/completions") else {"model": "m", "prompt": "x"}

    def asked() -> list[Any]:
        return [request for fake in slow for request in fake.requests if request.path == path]

    async with (
        _replicated(*slow, timeouts=replace(SHARED, failover=30.0)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        async def ask() -> None:
            await http.post(path, json=body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)

            async def reached() -> bool:
                return bool(asked())

            await eventually(reached)
            nursery.cancel_scope.cancel()

        async def closed() -> bool:
            return sum(fake.recorder.disconnects_total for fake in slow) >= 1

        await eventually(closed, within=2.0)
        await trio.sleep(0.3)  # time for a wrong failover to show
        states = (await http.get("/ready")).json()["replicas"]["vllm"]
    assert list(states.values()) == ["ok", "ok"]
    assert len(asked()) == 1


def _asked(fake: OpenAIBackend, path: str) -> int:
    return sum(1 for request in fake.requests if request.path == path)


@pytest.mark.parametrize(
    "hang",
    [Script(stall_before_headers=True), Script(stall_after=0)],
    ids=["no-response-head", "head-then-no-byte"],
)
async def test_a_relayed_stream_from_a_replica_that_accepts_and_hangs_comes_from_another(
    hang: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    hung, healthy = OpenAIBackend(default=hang), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(hung, healthy, timeouts=SHARED, access_log=True) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        started = trio.current_time()
        for _ in range(3):
            chunks = [c async for c in await client.completions.create(model="m", prompt="x", stream=True)]
            assert "".join(c.choices[0].text for c in chunks if c.choices) == "fine"
        elapsed = trio.current_time() - started
        gone = await hung.wait_disconnect(1.0)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            states = (await http.get("/ready")).json()["replicas"]["vllm"]
        hung_url, healthy_url = _url(hung), _url(healthy)
    assert gone.path == "/v1/completions" and gone.frames_sent == 0
    assert (_asked(hung, "/v1/completions"), _asked(healthy, "/v1/completions")) == (1, 3)
    assert elapsed < SHARED.first_token  # one share of the first-token budget, not all of it
    assert states[hung_url].startswith("set aside for ") and "sent no" in states[hung_url]
    lines = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [(getattr(r, "status", None), getattr(r, "replica", None)) for r in lines] == [(200, healthy_url)] * 3
    assert [getattr(r, "passed_over", None) for r in lines].count([hung_url]) == 1


async def test_a_relayed_whole_answer_from_a_replica_that_accepts_and_hangs_comes_from_another() -> None:
    hung = OpenAIBackend(default=Script(stall_before_headers=True))
    healthy = OpenAIBackend(default=Script(tokens=["fine"]))
    rerank = {"model": "m", "query": "q", "documents": ["a", "b"]}
    # A whole answer's head comes with the answer: its share is of `total` (half of 6 s here).
    async with _replicated(hung, healthy, timeouts=replace(SHARED, total=6.0)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            answer = await client.completions.create(model="m", prompt="x")
            assert answer.choices[0].text == "fine"
            ranked = await http.post("/v1/rerank", json=rerank)
            assert ranked.status_code == 200 and len(ranked.json()["results"]) == 2
        gone = await hung.wait_disconnect(1.0)
    assert not gone.headers_sent
    assert _asked(hung, "/v1/completions") + _asked(hung, "/v1/rerank") == 1
    assert (_asked(healthy, "/v1/completions"), _asked(healthy, "/v1/rerank")) == (1, 1)


async def test_a_relayed_stream_with_every_replica_silent_is_a_504_within_the_first_token_timeout() -> None:
    fakes = [OpenAIBackend(default=Script(stall_before_headers=True)) for _ in range(2)]
    async with _replicated(*fakes, timeouts=replace(SHARED, first_token=2.0)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            started = trio.current_time()
            answer = await http.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
            elapsed = trio.current_time() - started
    assert answer.status_code == 504 and "first token" in answer.json()["error"]["message"]
    assert 1.8 < elapsed < 4.0
    assert sum(_asked(fake, "/v1/completions") for fake in fakes) == 2


async def _hang(stream: trio.SocketStream, _: int) -> None:
    """A server that reads the request and never answers."""
    await read_request(stream, bytearray())
    await trio.sleep_forever()


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_model_info_and_token_counts_from_a_backend_that_never_answers_end_in_time(kind: str) -> None:
    # `/api/show` (Ollama) and `count_tokens` (Anthropic) have no chat around them to bound them.
    fake, path, body = {
        "ollama": (OllamaBackend, "/api/show", {"model": "m"}),
        "anthropic": (AnthropicBackend, "/v1/messages/count_tokens", {"model": "m", "messages": ASK}),
    }[kind]
    quick = Timeouts(connect=1.0, first_token=2.0, idle=2.0, total=2.0)
    async with raw_server(_hang) as (hung, _), fake().serve() as healthy:
        async with running_gateway(backend("x", hung, kind=kind, default=True, timeouts=quick)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                started = trio.current_time()
                answer = await http.post(path, json=body)
                elapsed = trio.current_time() - started
        assert answer.status_code == 504 and elapsed < 3.0
        # With a healthy twin, the silent replica is left for it: every request is answered.
        config = replace(backend("x", hung, kind=kind, default=True, timeouts=quick), replicas=(healthy.url,))
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            for _ in range(3):
                started = trio.current_time()
                answer = await http.post(path, json=body)
                assert answer.status_code == 200 and trio.current_time() - started < 1.5


async def test_a_backend_call_without_a_deadline_of_its_own_leaves_a_silent_replica() -> None:
    quick = Timeouts(connect=1.0, first_token=2.0, idle=2.0, total=2.0)
    healthy = OpenAIBackend()
    async with raw_server(_hang) as (hung, _), healthy.serve() as up:
        config = replace(backend("x", f"{hung}/v1", timeouts=quick), replicas=(f"{up.url}/v1",))
        client = create_client(config, auth_header={})
        answered = trio.Event()

        async def calls() -> None:  # outside any cancel scope with a deadline
            for _ in range(2):
                assert (await client.get("/models")).status_code == 200
            answered.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(calls)
                # Both replicas get one of the calls; the silent one is left after its share of `total`.
                with trio.move_on_after(2.0):
                    await answered.wait()
                nursery.cancel_scope.cancel()
        finally:
            await client.aclose()
    assert answered.is_set()


async def test_a_stream_from_a_replica_that_drops_after_its_head_comes_from_its_twin() -> None:
    # A vLLM worker dying in prefill: its 200 head, then the connection goes before any byte.
    dying = OpenAIBackend(default=Script(fail_after=0, fail_mode="close"))
    twin, stand_in = OpenAIBackend(default=Script(tokens=["twin"])), OpenAIBackend(default=Script(tokens=["small"]))
    async with dying.serve() as a, twin.serve() as b, stand_in.serve() as c, running_gateway(
        replace(backend("vllm", a.url, default=True), replicas=(f"{b.url}/v1",)),
        backend("small", c.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
        for model in ("m", "qwen3-32b", "m", "qwen3-32b"):
            answer = await http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "stream": True})
            assert answer.status_code == 200 and "twin" in answer.text
            assert "x-fallback-model" not in answer.headers
        states = (await http.get("/ready")).json()["replicas"]["vllm"]
    assert (_chats(dying), _chats(twin), _chats(stand_in)) == (1, 4, 0)
    assert states[f"{a.url}/v1"].startswith("set aside for ") and "before its first byte" in states[f"{a.url}/v1"]
    # A single server that does so is still a 502: there is no one else to ask.
    async with dying.serve() as a, running_gateway(backend("vllm", a.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "backend_connection_error"


async def _dies_mid_answer(stream: trio.SocketStream, _: int) -> None:
    """A replica whose worker dies while it writes a whole answer: its head, part of its body."""
    await read_request(stream, bytearray())
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n"
    await stream.send_all(head + b'{"id": "chatcmpl-1", "object": "chat.completion", ')
    await stream.aclose()


async def test_a_whole_answer_cut_off_by_its_replica_comes_from_its_twin() -> None:
    twin = OpenAIBackend(default=Script(tokens=["twin"]))
    async with raw_server(_dies_mid_answer) as (dying, _), twin.serve() as up:
        config = replace(backend("vllm", dying, default=True), replicas=(f"{up.url}/v1",))
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
            for _ in range(3):
                answer = await http.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "twin"
            states = (await http.get("/ready")).json()["replicas"]["vllm"]
        assert states[f"{dying}/v1"].startswith("set aside for ") and "middle of its answer" in states[f"{dying}/v1"]
        # A single server that does so is still a 502: there is no one else to ask.
        async with running_gateway(backend("vllm", dying, default=True)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                answer = await http.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 502


async def test_with_every_replica_down_each_one_is_shown_set_aside() -> None:
    urls = tuple(f"http://127.0.0.1:{refusing_port()}/v1" for _ in range(2))
    config = replace(backend("vllm", "http://unused", default=True), base_url=urls[0], replicas=urls[1:])
    async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT)
        ready = await client.get("/ready")
        metrics = (await client.get("/metrics")).text
    assert answer.status_code == 503
    assert ready.status_code == 503
    states = ready.json()["replicas"]["vllm"]
    assert all(states[replica].startswith("set aside for ") for replica in urls)
    for replica in urls:
        assert f'llm_proxy_backend_replica_up{{backend="vllm",replica="{replica}"}} 0.0' in metrics


@pytest.mark.parametrize("status", [429, 500, 502, 504])
async def test_a_replica_answering_an_error_status_to_everything_is_stood_in_for(status: int) -> None:
    failing, healthy = OpenAIBackend(default=Script(status=status)), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(failing, healthy) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for stream in (False, True) * 4:
            answer = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert answer.status_code == 200 and "fine" in answer.text
        states = (await http.get("/ready")).json()["replicas"]["vllm"]
        failing_url = _url(failing)
    # A gateway's outage sets it aside at once; a 429 or 500 only once it answered so 3 times in a row.
    assert _chats(failing) == (3 if status in (429, 500) else 1) and _chats(healthy) == 8
    assert states[failing_url].startswith("set aside for ") and states[failing_url].endswith(f"(it answered {status})")


async def test_a_replica_asking_to_be_left_alone_is_set_aside_for_its_retry_after() -> None:
    # A 503 with `Retry-After: 30` (vLLM behind a queueing balancer, a server draining) said how
    # long; the replica was asked again after 5 s, to refuse again.
    busy, healthy = OpenAIBackend(default=Script(status=503, retry_after=30)), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(busy, healthy) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(2):
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        state = (await http.get("/ready")).json()["replicas"]["vllm"][_url(busy)]
    seconds = float(state.removeprefix("set aside for ").split("s", 1)[0])
    assert 25 < seconds <= 30, state


async def test_one_failed_request_does_not_set_a_replica_aside_and_a_client_error_is_not_moved() -> None:
    first, second = OpenAIBackend(default=Script(tokens=["fine"])), OpenAIBackend(default=Script(tokens=["fine"]))
    async with _replicated(first, second) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        first.set_script(Script(status=500))
        second.set_script(Script(status=500))
        # Both replicas answer 500 to it: each was asked once, and the client has the 500 (a 502).
        answer = await http.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 502 and (_chats(first), _chats(second)) == (1, 1)
        first.set_script(Script(tokens=["fine"]))
        second.set_script(Script(tokens=["fine"]))
        for _ in range(4):
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert (_chats(first), _chats(second)) == (3, 3)  # still shared: neither was set aside
        first.set_script(Script(status=400))
        second.set_script(Script(status=400))
        answer = await http.post("/v1/chat/completions", json=CHAT)
        states = (await http.get("/ready")).json()["replicas"]["vllm"]
    assert answer.status_code == 400 and _chats(first) + _chats(second) == 7  # the request's own fault: not moved
    assert list(states.values()) == ["ok", "ok"]


async def test_a_replica_answering_429_is_stood_in_for_by_its_twin_before_any_fallback_model() -> None:
    limited, twin = OpenAIBackend(default=Script(status=429)), OpenAIBackend(default=Script(tokens=["twin"]))
    stand_in = OpenAIBackend(default=Script(tokens=["stand-in"]))
    async with limited.serve() as a, twin.serve() as b, stand_in.serve() as c, running_gateway(
        replace(backend("vllm", a.url, default=True), replicas=(f"{b.url}/v1",)),
        backend("small", c.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as http:
        for stream in (True, False, True, False):
            answer = await http.post("/v1/chat/completions", json={"model": "qwen3-32b", "messages": ASK, "stream": stream})
            assert answer.status_code == 200 and "twin" in answer.text
            assert "x-fallback-model" not in answer.headers
    assert _chats(stand_in) == 0 and _chats(twin) == 4


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_relayed_stream_whose_backend_drops_after_its_head_is_a_502_or_its_twins(how: str) -> None:
    dying = OpenAIBackend(default=Script(fail_after=0, fail_mode=how))  # type: ignore[arg-type]
    twin = OpenAIBackend(default=Script(tokens=["twin"]))
    ask = {"model": "m", "prompt": "x", "stream": True}
    async with dying.serve() as a, running_gateway(backend("vllm", a.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answer = await http.post("/v1/completions", json=ask)
    # Nothing reached the client: a status it can act on, not a 200 whose stream is an error.
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "backend_connection_error"
    async with _replicated(dying, twin) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)
        for _ in range(3):
            chunks = [c async for c in await client.completions.create(model="m", prompt="x", stream=True)]
            assert "".join(c.choices[0].text for c in chunks if c.choices) == "twin"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            states = (await http.get("/ready")).json()["replicas"]["vllm"]
        dying_url = _url(dying)
    assert (_asked(dying, "/v1/completions"), _asked(twin, "/v1/completions")) == (2, 3)
    assert states[dying_url].startswith("set aside for ") and "before its first byte" in states[dying_url]
