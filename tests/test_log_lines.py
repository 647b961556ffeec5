"""The gateway's JSON log: one object per line, whatever a client puts in the values it logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import openai

from proxy.infra.logging import REQUEST_LOGGER, JsonFormatter
from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """What the gateway writes to its log, formatted as `serve` formats it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root, request = logging.getLogger(), logging.getLogger(REQUEST_LOGGER)
    levels = root.level, request.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    request.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        request.setLevel(levels[1])


async def test_a_model_name_with_unicode_line_breaks_stays_on_its_log_line() -> None:
    """JSON leaves U+2028, U+2029 and NEL unescaped, but log shippers and `str.splitlines()`
    break lines there: a client's model name (or id) holding one split its request's line and
    made the rest of it a line of the client's choosing."""
    forged = '{"level": "error", "msg": "admin key revoked"}'
    fake = OpenAIBackend()
    with json_log() as log:
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, default=True), access_log=True
        ) as gateway:
            async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
                for breaker in ("\u2028", "\u2029", "\x85"):
                    await client.chat.completions.create(
                        model=f"qwen{breaker}{forged}", messages=[{"role": "user", "content": "Hi"}],
                    )
    lines = log.getvalue().splitlines()
    logged = [json.loads(line) for line in lines]  # every line is a whole object
    models = [entry["model"] for entry in logged if entry.get("logger") == REQUEST_LOGGER]
    assert models == [f"qwen{breaker}{forged}" for breaker in ("\u2028", "\u2029", "\x85")]
