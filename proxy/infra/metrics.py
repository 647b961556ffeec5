"""Prometheus metrics: what every request did, counted from its request-log record.

One `Metrics` per process. With `--workers N` each worker counts into files of a directory
the parent made (prometheus_client's multiprocess mode, `multiprocess_dir`), and whichever
worker a scrape reaches sums them all, so a scrape through the shared port sees the whole
gateway. A bound child of a metric is kept per label set: a record costs a dict lookup and
an increment or two, never a `labels()` call.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.infra.backends import Backend
from proxy.services.chat import ExchangeRecord, RecordSink

CONTENT_TYPE = CONTENT_TYPE_LATEST
_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ReplicaCollector(Collector):
    """Each backend replica's state, read when scraped (nothing on the request path). With
    `--workers N` it is the view of the worker that answers the scrape."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "llm_proxy_backend_replica_up", "1 while a backend replica gets requests, 0 while it is set aside.",
            labels=["backend", "replica"],
        )
        in_flight = GaugeMetricFamily(
            "llm_proxy_backend_replica_in_flight", "Requests a backend replica is serving (streams until they end).",
            labels=["backend", "replica"],
        )
        for name, backend in self._backends.items():
            for replica in backend.replicas():
                up.add_metric([name, replica.url], 0 if replica.set_aside_for else 1)
                in_flight.add_metric([name, replica.url], replica.in_flight)
        yield up
        yield in_flight


def _count_failover(children: Mapping[str, Counter], url: str) -> None:
    children[url].inc()


# Records held until the backends are first listed: past this many, counted at once (unlabelled).
_HELD_MAX = 1000
# Names a backend answered without listing them (Anthropic's `claude-sonnet-4-5`, which it lists
# only dated; a name a prefix routes): labelled as asked, up to this many per process, since a
# backend that answers any name (llama.cpp's server) would make a series of every typo.
_ANSWERED_MAX = 64


