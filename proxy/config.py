"""Settings: a TOML file, overridden by the environment, validated once at start-up.

Any problem is a `ConfigError` whose message names the offending key; the CLI prints it
and exits — a bad config never becomes a traceback.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BACKEND_KINDS = ("openai", "ollama", "anthropic")


class ConfigError(Exception):
    """The configuration is invalid; the message says which key and why."""


@dataclass(slots=True, frozen=True)
class Timeouts:
    """Seconds. `first_token` bounds the wait for the first streamed chunk, `idle` the gap
    between chunks, `total` the whole exchange; None disables one. `failover` (a backend
    with replicas) is how long a replica may send nothing before the request goes to
    another; None: the first-token (a stream) or total (a whole answer) budget shared
    evenly among the replicas."""

    connect: float | None = 10.0
    first_token: float | None = 300.0
    idle: float | None = 120.0
    total: float | None = 1800.0
    failover: float | None = None


@dataclass(slots=True, frozen=True)
class BackendConfig:
    name: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    prefixes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    default: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_connections: int = 100
    request_usage: bool = True
    cache: bool = False
    # Further base URLs of the same server (`base_url = [...]` in TOML): replicas serving the
    # same models, which share the requests and stand in for one another.
    replicas: tuple[str, ...] = ()
    # An OpenAI-compatible backend's chat-template fields (vLLM's and SGLang's) for other
    # dialects' clients: None is on, except for hosted APIs that refuse unknown fields.
    chat_template_fields: bool | None = None
    # Whether its requests carry the client's W3C trace context (`[tracing] propagate` on): off
    # for a third party that should not learn the client's trace ids.
    trace_context: bool = True

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @property
    def sends_template_fields(self) -> bool:
        """Whether an OpenAI-compatible backend gets `continue_final_message`,
        `add_generation_prompt` and `chat_template_kwargs` where another dialect's request
        needs them (vLLM and SGLang read them, llama.cpp and LM Studio ignore what they do not
        know; the hosted APIs in `_STRICT_HOSTS` answer 400 to any field they do not know)."""
        if self.chat_template_fields is not None:
            return self.chat_template_fields
        return not any(_strict_host(url) for url in self.urls)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every replica's base URL, `base_url` first."""
        return (self.base_url, *self.replicas)


# Hosted OpenAI-compatible APIs that refuse a request with a field they do not know.
_STRICT_HOSTS = ("api.openai.com", ".openai.azure.com", "api.mistral.ai", "api.groq.com",
                 "generativelanguage.googleapis.com")


def _strict_host(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == name or (name.startswith(".") and host.endswith(name)) for name in _STRICT_HOSTS)


PIPELINE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LAUNCH_MODES = ("pull", "systemd")


@dataclass(slots=True, frozen=True)
class PipelineConfig:
    """A `[workflow.pipelines.NAME]` table: `function` ("package.module:function") for a
    pipeline of your own, absent for built-in and entry-point pipelines; every other key is an
    option the pipeline reads (a request's `workflow` object may override them)."""

    function: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class WorkflowSettings:
    """The workflow route (`x-pipeline`) and `llm-proxy worker`. Seconds throughout."""

    launch: str = "pull"  # pull: resident workers; systemd: one oneshot unit per job
    default_pipeline: str | None = None  # for `x-route: workflow` without `x-pipeline`
    silence_seconds: float = 30.0  # the gateway's deadline on a job's silence
    ack_wait_seconds: float = 10.0  # a job whose worker stops heartbeating is redelivered
    max_deliver: int = 3  # deliveries of one job in all (first run + retries)
    concurrency: int = 16  # jobs one worker process runs at once
    job_retention_seconds: float = 86400.0  # unclaimed jobs are dropped after this
    job_timeout_seconds: float = 1800.0  # a pipeline running longer fails with a timeout
    unit: str = "llm-proxy-job@{trace_id}.service"
    systemctl: str = "systemctl"
    pipelines: Mapping[str, PipelineConfig] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class EmbeddingSettings:
    """`[embeddings]`: the in-process model (all-minilm-l6-v2) and the embeddings endpoints."""

    local_model: bool = True  # serve all-minilm-l6-v2 in-process (and list it)
    preload: bool = False  # load the ONNX model at start (in the background) instead of on first use
    threads: int = 1  # ONNX intra-op threads per run
    max_inputs: int = 2048  # inputs in one embeddings request


DEFAULT_RAG_TEMPLATE = (
    "Answer the user's question using the numbered passages below, retrieved from the "
    "knowledge base \"{workspace}\". Cite the passages you use by their numbers in square "
    "brackets, like [1] or [2][3]. If the passages do not contain the answer, say so; answer "
    "from general knowledge only if you say that you do.\n\n{passages}"
)


@dataclass(slots=True, frozen=True)
class RagSettings:
    """`[rag]`: chunking at ingest, retrieval and context injection (workspaces may override
    `top_k`, `score_threshold`, `candidates` and `rerank`)."""

    top_k: int = 4  # passages injected
    score_threshold: float = 0.3  # minimum MaxSim rerank score of an injected passage
    candidates: int = 40  # per retriever (vector, full text) before fusion
    rerank: int = 20  # fused candidates scored by MaxSim
    chunk_tokens: int = 200  # target chunk size, in the embedding model's tokens
    chunk_overlap: int = 40  # tokens repeated between consecutive chunks of a section
    template: str = DEFAULT_RAG_TEMPLATE  # the text put in front of the question: {workspace}, {passages}
    pdf_max_pages: int = 1000  # a longer PDF is refused (split it)
    pdf_max_bytes: int = 64 * 1024 * 1024  # a bigger PDF is refused (over HTTP `max_body_bytes` comes first)
    pdf_timeout_seconds: float = 120.0  # reading one PDF's text takes at most this long


