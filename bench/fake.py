"""A fast fake OpenAI backend for the benchmark, as a process.

    python -m bench.fake [--host H] [--port 0] [--scripts JSON]

Prints ``READY http://H:P`` once listening and serves until SIGINT/SIGTERM.

``tests.fakes`` is the faithful fake (every dialect, scripted failures, h11 framing); it
spends ~0.4 ms of CPU per request and ~100 µs per paced chunk, so on the core it shares with
the load generator it could not serve 256 paced streams (12,800 chunks/s) and would be the
bottleneck of the direct baseline. This one serves only what the benchmark asks for, with
every response pre-rendered: ``POST /v1/chat/completions`` (streaming or not, honouring
``stream_options.include_usage`` as the gateway asks for it), ``GET /health``, and

- ``GET /_bench/stats``: generations running, completed and cancelled, per model, and every
  client disconnect seen while a generation ran, as ``[time.monotonic(), model]``
  (CLOCK_MONOTONIC: comparable with other processes' clocks);
- ``POST /_bench/reset``: forget finished generations and disconnects.

``--scripts`` maps a model name to ``{"n_tokens": N, "pace": seconds between chunks}``;
unknown models get 6 tokens, unpaced. Like a real inference server, a stream's generation
stops as soon as its client's connection closes: a watcher reads the socket while it runs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from typing import Any

import trio

_RECV = 65536
_CREATED = 1_700_000_000


@dataclass(frozen=True, slots=True)
class Script:
    n_tokens: int = 6
    pace: float = 0.0


@dataclass(slots=True)
class Counts:
    active: int = 0
    completed: int = 0
    cancelled: int = 0


@dataclass(slots=True)
class Stats:
    """Generations per model (scenarios use distinct models, so one scenario's stragglers
    never count in another's numbers) and every disconnect as (time, model)."""

    models: dict[str, Counts] = field(default_factory=dict)
    disconnects: list[tuple[float, str]] = field(default_factory=list)

    def of(self, model: str) -> Counts:
        counts = self.models.get(model)
        if counts is None:
            counts = self.models[model] = Counts()
        return counts

    def reset(self) -> None:
        for counts in self.models.values():
            counts.completed = counts.cancelled = 0
        self.disconnects.clear()

    def as_json(self) -> dict[str, Any]:
        return {
            "active": sum(c.active for c in self.models.values()),
            "models": {m: asdict(c) for m, c in self.models.items()},
            "disconnects": self.disconnects,
        }


def _chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@lru_cache(maxsize=256)
def _stream_frames(model: str, n_tokens: int, include_usage: bool) -> tuple[bytes, ...]:
    """Every SSE frame of one streamed completion, each already framed as an HTTP chunk."""
    usage_tail = b',"usage":null' if include_usage else b""
    envelope = (
        b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,"model":%b'
        % (_CREATED, json.dumps(model).encode())
    )
    prefix = b"data: " + envelope + b',"choices":[{"index":0,"delta":'

    def frame(delta: bytes, finish: bytes = b"null") -> bytes:
        return (
            prefix
            + delta
            + b',"logprobs":null,"finish_reason":'
            + finish
            + b"}]"
            + usage_tail
            + b"}\n\n"
        )

    frames = [frame(b'{"role":"assistant","content":""}')]
    frames += [frame(b'{"content":"w%d "}' % i) for i in range(n_tokens)]
    frames.append(frame(b"{}", b'"stop"'))
    if include_usage:
        usage = b'{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}' % (
            n_tokens,
            n_tokens + 5,
        )
        frames.append(b"data: " + envelope + b',"choices":[],"usage":' + usage + b"}\n\n")
    frames.append(b"data: [DONE]\n\n")
    return tuple(_chunk(f) for f in frames)


@lru_cache(maxsize=256)
def _full_response(model: str, n_tokens: int) -> bytes:
    body = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": _CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "".join(f"w{i} " for i in range(n_tokens)),
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": n_tokens,
                "total_tokens": n_tokens + 5,
            },
        },
        separators=(",", ":"),
    ).encode()
    return _head(200, "application/json", len(body)) + body


def _head(status: int, content_type: str, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"")
    return b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\n%b\r\n\r\n" % (
        status,
        reason,
        content_type.encode(),
        framing,
    )


