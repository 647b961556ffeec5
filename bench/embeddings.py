"""Throughput of the in-process embedding model (`proxy.infra.embedder.LocalEmbedder`).

Usage: .venv/bin/python bench/embeddings.py [--threads 1 2] [--seconds 3] [--batch-tokens 512]

For each ONNX intra-op thread count it prints embeddings/s (wall clock and per CPU-second of
this process) for batch 1 and batch 32, on short (~12-token) and ~100-token sentences, through
`embed_sync`; then the same workload as 32 concurrent `embed()` calls of one text each through
the batcher, with the number of ONNX runs it took and the gaps between ticks of an
event-loop task running alongside.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence

import trio

from proxy.infra.embedder import LocalEmbedder

_TOPICS = [
    "password resets",
    "invoice disputes",
    "shipping delays",
    "API rate limits",
    "GPU drivers",
    "tax forms",
    "guitar lessons",
    "sourdough bread",
]


def short_sentences(n: int) -> list[str]:
    return [f"Question {i}: how do I get help with {_TOPICS[i % len(_TOPICS)]}?" for i in range(n)]


def long_sentences(n: int) -> list[str]:
    return [
        f"Ticket {i} about {_TOPICS[i % len(_TOPICS)]}: the customer wrote in on Monday morning "
        "to say that the problem started after last week's update, that they had already "
        "tried restarting the application, clearing the cache and signing in again from a "
        "different browser, and that none of it helped. They attached two screenshots and "
        "a log file, asked whether anyone else had reported the same issue, and requested "
        "a call back before Friday because their team depends on this workflow for the "
        "monthly report that goes to the board."
        for i in range(n)
    ]


def measure(call: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Run `call` (returns texts embedded) repeatedly; embeddings per wall and CPU second."""
    call()
    done = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        done += call()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return done / wall, done / cpu


def embed_count(embedder: LocalEmbedder, texts: Sequence[str]) -> int:
    return len(embedder.embed_sync(texts).token_counts)


def sync_rates(embedder: LocalEmbedder, texts: Sequence[str], seconds: float) -> None:
    one = [texts[0]]
    batch = list(texts[:32])
    for label, inputs in (("batch 1", one), ("batch 32", batch)):
        wall, cpu = measure(functools.partial(embed_count, embedder, inputs), seconds)
        print(f"    {label:9} {wall:7.1f}/s wall  {cpu:7.1f}/CPU-s")


async def concurrent_rates(embedder: LocalEmbedder, texts: Sequence[str], seconds: float) -> None:
    gaps: list[float] = []
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await trio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def one_call(text: str) -> None:
        await embedder.embed([text])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.05)
        rounds = 0
        runs0 = embedder.onnx_runs
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            async with trio.open_nursery() as callers:
                for text in texts[:32]:
                    callers.start_soon(one_call, text)
            rounds += 1
        elapsed = time.perf_counter() - start
        stop = True
    runs = (embedder.onnx_runs - runs0) / rounds
    gaps.sort()
    p99, worst = gaps[int(len(gaps) * 0.99)], gaps[-1]
    print(
        f"    32 concurrent calls  {32 * rounds / elapsed:7.1f}/s wall  "
        f"{runs:.1f} ONNX runs per 32 calls  loop tick (1 ms sleep) p99 {p99 * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms"
    )


async def main_async(threads: Sequence[int], seconds: float, batch_tokens: int) -> None:
    corpora = {"short": short_sentences(32), "~100-token": long_sentences(32)}
    for count in threads:
        embedder = LocalEmbedder(intra_op_threads=count, max_batch_tokens=batch_tokens)
        start = time.perf_counter()
        await trio.to_thread.run_sync(embedder.load)
        print(
            f"intra_op_threads={count}  (load {time.perf_counter() - start:.2f} s, "
            f"max_batch_tokens={batch_tokens})"
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(embedder.serve)
            for name, texts in corpora.items():
                tokens = embedder.embed_sync(texts[:1]).token_counts[0]
                print(f"  {name} sentences ({tokens} tokens incl. [CLS]/[SEP])")
                await trio.to_thread.run_sync(sync_rates, embedder, texts, seconds)
                await concurrent_rates(embedder, texts, seconds)
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch-tokens", type=int, default=512)
    args = parser.parse_args()
    trio.run(main_async, args.threads, args.seconds, args.batch_tokens)


if __name__ == "__main__":
    main()