@dataclass(slots=True, frozen=True)
class SemanticCacheSettings:
    """`[semantic_cache]`: answers reused for conversations that mean the same."""

    enabled: bool = False  # for every model; otherwise only `models` and `x-cache: semantic`
    models: tuple[str, ...] = ()
    threshold: float = 0.95  # cosine similarity every message must reach
    ttl_seconds: float = 3600.0


@dataclass(slots=True, frozen=True)
class BatchSettings:
    """`[batches]`: OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`)."""

    concurrency: int = 4  # lines of batches one gateway process runs at once (all its batches together)
    file_max_bytes: int = 100 * 1024 * 1024  # an uploaded file's size limit (OpenAI's: 200 MB)
    max_lines: int = 50_000  # requests in one batch (OpenAI's limit)
    poll_seconds: float = 5.0  # how often a gateway looks for batches nobody runs


@dataclass(slots=True, frozen=True)
class TracingSettings:
    """`[tracing]`: W3C Trace Context (`traceparent`, `tracestate`) on backend requests."""

    # Each backend request carries the client's trace (or one started for its request).
    propagate: bool = True
    # An OTLP/HTTP collector for the gateway's own spans (`OTEL_EXPORTER_OTLP_ENDPOINT`'s
    # meaning: `/v1/traces` is added); the standard environment overrides it.
    otlp_endpoint: str | None = None


