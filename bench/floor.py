"""The server floor: what hypercorn's trio worker alone costs per request on this machine.

    .venv/bin/python -m bench.floor [--seconds 5]

A bare ASGI app that reads the request and answers a canned completion, with no upstream
call, no framework and no journal: the ceiling any gateway on this stack (hypercorn + trio)
can reach. It runs pinned to core 0 like the gateway, loaded by the benchmark's own load
generator from core 1 with the same non-streaming requests, at c = 1, 16 and 64.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .load import Endpoint, closed_loop, percentile
from .procs import Family, Processes, free_port

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
_BODY = (
    b'{"id":"chatcmpl-floor","object":"chat.completion","created":0,"model":"instant","choices":'
    b'[{"index":0,"message":{"role":"assistant","content":"floor"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor: read the body, answer the canned completion."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": _BODY})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    server_core = str(cpus[0]) if len(cpus) >= 2 else None
    if server_core is not None:
        os.sched_setaffinity(0, {cpus[1]})
    port = free_port()
    python = str(REPO / ".venv" / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="llm-proxy-floor-") as tmp, Processes(Path(tmp), REPO) as procs:
        server = procs.start(
            "floor",
            [python, "-m", "hypercorn", "-k", "trio", "--bind", f"{HOST}:{port}", "bench.floor:app"],
            cpus=server_core,
        )
        procs.wait_http(server, f"http://{HOST}:{port}/", timeout=30)
        family = Family(server.pid)
        print("| concurrency | req/s | p50 ms | p99 ms | server CPU | CPU ms/req |")
        print("|---:|---:|---:|---:|---:|---:|")
        for concurrency in (1, 16, 64):
            result = trio.run(
                partial(
                    closed_loop, Endpoint(HOST, port), "instant", concurrency=concurrency, stream=False,
                    warmup=0.5, duration=args.seconds, clocks={"server": family.cpu},
                )
            )
            busy = result.clocks["server"]
            print(
                f"| {concurrency} | {result.rps:,.0f} | {percentile(result.latencies, 50) * 1000:.2f} | "
                f"{percentile(result.latencies, 99) * 1000:.2f} | {busy / result.seconds:.0%} | "
                f"{busy / max(1.0, result.rps * result.seconds) * 1000:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
