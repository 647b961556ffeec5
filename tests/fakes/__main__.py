"""Run one fake backend as a process (benchmarks, subprocess tests).

    python -m tests.fakes openai --port 8001 --tokens 200 --pace 0.005

Prints ``READY http://HOST:PORT`` on stdout once listening. On SIGINT/SIGTERM it prints
``STATS {json}`` (requests, completed, cancelled, disconnects, ...) and exits 0. While it
runs, ``GET /_fake/stats``, ``POST /_fake/reset`` and ``POST /_fake/script`` control it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import trio

from .anthropic_backend import AnthropicBackend
from .base import FakeBackend
from .ollama_backend import OllamaBackend
from .openai_backend import OpenAIBackend
from .script import Script, ToolCall
from .server import serve_fake

_BACKENDS: dict[str, type[FakeBackend]] = {
    "openai": OpenAIBackend,
    "ollama": OllamaBackend,
    "anthropic": AnthropicBackend,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description=__doc__)
    parser.add_argument("dialect", choices=sorted(_BACKENDS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=None, help="content pieces per reply")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between writes")
    parser.add_argument("--header-delay", type=float, default=0.0, help="seconds before headers")
    parser.add_argument("--reasoning", type=int, default=0, help="reasoning pieces first")
    parser.add_argument("--tool-calls", type=int, default=0, help="parallel tool calls")
    parser.add_argument("--frames-per-write", type=int, default=1)
    parser.add_argument("--fail-after", type=int, default=None)
    parser.add_argument("--fail-mode", choices=["error", "close", "reset"], default="error")
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--status", type=int, default=None, help="fail every request")
    parser.add_argument("--model", action="append", default=None, help="only these models exist")
    parser.add_argument("--embedding-dim", type=int, default=384)
    parser.add_argument("--api-key", default=None, help="openai/anthropic: require this key")
    parser.add_argument("--history", type=int, default=10000, help="records kept in memory")
    parser.add_argument(
        "--script", default=None, help="a Script as JSON; overrides the flags above"
    )
    return parser


def script_from_args(args: argparse.Namespace) -> Script:
    if args.script:
        return Script.from_dict(json.loads(args.script))
    return Script(
        n_tokens=args.tokens,
        pace=args.pace,
        header_delay=args.header_delay,
        reasoning=[f"r{i} " for i in range(args.reasoning)],
        tool_calls=[
            ToolCall(name=f"tool_{i}", arguments=json.dumps({"n": i}))
            for i in range(args.tool_calls)
        ],
        frames_per_write=args.frames_per_write,
        fail_after=args.fail_after,
        fail_mode=args.fail_mode,
        stall_after=args.stall_after,
        status=args.status,
    )


def build_backend(args: argparse.Namespace) -> FakeBackend:
    kwargs: dict[str, Any] = {
        "default": script_from_args(args),
        "models": args.model,
        "embedding_dim": args.embedding_dim,
        "history": args.history,
    }
    if args.api_key is not None and args.dialect in ("openai", "anthropic"):
        kwargs["api_key"] = args.api_key
    return _BACKENDS[args.dialect](**kwargs)


async def _serve(backend: FakeBackend, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve_fake(backend, host=host, port=port) as server:
            backend.server = server
            print(f"READY {server.url}", flush=True)
            async for _ in signals:
                break
        stats = backend.recorder.stats()
        stats["connections_total"] = server.connections_total
        print(f"STATS {json.dumps(stats)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    backend = build_backend(args)
    trio.run(_serve, backend, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
