"""What the three fake backends share: scripting, recording, serving and the stream pump.

A dialect subclass routes requests and, for a model run, builds a ``Rendering`` (its wire
format for one planned response); ``FakeBackend.run_generation`` then plays it out with
the script's timing and failures, and records what happened.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import trio

from .recorder import Disconnect, Generation, Outcome, RecordedRequest, Recorder
from .script import Plan, Script
from .server import Exchange, FakeServer, Request, run_forever, serve_fake

__all__ = ["Call", "FakeBackend", "Rendering", "json_bytes"]


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, the way the real servers write it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Rendering(Protocol):
    """One planned response in a dialect's wire format."""

    content_type: str
    headers: list[tuple[str, str]]

    def frames(self) -> Iterator[bytes]:
        """The streamed body, one protocol message (chunk, event, line) per item."""
        ...

    def error_frame(self) -> bytes:
        """The in-band error a stream ends with when the script says ``fail_after``."""
        ...

    def keepalive(self) -> bytes | None:
        """A frame that keeps an idle stream alive without meaning anything, if any."""
        ...

    def full_body(self) -> bytes:
        """The non-stream response body."""
        ...


@dataclass(slots=True)
class Call:
    """Per-request bookkeeping handed to the dialect's route."""

    request: RecordedRequest
    generation: Generation | None = None


