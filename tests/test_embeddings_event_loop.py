"""A large embeddings answer is written and read off the event loop: a gateway's other
requests (streams above all) must not stall while 2048 vectors become JSON or come back
from a backend as JSON, nor while a large request (token arrays) is read and sent on; nor
while a worker thread doing that work holds the GIL the loop needs."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import httpx
import trio

from tests.fakes import OllamaBackend, OpenAIBackend
from tests.fakes.server import Exchange, Request
from tests.harness import backend, running_gateway
from tests.test_fakes import fake_process

INPUTS = [f"passage {i}" for i in range(1024)]  # 1024 x 384 values: a third of a second as JSON


class LongestStep(trio.abc.Instrument):
    """The most CPU any one task step took on the event loop's thread. CPU time, not wall
    time: a busy machine makes a step wait, not compute more."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started: float | None = None  # added mid-step: that step is not measured

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is not None:
            self.longest = max(self.longest, time.thread_time() - self._started)


@contextmanager
def measured() -> Iterator[LongestStep]:
    instrument = LongestStep()
    trio.lowlevel.add_instrument(instrument)
    try:
        yield instrument
    finally:
        trio.lowlevel.remove_instrument(instrument)


# Below what encoding or parsing 1024 vectors took on the loop (117-175 ms of CPU), far
# above any other step of the request.
MAX_STEP_SECONDS = 0.09


async def test_large_embeddings_answers_never_hold_the_event_loop() -> None:
    # The backend is a process of its own: its JSON must not count as the gateway's.
    async with (
        fake_process("openai", "--port", "0") as (_, fake_url, _lines),
        fake_process("ollama", "--port", "0") as (_, ollama_url, _lines2),
        running_gateway(
            backend("oa", fake_url, default=True), backend("ol", ollama_url, kind="ollama", prefixes=("nomic-",)),
        ) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as http,
    ):
        # The local model loads and runs once before measuring (loading is off the loop too).
        assert (await http.post("/v1/embeddings", json={"model": "all-minilm", "input": INPUTS})).status_code == 200
        requests = [
            ("/v1/embeddings", {"model": "all-minilm", "input": INPUTS, "encoding_format": "float"}),
            ("/api/embed", {"model": "all-minilm", "input": INPUTS}),
            ("/v1/embeddings", {"model": "bge-m3", "input": INPUTS, "encoding_format": "base64"}),
            ("/api/embed", {"model": "nomic-embed-text", "input": INPUTS}),
        ]
        for path, body in requests:
            with measured() as loop:
                response = await http.post(path, json=body)
            assert response.status_code == 200, response.text
            assert len(response.json()["data" if path == "/v1/embeddings" else "embeddings"]) == len(INPUTS)
            assert loop.longest < MAX_STEP_SECONDS, (path, body["model"], loop.longest)


# -- wall time ---------------------------------------------------------------------------------


async def longest_wait(request: Callable[[], Awaitable[httpx.Response]]) -> tuple[httpx.Response, float]:
    """`request`'s response, and the longest a task that asks to run every millisecond waited
    meanwhile: wall time, which a worker thread holding the GIL counts (the event loop's CPU
    time does not: the loop's thread sleeps, waiting for the GIL)."""
    longest, last, done = 0.0, time.perf_counter(), False

    async def tick() -> None:
        nonlocal longest, last
        while not done:
            await trio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        response = await request()
        done = True
    return response, longest


ROWS = 2000
_VECTOR = [round(random.Random(7).uniform(-0.1, 0.1), 9) for _ in range(768)]


class _Unread:
    """A fake that never parses a request's body: it shares the gateway's event loop, and its
    own JSON must not count."""

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        request._json_parsed = True  # what its recorder would read: nothing
        await super().__call__(request, exchange)  # type: ignore[misc]


class CannedVLLM(_Unread, OpenAIBackend):
    """Answers every embeddings call with `ROWS` vectors written beforehand."""

    answer = json.dumps({
        "object": "list", "model": "bge-m3", "usage": {"prompt_tokens": ROWS, "total_tokens": ROWS},
        "data": [{"object": "embedding", "index": i, "embedding": _VECTOR} for i in range(ROWS)],
    }).encode()

    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        await exchange.respond(200, self.answer)


class _CannedOllama(_Unread, OllamaBackend):
    answer = json.dumps({"model": "nomic-embed-text", "embeddings": [_VECTOR] * ROWS, "prompt_eval_count": ROWS}).encode()

    async def _embed(self, request: Request, exchange: Exchange, *, legacy: bool) -> None:
        await exchange.respond(200, self.answer)


# What a gateway serving streams must keep its loop's waits under while embedding: far below
# the fifth to half a second that parsing or writing these bodies held the GIL in one piece.
MAX_WAIT_SECONDS = 0.1


async def test_large_embeddings_never_hold_the_gil_the_event_loop_needs() -> None:
    """Writing and reading large bodies in a worker thread did not free the loop: a single
    `json` call holds the GIL throughout, so every stream still stalled for 0.2-0.5 s while
    LangChain's token-array batch (1000s of ids per text) or 2000 vectors went by."""
    ids = random.Random(1)
    token_arrays = [[ids.randrange(100_000) for _ in range(800)] for _ in range(ROWS)]  # 8 MB of JSON
    requests = [
        ("/v1/embeddings", {"model": "all-minilm", "input": INPUTS * 2, "encoding_format": "float"}),
        ("/api/embed", {"model": "all-minilm", "input": INPUTS * 2}),
        ("/v1/embeddings", {"model": "bge-m3", "input": token_arrays, "encoding_format": "float"}),
        ("/api/embed", {"model": "nomic-embed-text", "input": [f"passage {i}" for i in range(ROWS)]}),
    ]
    bodies = [(path, json.dumps(body).encode()) for path, body in requests]
    vllm, ol = CannedVLLM(), _CannedOllama()
    async with (
        vllm.serve() as vllm_server, ol.serve() as ol_server,
        running_gateway(
            backend("vllm", vllm_server.url, default=True), backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
        ) as url,
        httpx.AsyncClient(base_url=url, timeout=120) as http,
    ):
        assert (await http.post("/v1/embeddings", json={"model": "all-minilm", "input": "load"})).status_code == 200
        for path, body in bodies:
            waits = []
            for _ in range(3):  # a busy machine can make the loop wait now and then; this never would
                response, wait = await longest_wait(
                    lambda path=path, body=body: http.post(path, content=body, headers={"content-type": "application/json"})
                )
                assert response.status_code == 200, response.text
                waits.append(wait)
                if wait < MAX_WAIT_SECONDS:
                    break
            assert min(waits) < MAX_WAIT_SECONDS, (path, waits)
