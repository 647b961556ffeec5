"""Pipelines of the tests' own, loaded by `function = "tests.workflow_pipelines:NAME"`."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import trio

from proxy.domain.chat import FinishReason
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import Finish
from proxy.workflow.pipelines import PipelineContext, PipelineResult


async def count(ctx: PipelineContext) -> None:
    """"0 1 2 … n-1 " as fast as it can, no backend: every token must reach the client."""
    for i in range(int(ctx.options.get("n", 20))):
        await ctx.emit.text(f"{i} ")
        if ctx.options.get("pace"):
            await trio.sleep(float(ctx.options["pace"]))
    await ctx.emit.emit(Finish(FinishReason.STOP))


async def refuse(ctx: PipelineContext) -> None:
    raise GatewayError(ErrorKind.RATE_LIMITED, "Too many colours today.", retry_after=7)


async def crash(ctx: PipelineContext) -> None:
    await ctx.emit.text("partial ")
    raise RuntimeError("bug in the pipeline")


async def echo(ctx: PipelineContext) -> PipelineResult:
    """One model, streamed live (no tasks announced): the client sees tokens as they come."""
    model = str(ctx.options.get("model", ctx.request.model))
    answer = await ctx.llm.stream(replace(ctx.request, model=model), into=ctx.emit.task(0))
    return PipelineResult(winner=answer.model)


async def plain(ctx: PipelineContext) -> None:
    """README's minimal pipeline: text, then return (no `Finish`)."""
    await ctx.emit.text("Just text.")


async def nothing(ctx: PipelineContext) -> None:
    """Returns without emitting anything: an empty answer."""


async def die(ctx: PipelineContext) -> None:
    """Kills its worker process once its answer has started (a pipeline that runs the worker
    out of memory, say): every worker that runs it dies."""
    await ctx.emit.text("Dying ")
    await ctx.emit.flush()
    os.kill(os.getpid(), signal.SIGKILL)


async def ponder(ctx: PipelineContext) -> None:
    """Thinks for `wait` seconds without a word (a long non-streamed model call, say), then
    answers."""
    await trio.sleep(float(ctx.options.get("wait", 15)))
    await ctx.emit.text("Pondered.")


async def spend_then_fail(ctx: PipelineContext) -> None:
    """Asks a model, then refuses its answer (a check of the pipeline's own): the call's
    tokens were spent all the same."""
    await ctx.llm.complete(replace(ctx.request, model=str(ctx.options.get("model", ctx.request.model))))
    raise GatewayError(ErrorKind.BACKEND, "The answer did not pass the pipeline's check.", code="check_failed")


async def spend_then_ponder(ctx: PipelineContext) -> None:
    """Asks a model, then thinks a while before it answers (`wait` seconds): a job whose
    tokens are spent long before its end."""
    await ctx.llm.complete(replace(ctx.request, model=str(ctx.options.get("model", ctx.request.model))))
    await trio.sleep(float(ctx.options.get("wait", 4)))
    await ctx.emit.text("Pondered.")
