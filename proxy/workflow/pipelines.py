"""Pipelines: what they receive, what they return, and how they are found by name.

A pipeline is a trio async function:

    async def my_pipeline(ctx: PipelineContext) -> PipelineResult | None:
        answer = await ctx.llm.stream(replace(ctx.request, model="qwen3-8b"), into=ctx.emit.task(0))
        return PipelineResult(winner=answer.model)

It streams through `ctx.emit` (its events become the client's stream, in the client's
dialect) and may call any model the gateway routes through `ctx.llm`. Returning None means
"the answer is what I emitted". Raising `GatewayError` fails the job with that error (a
real HTTP status if nothing was emitted yet); cancellation (client gone) arrives as
`trio.Cancelled` — let it through.

Names resolve in this order: `[workflow.pipelines.NAME] function = "pkg.mod:fn"` in the
config, then the `llm_proxy.pipelines` entry-point group, then `BUILTIN`. Only the chosen
one is imported, when a worker starts.

A pipeline function may carry a `check_options(options) -> None` attribute that raises
ValueError for bad config options; a worker calls it at start (fail fast, naming the key).

Extension point: a built-in pipeline is one line in `BUILTIN` (name -> "module:function").
`rag-answer` belongs there once retrieval exists.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from proxy.config import Settings, WorkflowSettings
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.infra.resources import Resources
from proxy.workflow.emitter import Emitter
from proxy.workflow.job import Job, valid_pipeline
from proxy.workflow.llm import LLM

ENTRY_POINT_GROUP = "llm_proxy.pipelines"

BUILTIN: dict[str, str] = {
    "fanout": "proxy.workflow.fanout:fanout",
}


@dataclass(slots=True)
class PipelineContext:
    job: Job
    request: ChatRequest  # the client's request, without its `workflow` options object
    options: Mapping[str, Any]  # the config's table for this pipeline, overlaid by the request's
    emit: Emitter
    llm: LLM
    resources: Resources  # `database` / `bus`: None while down; read them when needed
    settings: Settings


@dataclass(slots=True)
class PipelineResult:
    completion: ChatCompletion | None = None  # the client's answer; None: what was emitted
    winner: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # stored with the run (JSON)


Pipeline = Callable[[PipelineContext], Awaitable[PipelineResult | None]]


class PipelineError(Exception):
    """A pipeline name that does not resolve to a function."""


class PipelineRegistry:
    def __init__(self, settings: WorkflowSettings) -> None:
        self._settings = settings
        self._names: list[str] | None = None
        self._entries: dict[str, str] | None = None

    def names(self) -> list[str]:
        """Every pipeline name known here, without importing any of them."""
        if self._names is None:
            names = set(BUILTIN) | set(self._entry_points())
            names |= {name for name, config in self._settings.pipelines.items() if config.function}
            self._names = sorted(names)
        return self._names

    def knows(self, name: str) -> bool:
        return name in self.names()

    def path(self, name: str) -> str:
        config = self._settings.pipelines.get(name)
        if config is not None and config.function:
            return config.function
        entry = self._entry_points().get(name)
        if entry is not None:
            return entry
        if name in BUILTIN:
            return BUILTIN[name]
        known = ", ".join(self.names()) or "none"
        raise PipelineError(f"unknown pipeline {name!r} (known: {known})")

    def load(self, name: str) -> Pipeline:
        if not valid_pipeline(name):
            raise PipelineError(f"bad pipeline name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
        path = self.path(name)
        module_name, _, attr = path.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise PipelineError(f"pipeline {name!r}: cannot load {path!r}: {exc}") from exc
        if not callable(target):
            raise PipelineError(f"pipeline {name!r}: {path!r} is not a function")
        check = getattr(target, "check_options", None)
        if callable(check):
            try:
                check(self.options(name))
            except ValueError as exc:
                raise PipelineError(f"pipeline {name!r}: `workflow.pipelines.{name}`: {exc}") from exc
        return cast(Pipeline, target)

    def options(self, name: str) -> dict[str, Any]:
        config = self._settings.pipelines.get(name)
        return dict(config.options) if config is not None else {}

    def _entry_points(self) -> dict[str, str]:
        # Scanning the installed distributions is slow; they do not change while we run.
        if self._entries is None:
            self._entries = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        return self._entries