def _json_response(status: int, obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _head(status, "application/json", len(body)) + body


class FakeOpenAI:
    def __init__(self, scripts: dict[str, Script]) -> None:
        self.scripts = scripts
        self.stats = Stats()

    async def handle(self, stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                request = await _read_request(stream, buf)
                if request is None:
                    return
                method, path, body = request
                if not await self._respond(stream, method, path, body, buf):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(
        self, stream: trio.SocketStream, method: bytes, path: bytes, body: bytes, buf: bytearray
    ) -> bool:
        """Serve one request; False when the connection must end."""
        if path == b"/v1/chat/completions" and method == b"POST":
            return await self._chat(stream, body, buf)
        if path == b"/_bench/stats":
            await stream.send_all(_json_response(200, self.stats.as_json()))
        elif path == b"/_bench/reset" and method == b"POST":
            self.stats.reset()
            await stream.send_all(_json_response(200, {"ok": True}))
        elif path == b"/health":
            await stream.send_all(_json_response(200, {"status": "ok"}))
        elif path == b"/v1/models":
            models = [{"id": m, "object": "model", "owned_by": "bench"} for m in self.scripts]
            await stream.send_all(_json_response(200, {"object": "list", "data": models}))
        else:
            await stream.send_all(_json_response(404, {"error": {"message": "not found"}}))
        return True

    async def _chat(self, stream: trio.SocketStream, body: bytes, buf: bytearray) -> bool:
        try:
            request = json.loads(body)
            model = request["model"]
        except (ValueError, KeyError, TypeError):
            await stream.send_all(_json_response(400, {"error": {"message": "bad request"}}))
            return True
        if not isinstance(model, str):
            await stream.send_all(_json_response(400, {"error": {"message": "bad model"}}))
            return True
        script = self.scripts.get(model, Script())
        if request.get("stream") is not True:
            await stream.send_all(_full_response(model, script.n_tokens))
            self.stats.of(model).completed += 1
            return True
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        frames = _stream_frames(model, script.n_tokens, include_usage)
        return await self._stream(stream, model, frames, script.pace, buf)

    async def _stream(
        self,
        stream: trio.SocketStream,
        model: str,
        frames: tuple[bytes, ...],
        pace: float,
        buf: bytearray,
    ) -> bool:
        disconnects = self.stats.disconnects
        counts = self.stats.of(model)
        counts.active += 1
        finished = False
        gone = False
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    # The request was read whole, so EOF means the client went away. Bytes
                    # are the client's next request (it may send it the moment the last
                    # chunk arrives, before this task is cancelled): keep them for later.
                    nonlocal gone
                    while True:
                        try:
                            data = await stream.receive_some(_RECV)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        if not data:
                            # The writer may have seen the close first (and recorded it):
                            # its cancellation reaches this task only at its next checkpoint.
                            if not gone:
                                gone = True
                                disconnects.append((time.monotonic(), model))
                            nursery.cancel_scope.cancel()
                            return
                        buf.extend(data)

                nursery.start_soon(watch)
                try:
                    await stream.send_all(_head(200, "text/event-stream", None) + frames[0])
                    for frame in frames[1:]:
                        if pace > 0:
                            await trio.sleep(pace)
                        await stream.send_all(frame)
                    await stream.send_all(b"0\r\n\r\n")
                    finished = True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if not gone:
                        gone = True
                        disconnects.append((time.monotonic(), model))
                nursery.cancel_scope.cancel()
        finally:
            counts.active -= 1
            if finished:
                counts.completed += 1
            else:
                counts.cancelled += 1
        return finished and not gone


async def _read_request(
    stream: trio.SocketStream, buf: bytearray
) -> tuple[bytes, bytes, bytes] | None:
    """(method, path, body) of the next request, or None at a clean end of connection."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(_RECV)
        if not data:
            return None
        buf += data
    head = bytes(buf[:end])
    del buf[: end + 4]
    method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
    length = 0
    lower = head.lower()
    if (at := lower.find(b"content-length:")) >= 0:
        line_end = lower.find(b"\r\n", at)
        length = int(lower[at + 15 : line_end if line_end >= 0 else len(lower)])
    while len(buf) < length:
        data = await stream.receive_some(_RECV)
        if not data:
            return None
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return method, target.split(b"?", 1)[0], body


async def _serve(fake: FakeOpenAI, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, port, host=host))
            bound = listeners[0].socket.getsockname()
            print(f"READY http://{bound[0]}:{bound[1]}", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--scripts", default="{}", help="JSON: model -> {n_tokens, pace}")
    args = parser.parse_args(argv)
    scripts = {model: Script(**spec) for model, spec in json.loads(args.scripts).items()}
    trio.run(_serve, FakeOpenAI(scripts), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