class Metrics:
    """`known(model)` tells a model name the gateway knows from a client's free text (a typo,
    or any name a default backend accepts): only known names become a `model` label.

    The names backends list are known once they are listed, which happens lazily (no backend
    call at start-up): at a scrape, a `/v1/models` call, a name no backend was known to serve.
    Until then (`listed()`), a record of a name not known otherwise is held, and counted once
    they are (`learnt()`; a scrape lists them first): a model the default backend serves is
    labelled with its name from its first request on. With `--workers N`, a scrape may reach
    another worker than the one holding records: that one has `learn()` list them at once, in
    the background."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        known: Callable[[str], bool],
        listed: Callable[[], bool] | None = None,
        learn: Callable[[], None] | None = None,
    ) -> None:
        # Its own registry: two gateways in one process (the tests) do not share counts.
        self._registry = CollectorRegistry(auto_describe=True)
        registry = self._registry
        self._replicas = _ReplicaCollector(backends)
        registry.register(self._replicas)
        self._requests = Counter(
            "llm_proxy_requests", "Requests answered, by what they asked for and how they ended.",
            ["kind", "dialect", "model", "backend", "source", "status", "outcome"], registry=registry,
        )
        self._duration = Histogram(
            "llm_proxy_request_duration_seconds", "Time from the request's arrival to its last byte.",
            ["kind", "model", "backend", "stream"], buckets=_DURATION_BUCKETS, registry=registry,
        )
        # By `kind`: a speech stream's first audio bytes, a text completion's first token and a
        # chat's are not one latency, even under one model label (`""` for every unknown name).
        self._ttft = Histogram(
            "llm_proxy_time_to_first_token_seconds", "Time from a streamed request's arrival to its first token.",
            ["kind", "model", "backend"], buckets=_TTFT_BUCKETS, registry=registry,
        )
        self._prompt = Counter(
            "llm_proxy_prompt_tokens", "Prompt tokens (the backend's count, else the gateway's estimate).",
            ["kind", "model", "backend"], registry=registry,
        )
        self._completion = Counter(
            "llm_proxy_completion_tokens", "Completion tokens (the backend's count, else the gateway's estimate).",
            ["model", "backend"], registry=registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._known = known
        self._answered: set[str] = set()
        self._listed = listed or (lambda: True)
        self._learn = learn if os.environ.get(_MULTIPROCESS_ENV) else None
        self._held: list[ExchangeRecord] | None = [] if listed is not None else None
        # Counted as they happen, not read from the replicas when scraped: with `--workers N`
        # a scrape reaches one worker, and its own count alone would go down from one scrape
        # to the next (a counter reset, to Prometheus).
        failovers = Counter(
            "llm_proxy_backend_replica_failovers",
            "Requests moved from a backend replica to another: unreachable, 503, or silent past its patience.",
            ["backend", "replica"], registry=registry,
        )
        for name, backend in backends.items():
            children = {replica.url: failovers.labels(name, replica.url) for replica in backend.replicas()}
            backend.watch_failovers(functools.partial(_count_failover, children))

    def sink(self) -> RecordSink:
        """The record sink for every request's record."""
        return self.observe

    def observe(self, entry: ExchangeRecord) -> None:
        held = self._held
        if held is not None:
            if self._listed():
                self.learnt()
            elif len(held) < _HELD_MAX and not self._known(entry.model):
                if not held and self._learn is not None:
                    self._learn()
                held.append(entry)
                return
        self._count(entry)

    def learnt(self) -> None:
        """The backends were listed: count the records held until then, under the names
        known now (a call after the first does nothing)."""
        held, self._held = self._held, None
        for entry in held or ():
            self._count(entry)

    def _count(self, entry: ExchangeRecord) -> None:
        model = self._model_label(entry)
        backend = entry.backend
        outcome = "cancelled" if entry.cancelled else "error" if entry.error or entry.status >= 400 else "ok"
        # A client that left before the response began got no status: nginx's 499 says so.
        status = str(entry.status) if entry.status else "499"
        child, kind = self._child, entry.kind
        child(self._requests, kind, entry.dialect, model, backend, entry.source, status, outcome).inc()
        child(self._duration, kind, model, backend, "true" if entry.stream else "false").observe(entry.total_ms / 1000)
        if entry.ttft_ms is not None and entry.stream:
            child(self._ttft, kind, model, backend).observe(entry.ttft_ms / 1000)
        if entry.source != "backend":
            return  # a replay, a cache hit or a follower of another's run: no backend produced its tokens
        if entry.prompt_tokens:
            child(self._prompt, kind, model, backend).inc(entry.prompt_tokens)
        if entry.completion_tokens:
            child(self._completion, model, backend).inc(entry.completion_tokens)

    def _model_label(self, entry: ExchangeRecord) -> str:
        """A name the gateway knows, or one a backend answered (see `_ANSWERED_MAX`); else "":
        a client's free text that no backend took would make one series per typo, without bound."""
        model = entry.model
        if model in self._answered or self._known(model):
            return model
        answered = entry.source == "backend" and 200 <= entry.status < 400 and not entry.error
        if answered and model and len(self._answered) < _ANSWERED_MAX:
            self._answered.add(model)
            return model
        return ""

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The exposition text: this process's counts, or every worker's in multiprocess mode."""
        if os.environ.get(_MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(self._replicas)
            return generate_latest(registry)
        return generate_latest(self._registry)


@contextmanager
def multiprocess_dir() -> Iterator[None]:
    """For a parent about to start workers: a fresh directory for their counts, named in the
    environment they inherit (before any of them imports prometheus_client), removed after.
    One the operator named already is used as it is."""
    if os.environ.get(_MULTIPROCESS_ENV):
        yield
        return
    path = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ[_MULTIPROCESS_ENV] = path
    try:
        yield
    finally:
        del os.environ[_MULTIPROCESS_ENV]
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["CONTENT_TYPE", "Metrics", "multiprocess_dir"]
