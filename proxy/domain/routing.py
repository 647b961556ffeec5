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

    An alias is applied first (once; aliases do not chain). Then a model name configured
    for a backend (`models`) wins, then the longest matching prefix across all backends,
    then a name a backend itself lists (`learn`, from the model catalogue), then the
    default backend. With no match and no default the model is unknown (404).

    Names match as Ollama's do: `llama3.2` and `llama3.2:latest` are one model. The name
    sent upstream is the one the configuration or the backend's own listing spells.
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
        self._listed: dict[str, str] = {}
        self._cache: dict[str, Route] = {}

    @property
    def aliases(self) -> Mapping[str, str]:
        return self._aliases

    @property
    def default_backend(self) -> str | None:
        return self._default

    def learn(self, listed: Mapping[str, str]) -> None:
        """The models the backends list now (name -> backend), replacing what they listed before."""
        if listed != self._listed:
            self._listed = dict(listed)
            self._cache.clear()

    def resolve(self, model: str) -> Route:
        route = self._cache.get(model)
        if route is not None:
            return route
        route = self._match(model)
        if route is None:
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"The model `{model}` does not exist or no backend serves it.",
                param="model",
                code="model_not_found",
            )
        if len(self._cache) < 4096:
            self._cache[model] = route
        return route

    def knows(self, model: str) -> bool:
        """Whether `model` is a name the gateway knows (an alias, a configured model, one a
        backend lists), not one that only matched a prefix or fell to the default backend."""
        return any(_lookup(table, model) is not None for table in (self._aliases, self._exact, self._listed))

    def by_default(self, model: str) -> bool:
        """Whether `model` goes to the default backend only because nothing else names it
        (no alias, configured name, prefix or listing): a backend may have listed it since."""
        return (
            self._default is not None
            and not self.knows(model)
            and not any(model.startswith(prefix) for prefix, _ in self._prefixes)
        )

    def backend_of(self, model: str) -> str | None:
        """The backend `model` goes to, or None; whoever asks (no key scope, no error)."""
        route = self._match(model)
        return route.backend if route is not None else None

    def _match(self, model: str) -> Route | None:
        alias = _lookup(self._aliases, model)
        target = alias[1] if alias is not None else model
        exact = _lookup(self._exact, target)
        if exact is not None:
            return Route(backend=exact[1], upstream_model=exact[0])
        backend = next((name for prefix, name in self._prefixes if target.startswith(prefix)), None)
        listed = _lookup(self._listed, target)
        if backend is not None:
            # The backend's own spelling when it lists the model (`claude-sonnet-4-5` for an
            # Ollama client's `claude-sonnet-4-5:latest`): only Ollama knows both as one.
            spelled = listed[0] if listed is not None and listed[1] == backend else target
            return Route(backend=backend, upstream_model=spelled)
        if listed is not None:
            return Route(backend=listed[1], upstream_model=listed[0])
        if self._default is not None:
            return Route(backend=self._default, upstream_model=target)
        return None


def _lookup(table: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """`table`'s entry for `name` or its `:latest` twin, as (the table's spelling, value)."""
    value = table.get(name)
    if value is not None:
        return name, value
    if name.endswith(":latest"):
        twin = name[: -len(":latest")]
    elif ":" not in name.rpartition("/")[2]:  # untagged (a registry host may have a port)
        twin = name + ":latest"
    else:
        return None
    value = table.get(twin)
    return (twin, value) if value is not None else None
