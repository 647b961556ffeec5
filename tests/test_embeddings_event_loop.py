"""A large embeddings answer is written and read off the event loop: a gateway's other
requests (streams above all) must not stall while 2048 vectors become JSON or come back
from a backend as JSON."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import trio

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
