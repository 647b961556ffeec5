"""Backends for pipelines, through the gateway's own routing layer.

A worker builds the same `Router`, backend clients and model catalogue as the gateway (from
the same settings), so a pipeline names models exactly as clients do — aliases, prefixes,
defaults, names the backends list.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import trio

from proxy.domain.chat import ChatCompletion, ChatRequest, Usage
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamFailed, StreamStart, UsageReport
from proxy.domain.routing import Route, Router
from proxy.domain.tokens import charged_usage
from proxy.infra.backends import Backend, BackendCall, Batch
from proxy.services.models import ModelCatalog
from proxy.workflow.emitter import TaskEmitter
from proxy.workflow.job import OPTIONS_FIELD


@dataclass(slots=True)
class Answer:
    """One model call's outcome."""

    model: str
    completion: ChatCompletion
    ttft_ms: float | None
    total_ms: float

    @property
    def usage(self) -> Usage | None:
        return self.completion.usage


class LLM:
    """Model calls for one job: routed like the gateway routes, tagged with the job's ids.

    `spent` adds up what every call cost, as the gateway charges a direct call: the backend's
    usage once an answer ended, an estimate of what a failed or cancelled one (a fan-out's
    loser) had generated."""

    def __init__(
        self, router: Router, backends: Mapping[str, Backend], *, headers: Mapping[str, str],
        catalog: ModelCatalog | None = None,
    ) -> None:
        self._router = router
        self._backends = backends
        self._headers = dict(headers)
        self._catalog = catalog
        self._spent: list[Usage] = []

    @property
    def spent(self) -> Usage | None:
        """Every call's tokens so far; None while no call reported or generated any."""
        if not self._spent:
            return None
        return Usage(sum(u.prompt_tokens for u in self._spent), sum(u.completion_tokens for u in self._spent))

    async def resolve(self, model: str) -> Route:
        """The backend route for `model`; GatewayError (404) for a model no backend serves.
        As in the gateway, a name no backend was known to list makes the worker look at the
        backends' listings (once per `models_cache_seconds`) before it is refused."""
        try:
            return self._router.resolve(model)
        except GatewayError as error:
            if error.code != "model_not_found" or self._catalog is None:
                raise
        await self._catalog.models()
        return self._router.resolve(model)

    async def stream(self, request: ChatRequest, *, into: TaskEmitter | None = None) -> Answer:
        """Run `request` (its `model` picks the backend) as a stream; every content event goes
        to `into` as it arrives. Raises GatewayError when the call fails, before or during
        the stream."""
        route = await self.resolve(request.model)
        backend = self._backends[route.backend]
        sent = _for_backend(request, stream=True)
        call = BackendCall(sent, route.upstream_model, headers=self._headers)
        builder = CompletionBuilder()
        try:
            return await self._stream(backend, call, route, builder, request.model, into)
        finally:  # also when the call failed or was cancelled: its tokens were spent all the same
            usage, _ = charged_usage(sent, builder)
            if usage is not None:
                self._spent.append(usage)

    async def _stream(
        self, backend: Backend, call: BackendCall, route: Route, builder: CompletionBuilder, model: str,
        into: TaskEmitter | None,
    ) -> Answer:
        started = time.perf_counter()
        ttft: float | None = None
        failure: GatewayError | None = None
        send, receive = trio.open_memory_channel[Batch | GatewayError](16)

        async def pump() -> None:
            async with send:
                try:
                    await backend.stream(call, send)
                except GatewayError as error:
                    await send.send(error)

        timeout = backend.config.timeouts.total
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                async with receive:
                    async for item in receive:
                        if isinstance(item, GatewayError):
                            failure = item
                            break
                        for event in item.events:
                            builder.add(event)
                            if isinstance(event, StreamFailed):
                                failure = event.error
                                break
                            if ttft is None and not _is_head(event):
                                ttft = (time.perf_counter() - started) * 1000
                            if into is not None:
                                await into.emit(event)
                        if failure is not None or item.done:
                            break
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            failure = GatewayError(
                ErrorKind.TIMEOUT, f"Backend `{route.backend}` did not finish within {timeout:g}s.", code="backend_timeout"
            )
        if failure is not None:
            raise failure
        return Answer(model, builder.build(), ttft, (time.perf_counter() - started) * 1000)

    async def complete(self, request: ChatRequest) -> Answer:
        """Run `request` without streaming anything anywhere (a judge, a tool)."""
        return await self.stream(request)


def _is_head(event: object) -> bool:
    return isinstance(event, StreamStart | UsageReport)


def _for_backend(request: ChatRequest, *, stream: bool) -> ChatRequest:
    """The request as a backend should get it: one choice, usage reported, and without the
    client's workflow options."""
    extra = {k: v for k, v in request.extra.items() if k != OPTIONS_FIELD}
    params = replace(request.params, n=None)
    return replace(request, params=params, extra=extra, stream=stream, include_usage=True)
