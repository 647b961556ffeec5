"""The model catalogue: every backend's models, plus aliases, briefly cached."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from proxy.domain.errors import GatewayError
from proxy.domain.routing import Router
from proxy.infra.backends import Backend, ModelInfo

log = logging.getLogger("llm_proxy.models")


class ModelCatalog:
    """Lists models from all backends concurrently; a backend that is down is left out (and
    logged) rather than failing the whole list. Configured model names and aliases are always
    listed, so a client can discover them even while their backend is away."""

    def __init__(self, backends: Mapping[str, Backend], router: Router, ttl: float) -> None:
        self._backends = backends
        self._router = router
        self._ttl = ttl
        self._cached: list[ModelInfo] | None = None
        self._expires = 0.0
        self._lock = trio.Lock()

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
            with trio.move_on_after(5):
                try:
                    found[name] = await backend.list_models()
                except GatewayError as error:
                    log.warning("listing models of backend %s failed: %s", name, error.message)

        async with trio.open_nursery() as nursery:
            for name, backend in self._backends.items():
                nursery.start_soon(one, name, backend)

        models: dict[str, ModelInfo] = {}
        listed: dict[str, str] = {}
        for name, backend in self._backends.items():
            for info in found.get(name, []):
                models.setdefault(info.id, info)
                listed.setdefault(info.id, name)
            for model in backend.config.models:
                models.setdefault(model, ModelInfo(id=model, backend=name, owned_by=name))
        # What a backend lists, it serves: the router sends those names there (after the
        # configured names and prefixes), so every model listed here can be used.
        self._router.learn(listed)
        for alias, target in self._router.aliases.items():
            origin = models.get(target)
            backend_name = origin.backend if origin else self._route_of(alias)
            models.setdefault(
                alias, ModelInfo(id=alias, backend=backend_name, owned_by=backend_name, details={"alias_of": target})
            )
        return list(models.values())

    def _route_of(self, model: str) -> str:
        return self._router.backend_of(model) or ""