class FakeBackend:
    """Scripting, recording and serving for one fake LLM server."""

    dialect: ClassVar[str] = "fake"
    default_model: ClassVar[str] = "fake-model"

    def __init__(
        self,
        *,
        default: Script | None = None,
        scripts: Mapping[str, Script] | None = None,
        models: Sequence[str] | None = None,
        embedding_dim: int = 384,
        history: int | None = None,
        name: str | None = None,
    ) -> None:
        """``models``: when given, only these models exist (others get the dialect's 404);
        when None every model name is accepted. ``history`` bounds the kept records."""
        self.default = default or Script()
        self.scripts: dict[str, Script] = dict(scripts or {})
        self.models = list(models) if models is not None else None
        self.embedding_dim = embedding_dim
        self.name = name or self.dialect
        self.recorder = Recorder(history)
        self.server: FakeServer | None = None
        self.healthy = True
        self._once: deque[tuple[str | None, Script]] = deque()

    # -- scripting ----------------------------------------------------------------------

    def set_script(self, script: Script, *, model: str | None = None) -> None:
        """Use ``script`` for every request to ``model`` (or as the default when None)."""
        if model is None:
            self.default = script
        else:
            self.scripts[model] = script

    def push(self, *scripts: Script, model: str | None = None) -> None:
        """Queue one-shot scripts: each is used by exactly one later request (to ``model``,
        or to any model when None), before falling back to the standing scripts."""
        for script in scripts:
            self._once.append((model, script))

    def script_for(self, model: str) -> Script:
        for i, (wanted, script) in enumerate(self._once):
            if wanted is None or wanted == model:
                del self._once[i]
                return script
        return self.scripts.get(model, self.default)

    def listed_models(self) -> list[str]:
        if self.models is not None:
            return list(self.models)
        return sorted(set(self.scripts) | {self.default_model})

    def model_known(self, model: str) -> bool:
        return self.models is None or model in self.models

    # -- what was seen ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self.recorder.requests)

    @property
    def disconnects(self) -> list[Disconnect]:
        return list(self.recorder.disconnects)

    @property
    def generations(self) -> list[Generation]:
        return list(self.recorder.generations)

    @property
    def active_streams(self) -> int:
        return self.recorder.active_streams

    @property
    def completed(self) -> int:
        return self.recorder.completed

    @property
    def cancelled(self) -> int:
        return self.recorder.cancelled

    @property
    def failed(self) -> int:
        return self.recorder.failed

    async def wait_disconnect(self, within: float = 5.0) -> Disconnect:
        return await self.recorder.wait_disconnect(within)

    async def wait_requests(self, count: int, within: float = 5.0) -> None:
        await self.recorder.wait_requests(count, within)

    async def wait_active_streams(self, count: int, within: float = 5.0) -> None:
        await self.recorder.wait_active_streams(count, within)

    async def wait_idle(self, within: float = 5.0) -> None:
        await self.recorder.wait_idle(within)

    # -- serving ------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(self, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[FakeServer]:
        """Listen on ``host:port`` for the duration of the block (port 0: any free port)."""
        async with serve_fake(self, host=host, port=port) as server:
            self.server = server
            try:
                yield server
            finally:
                self.server = None

    def run_forever(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """Blocking: serve from a process until interrupted, printing ``READY <url>``."""
        run_forever(self, host=host, port=port)

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        if request.path.startswith("/_fake/"):
            await self._admin(request, exchange)
            return
        recorded = self.recorder.record_request(request)
        call = Call(recorded)
        try:
            await self.route(request, exchange, call)
        finally:
            if exchange.disconnected_at is not None:
                self.recorder.record_disconnect(
                    recorded,
                    at=exchange.disconnected_at,
                    frames_sent=call.generation.frames_sent if call.generation else 0,
                    headers_sent=exchange.headers_sent,
                )

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        raise NotImplementedError

    async def send_error(
        self, exchange: Exchange, status: int, message: str, *, script: Script | None = None
    ) -> None:
        """A pre-body error in the dialect's shape (the script may dictate the body)."""
        headers = list(script.headers) if script is not None else []
        if script is not None and script.retry_after is not None:
            headers.append(("retry-after", _seconds(script.retry_after)))
        if script is not None and script.error_body is not None:
            body = script.error_body
            raw = body if isinstance(body, bytes) else json_bytes(body)
        else:
            raw = json_bytes(self.error_payload(status, message))
        await exchange.respond(status, raw, headers=self.common_headers() + headers)

    def error_payload(self, status: int, message: str) -> Any:
        return {"error": message}

    def common_headers(self) -> list[tuple[str, str]]:
        """Headers every response of this dialect carries."""
        return []

    def default_error_message(self, status: int) -> str:
        return f"scripted failure with status {status}"

    # -- running a model ----------------------------------------------------------------

    async def run_generation(
        self,
        exchange: Exchange,
        call: Call,
        *,
        script: Script,
        plan: Plan,
        stream: bool,
        rendering: Rendering,
    ) -> None:
        generation = self.recorder.begin(call.request, plan.model, stream=stream)
        call.generation = generation
        outcome: Outcome = "failed"
        try:
            if script.header_delay > 0:
                await trio.sleep(script.header_delay)
            if script.stall_before_headers:
                await trio.sleep_forever()
            if script.status is not None:
                message = script.error_message or self.default_error_message(script.status)
                await self.send_error(exchange, script.status, message, script=script)
            elif stream:
                if await self._pump(exchange, generation, script, rendering):
                    outcome = "completed"
            elif await self._respond_whole(exchange, generation, script, plan, rendering):
                outcome = "completed"
        finally:
            if exchange.disconnected_at is not None:
                outcome = "cancelled"
            self.recorder.end(generation, outcome)

    async def _respond_whole(
        self,
        exchange: Exchange,
        generation: Generation,
        script: Script,
        plan: Plan,
        rendering: Rendering,
    ) -> bool:
        if script.stall_after is not None:
            await trio.sleep(script.pace * script.stall_after)
            await trio.sleep_forever()
        if script.fail_after is not None:
            await trio.sleep(script.pace * script.fail_after)
            if script.fail_mode != "error":
                exchange.abort(reset=script.fail_mode == "reset")
            message = script.error_message or self.default_error_message(500)
            failure = script if script.fail_body is None else _with_error_body(script)
            await self.send_error(exchange, 500, message, script=failure)
            return False
        if script.pace > 0:
            await trio.sleep(script.pace * plan.piece_count)
        body = rendering.full_body()
        content_type = getattr(rendering, "whole_content_type", "application/json")
        await exchange.respond(200, body, content_type=content_type, headers=rendering.headers)
        generation.frames_sent = 1
        return True

    async def _pump(
        self, exchange: Exchange, generation: Generation, script: Script, rendering: Rendering
    ) -> bool:
        """Stream the frames with the script's pacing, coalescing, stalls and failures.

        Returns True when the body ended normally, False after an in-band error.
        """
        await exchange.start(200, content_type=rendering.content_type, headers=rendering.headers)
        per_write = max(1, script.frames_per_write)
        stall_at = script.stall_after
        fail_at = script.fail_after
        prefix = (rendering.keepalive() or b"") if script.keepalive_comments else b""
        pace = script.pace
        batch: list[bytes] = []
        wrote = False
        sent = 0

        for frame in rendering.frames():
            if (stall_at is not None and sent + len(batch) >= stall_at) or (
                fail_at is not None and sent + len(batch) >= fail_at
            ):
                break
            batch.append(prefix + frame if prefix else frame)
            if len(batch) >= per_write:
                if wrote and pace > 0:
                    await trio.sleep(pace)
                await exchange.send(b"".join(batch))
                wrote = True
                sent += len(batch)
                generation.frames_sent = sent
                batch.clear()
        else:
            if wrote and pace > 0 and batch:
                await trio.sleep(pace)
            await exchange.finish(b"".join(batch))
            generation.frames_sent = sent + len(batch)
            return True

        if batch:
            if wrote and pace > 0:
                await trio.sleep(pace)
            await exchange.send(b"".join(batch))
            sent += len(batch)
            generation.frames_sent = sent
        if stall_at is not None and sent >= stall_at:
            await self._stall(exchange, script, rendering)
        if script.fail_mode != "error":
            exchange.abort(reset=script.fail_mode == "reset")
        if pace > 0:
            await trio.sleep(pace)
        await exchange.finish(rendering.error_frame())
        return False

    async def _stall(self, exchange: Exchange, script: Script, rendering: Rendering) -> None:
        keepalive = rendering.keepalive()
        if script.keepalive_interval is not None and keepalive is not None:
            while True:
                await trio.sleep(script.keepalive_interval)
                await exchange.send(keepalive)
        await trio.sleep_forever()

    # -- test-control endpoints (for fakes running as a separate process) ----------------

    async def _admin(self, request: Request, exchange: Exchange) -> None:
        if request.path == "/_fake/stats" and request.method == "GET":
            stats = self.recorder.stats()
            if self.server is not None:
                stats["connections_total"] = self.server.connections_total
                stats["connections_open"] = self.server.connections_open
            await exchange.respond_json(200, stats)
        elif request.path == "/_fake/reset" and request.method == "POST":
            self.recorder.reset()
            self._once.clear()
            await exchange.respond_json(200, {"ok": True})
        elif request.path == "/_fake/script" and request.method == "POST":
            try:
                data = request.json()
                script = Script.from_dict(data["script"])
            except (ValueError, KeyError, TypeError) as exc:
                await exchange.respond_json(400, {"error": str(exc)})
                return
            model = data.get("model")
            if data.get("once"):
                self.push(script, model=model)
            else:
                self.set_script(script, model=model)
            await exchange.respond_json(200, {"ok": True})
        else:
            await exchange.respond_json(404, {"error": f"no admin route {request.path}"})


def _with_error_body(script: Script) -> Script:
    return replace(script, error_body=script.fail_body)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