# Ollama's default (`OLLAMA_ORIGINS`), plus IPv6's loopback: pages served from this machine
# and desktop-app webviews. Not Ollama's `file://*`: browsers send a file:// page's requests
# as `Origin: null`, which any site's sandboxed frame can send too, so it cannot be allowed.
DEFAULT_CORS_ORIGINS = (
    "http://localhost:*", "https://localhost:*",
    "http://127.0.0.1:*", "https://127.0.0.1:*",
    "http://0.0.0.0:*", "https://0.0.0.0:*",
    "http://[::1]:*", "https://[::1]:*",
    "app://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)

@dataclass(slots=True, frozen=True)
class Settings:
    backends: tuple[BackendConfig, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    # A model's stand-ins (client-facing names), tried in order when its backend fails before
    # answering: `[fallbacks] "qwen3-32b" = ["qwen3-8b"]`.
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 16 * 1024 * 1024
    # An audio file to transcribe or translate (its form around it aside): OpenAI's 25 MB.
    max_audio_bytes: int = 25 * 1024 * 1024
    models_cache_seconds: float = 10.0
    log_level: str = "info"
    access_log: bool = True
    # How long requests in flight may go on once the gateway is told to stop (SIGTERM, SIGINT).
    shutdown_grace_seconds: float = 5.0
    data_dir: Path | None = None
    database_url: str | None = None
    nats_url: str | None = None
    # Start PostgreSQL and NATS from the bundled packages when no URL is given.
    embedded: bool = True
    # Set by `llm-proxy serve` (never read from the config): the data directories of the
    # embedded PostgreSQL and NATS it started, which the gateway starts again should they stop.
    embedded_pgdata: Path | None = None
    embedded_nats: Path | None = None
    embeddings: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    rag: RagSettings = field(default_factory=RagSettings)
    semantic_cache: SemanticCacheSettings = field(default_factory=SemanticCacheSettings)
    batches: BatchSettings = field(default_factory=BatchSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    # API keys (proxy.services.auth): "auto" asks for a key once any exists, "required"
    # always, "off" never. /health is always open; these paths too.
    auth: str = "auto"
    auth_public_paths: tuple[str, ...] = ("/ready", "/openapi.json")  # = DEFAULT_PUBLIC_PATHS
    # Browser origins that may call the gateway (see `parse_origin_pattern`); the default is
    # Ollama's: local pages and desktop-app schemes only, since the gateway listens on every
    # interface and asks no key until one exists.
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    # While no key is asked, `Host` names answered besides local ones (proxy.domain.hosts):
    # a reverse proxy's public name; `*` turns the DNS-rebinding check off.
    allowed_hosts: tuple[str, ...] = ()
    # `/metrics` for admin keys only (other tenants' per-model traffic is in it).
    metrics_admin_only: bool = False
    # A chat's media URLs that point inside the network are a 400 before an OpenAI-compatible
    # backend (vLLM) fetches them (proxy.infra.media_urls).
    refuse_private_media_urls: bool = False
    max_header_bytes: int = 16 * 1024
    cache_ttl_seconds: float = 3600.0
    events_retention_seconds: float = 86400.0
    # JetStream's chat events are bounded by size too (oldest discarded first): at a busy
    # gateway's event rate, a day's worth would fill a small disk.
    events_max_bytes: int = 4 * 1024**3
    # How long an Idempotency-Key (and a background response's, a failed cached attempt's key)
    # is remembered once its run has ended, as OpenAI and Stripe keep theirs.
    idempotency_retention_seconds: float = 86400.0
    # How long the completion log keeps a request's row (prompt and answer) once it has
    # ended, counted from when it was made: what OpenAI keeps stored Responses and stored
    # chat completions for, so a client's `GET` and `previous_response_id` work as they would
    # there, while a gateway running for months does not grow its database without bound.
    log_retention_seconds: float = 30 * 86400.0
    workflow: WorkflowSettings = field(default_factory=WorkflowSettings)

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (if given), apply environment overrides, validate."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a file") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    settings = _apply_environment(_parse(raw), env)
    _check_backends(settings.backends)  # again: the environment may have added one
    _check_auth_has_a_database(settings, "LLM_PROXY_AUTH" if "LLM_PROXY_AUTH" in env else "auth")
    if settings.metrics_admin_only and "/metrics" in settings.auth_public_paths:
        # Either would silently win over the other.
        raise ConfigError("`metrics_admin_only` asks an admin key for /metrics, but `auth_public_paths` serves it without one: drop one of them")
    return settings


def _check_auth_has_a_database(settings: Settings, key: str) -> None:
    """Keys live in PostgreSQL: a gateway that must ask for one and has no database to
    look it up in would refuse every request, for good."""
    if settings.auth == "required" and settings.database_url is None and not settings.embedded:
        raise ConfigError(
            f"`{key}` is \"required\" but API keys need a database: set `database_url` (or "
            "DATABASE_URL), or turn `embedded` back on"
        )


def parse_bind(value: str, key: str = "bind") -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"`{key}` must be HOST:PORT, got {value!r}")
    if "/" in host or (host.endswith(":") and not host.startswith("[")):
        # A URL pasted (`http://0.0.0.0:8080`), or an IPv6 address without its port or brackets
        # (`::1`): either would be looked up as a host name, and fail as an "unknown host".
        raise ConfigError(f"`{key}` must be HOST:PORT, with an IPv6 address in brackets ([::1]:8080), got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)


# -- parsing ---------------------------------------------------------------------------------

_TOP_KEYS = {
    "bind", "workers", "max_body_bytes", "max_audio_bytes", "max_header_bytes", "auth", "auth_public_paths", "cors_origins",
    "allowed_hosts", "metrics_admin_only", "refuse_private_media_urls",
    "models_cache_seconds", "log_level", "access_log", "shutdown_grace_seconds",
    "data_dir", "database_url", "nats_url", "embedded", "cache_ttl_seconds", "events_retention_seconds",
    "events_max_bytes", "idempotency_retention_seconds", "log_retention_seconds",
    "timeouts", "models", "fallbacks", "backends", "embeddings", "rag", "semantic_cache", "workflow",
    "batches", "tracing",
}
_BACKEND_KEYS = {
    "name", "kind", "base_url", "api_key_env", "prefixes", "models", "default", "timeouts",
    "max_connections", "request_usage", "cache", "chat_template_fields", "trace_context",
}
_TIMEOUT_KEYS = {"connect", "first_token", "idle", "total", "failover"}
_WORKFLOW_KEYS = {
    "launch", "default_pipeline", "silence_seconds", "ack_wait_seconds", "max_deliver", "concurrency",
    "job_retention_seconds", "job_timeout_seconds", "unit", "systemctl", "pipelines",
}
_EMBEDDINGS_KEYS = {"local_model", "preload", "threads", "max_inputs"}
_RAG_KEYS = {
    "top_k", "score_threshold", "candidates", "rerank", "chunk_tokens", "chunk_overlap", "template",
    "pdf_max_pages", "pdf_max_bytes", "pdf_timeout_seconds",
}
_SEMANTIC_CACHE_KEYS = {"enabled", "models", "threshold", "ttl_seconds"}
_BATCHES_KEYS = {"concurrency", "file_max_bytes", "max_lines", "poll_seconds"}
_TRACING_KEYS = {"propagate", "otlp_endpoint"}

# Where each key is at home, to name it for a key written in another table: TOML puts every
# key below a `[table]` header into that table, so a top-level setting appended to the end of
# a file lands in its last table, and a table's setting written at the top lands nowhere.
_HOMES: tuple[tuple[str, set[str]], ...] = (
    ("at the top of the file, above the first [table] header: in TOML, a key below a header belongs to that table", _TOP_KEYS),
    ("in a `[[backends]]` entry", _BACKEND_KEYS),
    ("in `[timeouts]` or a backend's `timeouts`", _TIMEOUT_KEYS),
    ("in `[workflow]`", _WORKFLOW_KEYS),
    ("in `[embeddings]`", _EMBEDDINGS_KEYS),
    ("in `[rag]`", _RAG_KEYS),
    ("in `[semantic_cache]`", _SEMANTIC_CACHE_KEYS),
    ("in `[batches]`", _BATCHES_KEYS),
    ("in `[tracing]`", _TRACING_KEYS),
)

# TOML's names for the values a key may hold.
_TOML_TYPES = {str: "string", int: "integer", float: "float", bool: "boolean", list: "array", dict: "table"}


def _unknown_key_hint(name: str, where: str, allowed: set[str]) -> str:
    """What to say of an unknown key: the table(s) where it belongs, else the key of this table
    it is probably a misspelling of."""
    homes = [home for home, keys in _HOMES if name in keys and keys is not allowed]
    if homes:
        return f" (it belongs {' or '.join(homes)})"
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" (did you mean `{_join(where, close[0])}`?)" if close else ""


class _Reader:
    def __init__(self, data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            hint = _unknown_key_hint(unknown[0], where, allowed)
            raise ConfigError(f"unknown key `{_join(where, unknown[0])}`{hint}")
        self.data = data
        self.where = where

    def key(self, name: str) -> str:
        return _join(self.where, name)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        value = self.data.get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ConfigError(f"`{self.key(name)}` must be a number, got {value!r}")
        if not isinstance(value, kind):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = "number" if float in kinds and int in kinds else " or ".join(_TOML_TYPES.get(k, k.__name__) for k in kinds)
            raise ConfigError(f"`{self.key(name)}` must be of type {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            # TOML has nan and inf; neither is a size, a count or a number of seconds (trio
            # refuses a NaN deadline at the first request, long after start-up).
            raise ConfigError(f"`{self.key(name)}` must be a finite number, got {value!r}")
        if name.endswith("_seconds") and isinstance(value, (int, float)) and value > _MAX_SECONDS:
            # NATS refuses a stream's max_age past ~292 years (it kept the bus down, retrying),
            # PostgreSQL an interval past ~178 million years.
            raise ConfigError(f"`{self.key(name)}` must be at most {_MAX_SECONDS:g} (about 31 years), got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.get(name, list, [])
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(f"`{self.key(name)}` must be a list of non-empty strings")
        return tuple(value)

    def positive(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.get(name, kind, default)
        if value is not None and value <= 0:
            raise ConfigError(f"`{self.key(name)}` must be positive, got {value!r}")
        return value

    def workers(self) -> int:
        value: int = self.get("workers", int, 1)
        check_workers(value, self.key("workers"))
        return value

    def count(self, name: str, default: int, maximum: int, why: str) -> int:
        """A whole number from 1 to `maximum`; `why` says what the bound is for."""
        value: int = self.get(name, int, default)
        check_count(value, self.key(name), maximum, why)
        return value

    def non_negative(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.get(name, kind, default)
        if value is not None and value < 0:
            raise ConfigError(f"`{self.key(name)}` must not be negative, got {value!r}")
        return value


_MAX_SECONDS = 1e9
# Past these a number is a typo (10000 for 10): each worker is a process with its own pools,
# each ONNX thread a thread of the model's runs, and a machine has not so many cores to give.
MAX_WORKERS = 256
MAX_THREADS = 256
_PER_CORE = "more than one per CPU core only costs memory"


def check_count(value: int, key: str, maximum: int, why: str) -> None:
    if not 1 <= value <= maximum:
        raise ConfigError(f"`{key}` must be from 1 to {maximum} ({why}), got {value!r}")


def check_workers(value: int, key: str) -> None:
    """`workers` however it is given (the file, LLM_PROXY_WORKERS, `--workers`)."""
    check_count(value, key, MAX_WORKERS, f"worker processes: {_PER_CORE}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _parse(raw: Mapping[str, Any]) -> Settings:
    top = _Reader(raw, "", _TOP_KEYS)
    defaults = _parse_timeouts(top.get("timeouts", dict, {}), "timeouts", Timeouts())
    aliases = top.get("models", dict, {})
    for alias, target in aliases.items():
        if not isinstance(target, str) or not target:
            raise ConfigError(f"`models.{alias}` must name a model (a non-empty string)")
    fallbacks = _parse_fallbacks(top.get("fallbacks", dict, {}))
    backends = tuple(
        _parse_backend(item, f"backends[{i}]", defaults)
        for i, item in enumerate(top.get("backends", list, []))
    )
    _check_backends(backends)
    host, port = parse_bind(top.get("bind", str, "0.0.0.0:8080"))
    data_dir = top.get("data_dir", str)
    level = _log_level(top.get("log_level", str, "info"), "log_level")
    return Settings(
        backends=backends,
        aliases=dict(aliases),
        fallbacks=fallbacks,
        host=host,
        port=port,
        workers=top.workers(),
        max_body_bytes=top.positive("max_body_bytes", int, 16 * 1024 * 1024),
        max_audio_bytes=top.positive("max_audio_bytes", int, 25 * 1024 * 1024),
        models_cache_seconds=float(top.non_negative("models_cache_seconds", (int, float), 10.0)),
        log_level=level,
        access_log=top.get("access_log", bool, True),
        shutdown_grace_seconds=float(top.positive("shutdown_grace_seconds", (int, float), 5.0)),
        data_dir=check_data_dir(Path(data_dir).expanduser(), "data_dir") if data_dir else None,
        database_url=database_url(top.get("database_url", str), "database_url"),
        nats_url=nats_url(top.get("nats_url", str), "nats_url"),
        embedded=top.get("embedded", bool, True),
        embeddings=_parse_embeddings(top.get("embeddings", dict, {})),
        rag=_parse_rag(top.get("rag", dict, {})),
        semantic_cache=_parse_semantic_cache(top.get("semantic_cache", dict, {})),
        batches=_parse_batches(top.get("batches", dict, {})),
        tracing=_parse_tracing(top.get("tracing", dict, {})),
        auth=_auth_mode(top.get("auth", str, "auto"), "auth"),
        auth_public_paths=_public_paths(top.strings("auth_public_paths") if "auth_public_paths" in raw else None),
        max_header_bytes=top.positive("max_header_bytes", int, 16 * 1024),
        allowed_hosts=allowed_hosts(top.strings("allowed_hosts"), "allowed_hosts"),
        metrics_admin_only=top.get("metrics_admin_only", bool, False),
        refuse_private_media_urls=top.get("refuse_private_media_urls", bool, False),
        cors_origins=cors_origins(top.strings("cors_origins"), "cors_origins") if "cors_origins" in raw else DEFAULT_CORS_ORIGINS,
        cache_ttl_seconds=float(top.positive("cache_ttl_seconds", (int, float), 3600.0)),
        events_retention_seconds=float(top.positive("events_retention_seconds", (int, float), 86400.0)),
        events_max_bytes=top.positive("events_max_bytes", int, 4 * 1024**3),
        idempotency_retention_seconds=float(top.positive("idempotency_retention_seconds", (int, float), 86400.0)),
        log_retention_seconds=float(top.positive("log_retention_seconds", (int, float), 30 * 86400.0)),
        workflow=_parse_workflow(top.get("workflow", dict, {})),
    )


def _parse_fallbacks(raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """`[fallbacks]`: a model's stand-ins, tried in order when its backend cannot answer."""
    fallbacks: dict[str, tuple[str, ...]] = {}
    reader = _Reader(raw, "fallbacks", set(raw))
    for model in raw:
        models = reader.strings(model)
        if not models:
            raise ConfigError(f"`fallbacks.{model}` must list at least one model")
        if model in models:
            raise ConfigError(f"`fallbacks.{model}` lists the model itself")
        if len(set(models)) != len(models):
            raise ConfigError(f"`fallbacks.{model}` lists a model twice")
        fallbacks[model] = models
    return fallbacks


def _parse_timeouts(raw: Any, where: str, base: Timeouts) -> Timeouts:
    if not isinstance(raw, dict):
        raise ConfigError(f"`{where}` must be a table")
    reader = _Reader(raw, where, _TIMEOUT_KEYS)
    values = {}
    for name in ("connect", "first_token", "idle", "total", "failover"):
        if name in raw:
            value = reader.positive(name, (int, float), None)
            values[name] = float(value) if value else None
    return replace(base, **values)


def _parse_backend(raw: Any, where: str, default_timeouts: Timeouts) -> BackendConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"`{where}` must be a table")
    reader = _Reader(raw, where, _BACKEND_KEYS)
    name = reader.get("name", str)
    if not name:
        raise ConfigError(f"`{where}.name` is required")
    kind = reader.get("kind", str, "openai")
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"`{where}.kind` must be one of {', '.join(BACKEND_KINDS)}, got {kind!r}")
    urls = _base_urls(reader.get("base_url", (str, list)), f"{where}.base_url")
    return BackendConfig(
        name=name,
        kind=kind,
        base_url=urls[0],
        replicas=urls[1:],
        api_key_env=reader.get("api_key_env", str),
        prefixes=reader.strings("prefixes"),
        models=reader.strings("models"),
        default=reader.get("default", bool, False),
        timeouts=_parse_timeouts(raw.get("timeouts", {}), f"{where}.timeouts", default_timeouts),
        max_connections=reader.positive("max_connections", int, 100),
        request_usage=reader.get("request_usage", bool, True),
        cache=reader.get("cache", bool, False),
        chat_template_fields=reader.get("chat_template_fields", bool, None),
        trace_context=reader.get("trace_context", bool, True),
    )


_FUNCTION_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _parse_workflow(raw: Mapping[str, Any]) -> WorkflowSettings:
    reader = _Reader(raw, "workflow", _WORKFLOW_KEYS)
    launch = reader.get("launch", str, "pull")
    if launch not in LAUNCH_MODES:
        raise ConfigError(f"`workflow.launch` must be one of {', '.join(LAUNCH_MODES)}, got {launch!r}")
    default = reader.get("default_pipeline", str)
    if default is not None and not PIPELINE_NAME.match(default):
        raise ConfigError(f"`workflow.default_pipeline` must be a pipeline name ([A-Za-z0-9_-]), got {default!r}")
    unit = reader.get("unit", str, "llm-proxy-job@{trace_id}.service")
    if "{trace_id}" not in unit:
        raise ConfigError(f"`workflow.unit` must contain {{trace_id}}, got {unit!r}")
    pipelines: dict[str, PipelineConfig] = {}
    for name, table in reader.get("pipelines", dict, {}).items():
        where = f"workflow.pipelines.{name}"
        if not PIPELINE_NAME.match(name):
            raise ConfigError(f"`{where}`: a pipeline name is 1-64 of A-Z a-z 0-9 _ -")
        if not isinstance(table, dict):
            raise ConfigError(f"`{where}` must be a table")
        function = table.get("function")
        if function is not None and (not isinstance(function, str) or not _FUNCTION_PATH.match(function)):
            raise ConfigError(f"`{where}.function` must be \"package.module:function\", got {function!r}")
        pipelines[name] = PipelineConfig(function, {k: v for k, v in table.items() if k != "function"})
    silence = float(reader.positive("silence_seconds", (int, float), 30.0))
    ack_wait = float(reader.positive("ack_wait_seconds", (int, float), 10.0))
    if ack_wait >= silence:
        # A dead worker's job would come back only after its client had its 504: the retry
        # that `max_deliver` promises would never reach anyone.
        raise ConfigError(
            f"`workflow.ack_wait_seconds` ({ack_wait:g}) must be less than `workflow.silence_seconds` "
            f"({silence:g}): a job whose worker died is redelivered after the ack wait, and its client "
            f"has given up after the silence deadline"
        )
    return WorkflowSettings(
        launch=launch,
        default_pipeline=default,
        silence_seconds=silence,
        ack_wait_seconds=ack_wait,
        max_deliver=reader.positive("max_deliver", int, 3),
        concurrency=reader.positive("concurrency", int, 16),
        job_retention_seconds=float(reader.positive("job_retention_seconds", (int, float), 86400.0)),
        job_timeout_seconds=float(reader.positive("job_timeout_seconds", (int, float), 1800.0)),
        unit=unit,
        systemctl=reader.get("systemctl", str, "systemctl") or "systemctl",
        pipelines=pipelines,
    )


def _parse_embeddings(raw: Mapping[str, Any]) -> EmbeddingSettings:
    reader = _Reader(raw, "embeddings", _EMBEDDINGS_KEYS)
    return EmbeddingSettings(
        local_model=reader.get("local_model", bool, True),
        preload=reader.get("preload", bool, False),
        threads=reader.count("threads", 1, MAX_THREADS, f"ONNX threads per run: {_PER_CORE}"),
        max_inputs=reader.positive("max_inputs", int, 2048),
    )


def _parse_rag(raw: Mapping[str, Any]) -> RagSettings:
    reader = _Reader(raw, "rag", _RAG_KEYS)
    top_k = reader.positive("top_k", int, 4)
    threshold = float(reader.get("score_threshold", (int, float), 0.3))
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"`rag.score_threshold` must be between -1 and 1, got {threshold!r}")
    chunk_tokens = reader.positive("chunk_tokens", int, 200)
    if not 32 <= chunk_tokens <= 250:
        raise ConfigError(f"`rag.chunk_tokens` must be between 32 and 250 (the model reads 256), got {chunk_tokens}")
    overlap = reader.get("chunk_overlap", int, 40)
    if not 0 <= overlap <= chunk_tokens // 2:
        raise ConfigError(f"`rag.chunk_overlap` must be between 0 and half of `rag.chunk_tokens`, got {overlap}")
    template = reader.get("template", str, DEFAULT_RAG_TEMPLATE)
    try:
        template.format(workspace="", passages="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"`rag.template` may only use {{workspace}} and {{passages}} ({exc!r})") from None
    if "{passages}" not in template:
        raise ConfigError("`rag.template` must contain {passages}")
    return RagSettings(
        top_k=top_k,
        score_threshold=threshold,
        candidates=reader.positive("candidates", int, 40),
        rerank=max(top_k, reader.positive("rerank", int, 20)),
        chunk_tokens=chunk_tokens,
        chunk_overlap=overlap,
        template=template,
        pdf_max_pages=reader.positive("pdf_max_pages", int, 1000),
        pdf_max_bytes=reader.positive("pdf_max_bytes", int, 64 * 1024 * 1024),
        pdf_timeout_seconds=float(reader.positive("pdf_timeout_seconds", (int, float), 120.0)),
    )


def _parse_semantic_cache(raw: Mapping[str, Any]) -> SemanticCacheSettings:
    reader = _Reader(raw, "semantic_cache", _SEMANTIC_CACHE_KEYS)
    threshold = float(reader.get("threshold", (int, float), 0.95))
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"`semantic_cache.threshold` must be in (0, 1], got {threshold!r}")
    return SemanticCacheSettings(
        enabled=reader.get("enabled", bool, False),
        models=reader.strings("models"),
        threshold=threshold,
        ttl_seconds=float(reader.positive("ttl_seconds", (int, float), 3600.0)),
    )


def _parse_batches(raw: Mapping[str, Any]) -> BatchSettings:
    reader = _Reader(raw, "batches", _BATCHES_KEYS)
    return BatchSettings(
        concurrency=reader.positive("concurrency", int, 4),
        file_max_bytes=reader.positive("file_max_bytes", int, 100 * 1024 * 1024),
        max_lines=reader.positive("max_lines", int, 50_000),
        poll_seconds=float(reader.positive("poll_seconds", (int, float), 5.0)),
    )


def _parse_tracing(raw: Mapping[str, Any]) -> TracingSettings:
    reader = _Reader(raw, "tracing", _TRACING_KEYS)
    endpoint = reader.get("otlp_endpoint", str, None)
    if endpoint is not None and not re.match(r"https?://[^/]", endpoint):
        raise ConfigError(f"`tracing.otlp_endpoint` must be an http:// or https:// URL, got {endpoint!r}")
    return TracingSettings(propagate=reader.get("propagate", bool, True), otlp_endpoint=endpoint or None)


def _base_urls(value: str | list[Any] | None, key: str) -> tuple[str, ...]:
    """A backend's `base_url`: one URL, or a list of the replicas' URLs (a comma-separated
    list in the environment)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")] if "," in value else [value]
    if not value:
        raise ConfigError(f"`{key}` is required")
    urls: list[str] = []
    for url in value:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"`{key}` must be a URL or a list of URLs, got {value!r}")
        _check_url(url, key)
        url = url.rstrip("/")
        twin = next((other for other in urls if _same_server(other, url)), None)
        if twin is not None:
            raise ConfigError(f"`{key}` lists one server twice: {twin!r} and {url!r}")
        urls.append(url)
    return tuple(urls)


def _same_server(first: str, second: str) -> bool:
    """Two base URLs of one server: hosts compare without case, a default port as written
    or left out."""

    def key(url: str) -> tuple[str, str, int, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    return key(first) == key(second)


def _check_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"`{key}` must be an http(s) URL, got {url!r}")
    try:
        port = parts.port  # parsed lazily: "abc" or 99999 raise only here
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"`{key}` has an invalid port (1-65535), got {url!r}")


# A password in a connection string must not reach the terminal or the journal.
_PASSWORDS = re.compile(r"(?P<url>://[^/@:\s]*:)[^/@\s]*@|(?P<kv>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the passwords of the connection strings it quotes replaced by `***`."""
    return _PASSWORDS.sub(lambda m: f"{m['url']}***@" if m["url"] else f"{m['kv']}***", text)


def database_url(value: str | None, key: str) -> str | None:
    """A PostgreSQL connection URL or libpq key=value string, checked as libpq parses it: a typo
    (an SQLAlchemy `postgresql+psycopg://` URL, an unknown parameter) would otherwise have the
    gateway retry a connection that can never be made, for as long as it runs."""
    if not value:
        return None
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    scheme = value.partition("://")[0] if "://" in value else None
    if scheme is not None and scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"`{key}` must be a postgresql:// URL (or libpq's key=value form), got scheme {scheme!r}")
    try:
        conninfo_to_dict(value)
    except ProgrammingError as exc:
        reason = str(exc).strip().replace(value, redact(value))
        raise ConfigError(f"`{key}` is not a PostgreSQL connection string: {redact(reason)}") from None
    return value


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def nats_url(value: str | None, key: str) -> str | None:
    """One NATS server URL, or a comma-separated list of a cluster's (nats://, tls://, ws:// or
    wss://; `host:port` means nats://), checked as the client will read it."""
    if not value:
        return None
    servers = [part.strip() for part in value.split(",")]
    kinds = set()
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if parts.scheme.lower() not in _NATS_SCHEMES or not parts.hostname or port == 0:
            raise ConfigError(
                f"`{key}` must be a NATS server URL (nats://host:4222; tls://, ws://, wss://), or several "
                f"separated by commas, got {redact(server)!r}"
            )
        kinds.add(parts.scheme.lower() in ("ws", "wss"))
    if len(kinds) > 1:
        raise ConfigError(f"`{key}` mixes websocket (ws://, wss://) and nats:// servers, which the client refuses")
    return ",".join(servers)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: str, key: str) -> str:
    level = value.strip().lower()
    level = "warning" if level == "warn" else level  # as Go's, Rust's and uvicorn's users spell it
    if level not in LOG_LEVELS:
        raise ConfigError(f"`{key}` must be debug, info, warning or error, got {value!r}")
    return level


def check_data_dir(path: Path, key: str) -> Path:
    """The embedded servers create their directories under `path`: refuse, naming `key`, a path
    that is (or lies under) something other than a directory."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                what = "is" if existing == path else f"lies under {existing}, which is"
                raise ConfigError(f"`{key}` must be a directory, but {path} {what} not a directory")
            break
    return path


AUTH_MODES = ("auto", "required", "off")
DEFAULT_PUBLIC_PATHS = ("/ready", "/openapi.json")


def _auth_mode(value: str, key: str) -> str:
    mode = value.strip().lower()
    if mode not in AUTH_MODES:
        raise ConfigError(f"`{key}` must be auto, required or off, got {value!r}")
    return mode


def _public_paths(paths: tuple[str, ...] | None) -> tuple[str, ...]:
    if paths is None:
        return DEFAULT_PUBLIC_PATHS
    for path in paths:
        if not path.startswith("/"):
            raise ConfigError(f"`auth_public_paths` entries must be paths starting with /, got {path!r}")
    return paths


# scheme://host[:port], no path: the shape of a browser's `Origin` header. In a pattern the
# host may be `*` (any host and port of the scheme) or start with `*.` (any subdomain), and
# the port may be `*` (any port, or none).
_ORIGIN = re.compile(r"^([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\s/:?#@\[\]]+)(?::(\d{1,5}|\*))?$")

OriginParts = tuple[str, str, str | None]


def parse_origin_pattern(text: str) -> OriginParts | None:
    """`(scheme, host, port)` of an origin or origin pattern (lower case; port None when
    absent), or None if `text` is neither. `*` alone is not parsed here: it is any origin."""
    found = _ORIGIN.match(text.lower())
    if found is None:
        return None
    scheme, host, port = found.groups()
    wildcard_host = host.removeprefix("*.")
    if "*" in wildcard_host and host != "*":
        return None
    if host == "*" and port is not None:
        return None
    if port is not None and port != "*" and not 0 < int(port) <= 65535:
        return None
    return scheme, host, port


def cors_origins(entries: tuple[str, ...], key: str) -> tuple[str, ...]:
    """Validated `cors_origins` entries, in lower case (origins compare without case)."""
    checked: list[str] = []
    for entry in entries:
        if entry != "*" and parse_origin_pattern(entry) is None:
            raise ConfigError(
                f"`{key}` entries must be `*` or an origin (scheme://host[:port], no path or trailing slash), "
                f"where the port may be `*` (any port) and the host `*` (any host of the scheme) or start with `*.` "
                f"(any subdomain), got {entry!r}"
            )
        checked.append(entry.lower())
    return tuple(checked)


# A host name (`llm.example.com`), optionally `*.` for its subdomains; no scheme, port or path.
_HOST_NAME = re.compile(r"^(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")


def allowed_hosts(entries: tuple[str, ...], key: str) -> tuple[str, ...]:
    """Validated `allowed_hosts` entries, in lower case (host names compare without case)."""
    for entry in entries:
        if entry != "*" and not _HOST_NAME.match(entry.lower()):
            raise ConfigError(
                f"`{key}` entries must be `*` or a host name (`llm.example.com`, `*.example.com` for its "
                f"subdomains), without scheme, port or path, got {entry!r}"
            )
    return tuple(entry.lower() for entry in entries)


def _check_backends(backends: tuple[BackendConfig, ...]) -> None:
    seen: set[str] = set()
    defaults = [b.name for b in backends if b.default]
    # A prefix or model claimed twice would silently go to whichever backend came first.
    claimed: dict[tuple[str, str], str] = {}
    for index, backend in enumerate(backends):
        if backend.name in seen:
            raise ConfigError(f"backend name {backend.name!r} is used twice in `backends`")
        seen.add(backend.name)
        claims = [("prefixes", p) for p in backend.prefixes]
        claims += [("models", m.removesuffix(":latest")) for m in backend.models]
        for key, value in claims:
            owner = claimed.setdefault((key, value), backend.name)
            if owner != backend.name:
                raise ConfigError(
                    f"`backends[{index}].{key}`: {value!r} is already claimed by backend {owner!r}"
                )
    if len(defaults) > 1:
        raise ConfigError(f"only one backend may set `default = true` (found {', '.join(defaults)})")


# -- environment -------------------------------------------------------------------------------


def _apply_environment(settings: Settings, env: Mapping[str, str]) -> Settings:
    changes: dict[str, Any] = {}
    if bind := env.get("LLM_PROXY_BIND"):
        changes["host"], changes["port"] = parse_bind(bind, "LLM_PROXY_BIND")
    if workers := env.get("LLM_PROXY_WORKERS"):
        if not workers.isdigit():
            raise ConfigError(f"`LLM_PROXY_WORKERS` must be a positive integer, got {workers!r}")
        check_workers(int(workers), "LLM_PROXY_WORKERS")
        changes["workers"] = int(workers)
    if level := env.get("LLM_PROXY_LOG_LEVEL"):
        changes["log_level"] = _log_level(level, "LLM_PROXY_LOG_LEVEL")
    if data_dir := env.get("LLM_PROXY_DATA_DIR"):
        changes["data_dir"] = check_data_dir(Path(data_dir).expanduser(), "LLM_PROXY_DATA_DIR")
    if url := env.get("DATABASE_URL"):
        changes["database_url"] = database_url(url, "DATABASE_URL")
    if url := env.get("NATS_URL"):
        changes["nats_url"] = nats_url(url, "NATS_URL")
    if (embedded := env.get("LLM_PROXY_EMBEDDED")) is not None:
        if embedded.lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"`LLM_PROXY_EMBEDDED` must be 0 or 1, got {embedded!r}")
        changes["embedded"] = embedded.lower() in ("1", "true", "yes")
    if (auth := env.get("LLM_PROXY_AUTH")) is not None:
        changes["auth"] = _auth_mode(auth, "LLM_PROXY_AUTH")
    if origins := env.get("LLM_PROXY_CORS_ORIGINS", "").strip():
        entries = tuple(entry.strip() for entry in origins.split(","))
        if not all(entries):
            raise ConfigError(f"`LLM_PROXY_CORS_ORIGINS` has an empty entry, got {origins!r}")
        changes["cors_origins"] = cors_origins(entries, "LLM_PROXY_CORS_ORIGINS")
    if hosts := env.get("LLM_PROXY_ALLOWED_HOSTS", "").strip():
        entries = tuple(entry.strip() for entry in hosts.split(","))
        if not all(entries):
            raise ConfigError(f"`LLM_PROXY_ALLOWED_HOSTS` has an empty entry, got {hosts!r}")
        changes["allowed_hosts"] = allowed_hosts(entries, "LLM_PROXY_ALLOWED_HOSTS")
    for name in ("metrics_admin_only", "refuse_private_media_urls"):
        variable = f"LLM_PROXY_{name.upper()}"
        if (flag := env.get(variable)) is not None:
            if flag.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ConfigError(f"`{variable}` must be 0 or 1, got {flag!r}")
            changes[name] = flag.lower() in ("1", "true", "yes")
    if base_url := env.get("LLM_BASE_URL"):
        changes["backends"] = _with_env_backend(settings.backends, _base_urls(base_url, "LLM_BASE_URL"), env)
    return replace(settings, **changes) if changes else settings


def _with_env_backend(
    backends: tuple[BackendConfig, ...], urls: tuple[str, ...], env: Mapping[str, str]
) -> tuple[BackendConfig, ...]:
    """`LLM_BASE_URL` alone gives one default OpenAI-compatible backend (the seed's compose
    set-up); with configured backends it re-points the default one, or, when none is the
    default, adds that backend as the default (named "default", so no configured backend may
    bear that name). `LLM_API_KEY`, when set, is the key for that URL either way."""
    key_env = "LLM_API_KEY" if "LLM_API_KEY" in env else None
    for i, backend in enumerate(backends):
        if backend.default:
            repointed = replace(
                backend, base_url=urls[0], replicas=urls[1:], api_key_env=key_env or backend.api_key_env
            )
            return (*backends[:i], repointed, *backends[i + 1 :])
    if any(backend.name == "default" for backend in backends):
        # Two backends of one name: the gateway would keep one and send the other's models to it.
        raise ConfigError(
            "`LLM_BASE_URL` adds a backend named 'default', but `backends` already has one of that name "
            "and none sets `default = true`: rename it, or mark the backend `LLM_BASE_URL` should re-point "
            "`default = true`"
        )
    default = BackendConfig(
        name="default", kind="openai", base_url=urls[0], replicas=urls[1:], api_key_env=key_env, default=True
    )
    return (*backends, default)
