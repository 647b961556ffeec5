"""Which backend serves a model: aliases, exact names, longest prefix, then the default."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.domain.errors import ErrorKind, GatewayError


@dataclass(slots=True, frozen=True)
class BackendRoute:
    """The routing facts of one backend (its transport lives in infra)."""

    name: str
    prefixes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    default: bool = False


@dataclass(slots=True, frozen=True)
class Route:
    backend: str
    upstream_model: str


class Router:
    """Resolves a client's model name to a backend and the name that backend knows it by.

    An alias is applied first (once; aliases do not chain). Then an exact model name listed
    by a backend wins, then the longest matching prefix across all backends, then the
    default backend. With no match and no default the model is unknown (404).
    """

    def __init__(self, routes: Iterable[BackendRoute], aliases: Mapping[str, str] | None = None):
        self._routes = tuple(routes)
        self._aliases = dict(aliases or {})
        self._exact: dict[str, str] = {}
        prefixes: list[tuple[str, str]] = []
        default: str | None = None
        for route in self._routes:
            for model in route.models:
                self._exact.setdefault(model, route.name)
            prefixes.extend((prefix, route.name) for prefix in route.prefixes)
            if route.default and default is None:
                default = route.name
        # Longest first, so the first hit is the longest; ties keep configuration order.
        self._prefixes = sorted(prefixes, key=lambda item: -len(item[0]))
        self._default = default
        self._cache: dict[str, Route] = {}

    @property
    def aliases(self) -> Mapping[str, str]:
        return self._aliases

    @property
    def default_backend(self) -> str | None:
        return self._default

    def resolve(self, model: str) -> Route:
        route = self._cache.get(model)
        if route is not None:
            return route
        upstream = self._aliases.get(model, model)
        backend = self._exact.get(upstream)
        if backend is None:
            backend = next((name for prefix, name in self._prefixes if upstream.startswith(prefix)), None)
        if backend is None:
            backend = self._default
        if backend is None:
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"The model `{model}` does not exist or no backend serves it.",
                param="model",
                code="model_not_found",
            )
        route = Route(backend=backend, upstream_model=upstream)
        if len(self._cache) < 4096:
            self._cache[model] = route
        return route
