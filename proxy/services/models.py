"""The model catalogue: every backend's models, plus aliases, briefly cached."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import trio

from proxy.dialects.ollama import name_variants
from proxy.domain.errors import GatewayError
from proxy.domain.routing import Router
from proxy.domain.truncation import Window
from proxy.infra.backends import Backend, ModelInfo

log = logging.getLogger("llm_proxy.models")


# How long one backend's listing may take; one that has not answered by then counts as failed.
_LIST_SECONDS = 5.0


class ModelCatalog:
    """Lists models from all backends concurrently. A backend whose listing fails (down, an
    error, no answer within 5 s) keeps what it listed last: the router goes on sending those
    names to it (a blip in `/api/tags` must not send its models to the default backend, or make
    them 404), and a client sees the backend's own error when it really is down. A backend
    that never listed is left out (and logged) rather than failing the whole list. Configured
    model names and aliases are always listed, so a client can discover them even while their
    backend is away."""

    def __init__(self, backends: Mapping[str, Backend], router: Router, ttl: float) -> None:
        self._backends = backends
        self._router = router
        self._ttl = ttl
        self._cached: list[ModelInfo] | None = None
        self._expires = 0.0
        self._lock = trio.Lock()
        self._last: dict[str, list[ModelInfo]] = {}  # each backend's last successful listing
        # The backends whose latest listing failed: the list shows what they listed before, if
        # anything; the listings name them to clients (`x-unavailable-backends`).
        self._unavailable: tuple[str, ...] = ()
        # Each listed model's context window, by (backend, the name it lists): where the
        # Responses API's `truncation: "auto"` learns it, with no call of its own.
        self._windows: dict[tuple[str, str], Window] = {}

    @property
    def unavailable(self) -> tuple[str, ...]:
        return self._unavailable

    @property
    def listed(self) -> bool:
        """Whether the backends were listed (once at least): the router knows their names."""
        return self._cached is not None

    @property
    def expired(self) -> bool:
        """Whether the backends were listed, longer ago than the list is kept."""
        return self._cached is not None and trio.current_time() >= self._expires

    def window(self, backend: str, model: str) -> Window | None:
        """`model`'s context window as `backend` last listed it (None: not said, or not listed yet)."""
        return self._windows.get((backend, model))

    async def models(self) -> list[ModelInfo]:
        if self._cached is not None and trio.current_time() < self._expires:
            return self._cached
        async with self._lock:
            if self._cached is None or trio.current_time() >= self._expires:
                self._cached = await self._fetch()
                self._expires = trio.current_time() + self._ttl
            return self._cached

    async def _fetch(self) -> list[ModelInfo]:
        found: dict[str, list[ModelInfo]] = {}

        async def one(name: str, backend: Backend) -> None:
            with trio.move_on_after(_LIST_SECONDS) as scope:
                try:
                    found[name] = await backend.list_models()
                except GatewayError as error:
                    log.warning("listing models of backend %s failed: %s", name, error.message)
            if scope.cancelled_caught:
                log.warning("listing models of backend %s failed: no answer within %g s", name, _LIST_SECONDS)

        async with trio.open_nursery() as nursery:
            for name, backend in self._backends.items():
                nursery.start_soon(one, name, backend)
        self._last.update(found)
        self._windows = {
            (name, info.id): window for name, infos in self._last.items() for info in infos
            if (window := _window(info.details)) is not None
        }
        self._unavailable = tuple(name for name in self._backends if name not in found)
        return self._assemble(fresh=found.keys())

    def _assemble(self, *, fresh: Iterable[str]) -> list[ModelInfo]:
        """The list from each backend's last listing (`fresh`: those that just listed), its
        configured names and the aliases; teaches the router what the backends list."""
        fresh = set(fresh)
        listed: dict[str, str] = {}
        # Fresh listings first: a model two backends serve goes to one that just listed it,
        # not to one known only from before its listing failed.
        for name in sorted(self._backends, key=lambda name: name not in fresh):
            for info in self._last.get(name, []):
                listed.setdefault(info.id, name)
        configured: dict[str, str] = {}  # as the router reads `models`: the first backend wins
        for name, backend in self._backends.items():
            for model in backend.config.models:
                configured.setdefault(model, name)

        def served_by(model: str) -> str:
            # The backend a chat for `model` goes to: the one configured for it, in either of
            # Ollama's spellings, else the one that lists it.
            return next((configured[v] for v in name_variants(model) if v in configured), listed[model])

        models: dict[str, ModelInfo] = {}
        for name in self._backends:  # in configuration order, whichever listings are fresh
            for info in self._last.get(name, []):
                if served_by(info.id) == name:
                    models.setdefault(info.id, info)
        for model, name in configured.items():
            # Listed by its backend (`llama3.2` as `llama3.2:latest`): one entry, not two.
            if not any(v in models and models[v].backend == name for v in name_variants(model)):
                models.setdefault(model, ModelInfo(id=model, backend=name, owned_by=name))
        # What a backend lists, it serves: the router sends those names there (after the
        # configured names and prefixes), so every model listed here can be used.
        self._router.learn(listed)
        for alias, target in self._router.aliases.items():
            origin = next((models[name] for name in name_variants(target) if name in models), None)
            if origin is not None:
                # What the backend says of the target (its window, dates, size) holds for the
                # alias: clients size prompts by it whichever name they pick.
                info = replace(origin, id=alias, details={**origin.details, "alias_of": target})
            else:
                backend_name = self._route_of(alias)
                info = ModelInfo(id=alias, backend=backend_name, owned_by=backend_name, details={"alias_of": target})
            # A backend's own model of the alias's name is not what a chat for it reaches:
            # the router applies aliases first, so the listing says the alias.
            models[alias] = info
        return list(models.values())

    def _route_of(self, model: str) -> str:
        return self._router.backend_of(model) or ""


def _window(details: Mapping[str, object]) -> Window | None:
    """The window a listing says: vLLM's `max_model_len` (prompt and answer), Anthropic's
    Models API `max_input_tokens` (the prompt)."""
    for key, counts_output in (("max_model_len", True), ("max_input_tokens", False)):
        value = details.get(key)
        if type(value) is int and value > 0:
            return Window(value, counts_output)
    return None
