"""`llm-proxy worker`: run workflow jobs (resident, or one job for a systemd unit)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from proxy.config import ConfigError, Settings
from proxy.infra.aio import asyncio_bridge
from proxy.workflow.job import valid_pipeline, valid_trace_id
from proxy.workflow.pipelines import PipelineError
from proxy.workflow.worker import Worker, WorkerOptions, run_one_job

log = logging.getLogger("llm_proxy.worker")

CONFIG_ENV = "LLM_PROXY_CONFIG"


def add_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    worker = commands.add_parser(
        "worker", help="run workflow pipeline jobs (needs NATS_URL; DATABASE_URL to store the runs)"
    )
    common(worker)
    worker.add_argument("--pipelines", nargs="+", metavar="NAME", help="pipelines to serve (default: all known)")
    worker.add_argument("--concurrency", type=int, help="jobs run at once (default: workflow.concurrency, 16)")
    worker.add_argument(
        "--drain-seconds", type=float, default=30.0,
        help="on SIGINT/SIGTERM, how long running jobs may finish before they are handed back (default 30)",
    )
    worker.add_argument("--one-job", metavar="TRACE_ID", help="run this one job (systemd launch mode) and exit")


def default_config(args: argparse.Namespace) -> None:
    """`--config` falls back to $LLM_PROXY_CONFIG (what the systemd unit sets; `serve`, `migrate`,
    `keys` and `ingest` read the same file, as they read the other `LLM_PROXY_*` settings)."""
    if getattr(args, "config", None) is None and os.environ.get(CONFIG_ENV):
        args.config = Path(os.environ[CONFIG_ENV])


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        settings = _checked(args, settings)
    except ConfigError as error:
        print(f"llm-proxy worker: {error}", file=sys.stderr)
        return 2
    if args.one_job is not None:
        return trio.run(_one, settings, args.one_job)
    options = WorkerOptions(args.pipelines, args.concurrency, args.drain_seconds)
    try:
        worker = Worker(settings, options)
    except PipelineError as error:
        print(f"llm-proxy worker: {error}", file=sys.stderr)
        return 2
    trio.run(_serve, worker)
    return 0


def _checked(args: argparse.Namespace, settings: Settings) -> Settings:
    if not settings.nats_url:
        raise ConfigError(
            "needs NATS: set NATS_URL (or `nats_url`) to the gateway's NATS server"
        )
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("`--concurrency` must be at least 1")
    if args.drain_seconds < 0:
        raise ConfigError("`--drain-seconds` must not be negative")
    for name in args.pipelines or []:
        if not valid_pipeline(name):
            raise ConfigError(f"`--pipelines`: bad pipeline name {name!r}")
    if args.one_job is not None and not valid_trace_id(args.one_job):
        raise ConfigError(f"`--one-job`: bad trace id {args.one_job!r}")
    if not settings.database_url:
        log.warning("no DATABASE_URL: workflow runs will not be stored")
    return replace(settings, embedded=False)


async def _serve(worker: Worker) -> None:
    async with asyncio_bridge():
        await worker.run(handle_signals=True)


async def _one(settings: Settings, trace_id: str) -> int:
    async with asyncio_bridge():
        return await run_one_job(settings, trace_id)
