"""Claude's thinking as an Anthropic client (Claude Code) gets it again: a request repeated with
its `Idempotency-Key` is the answer it had, each block as Claude sent it (signed thinking with
its signature, `redacted_thinking` as that block), streamed or whole; with the official
`anthropic` SDK, a gateway with its journal (PostgreSQL, NATS) and a loopback Claude."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
import trio

from tests.fakes import AnthropicBackend, Script
from tests.fakes.anthropic_backend import thinking_signature
from tests.harness import backend
from tests.test_auth_helpers import gateway
from tests.test_persistence import rows

pytest_plugins = ["tests.infra_servers"]

MODEL = "claude-sonnet-4-6"
REDACTED = "EmwKAhgBEgy3va3pzix"
_STORED = "SELECT 1 FROM chat_log WHERE status = 'completed'"


async def _asked(client: anthropic.AsyncAnthropic, stream: bool, key: str) -> tuple[list[dict[str, Any]], Any]:
    fields: Any = {
        "model": MODEL, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "extra_headers": {"Idempotency-Key": key},
    }
    if stream:
        async with client.messages.stream(**fields) as events:
            message = await events.get_final_message()
            return [block.model_dump(exclude_none=True) for block in message.content], message
    message = await client.messages.create(**fields)
    return [block.model_dump(exclude_none=True) for block in message.content], message


@pytest.mark.parametrize("stream", [False, True])
async def test_a_keyed_replay_gives_claudes_thinking_blocks_as_it_sent_them(
    aio_loop: object, pg_database_url: str, nats_url: str, stream: bool,
) -> None:
    fake = AnthropicBackend()
    fake.redacted_thinking = REDACTED
    fake.set_script(Script(reasoning=["Sunny ", "there."], tokens=["Sunny."]))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("claude", server.url, kind="anthropic", default=True)
    ) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        key = f"replay-{stream}"
        first, _ = await _asked(client, stream, key)
        assert first == [
            {"type": "redacted_thinking", "data": REDACTED},
            {"type": "thinking", "thinking": "Sunny there.", "signature": thinking_signature("Sunny there.")},
            {"type": "text", "text": "Sunny."},
        ]
        asked = len(fake.requests)
        with trio.fail_after(5):  # stored: the same key is then a replay, not an attachment to its run
            while not await trio.to_thread.run_sync(rows, pg_database_url, _STORED):  # noqa: ASYNC110 (a row, no event)
                await trio.sleep(0.05)
        again, _ = await _asked(client, stream, key)
        assert len(fake.requests) == asked  # replayed, not asked again
        assert again == first
        await client.close()
