"""Request fields with which a backend may answer with a model other than the request's
`model`: the gateway relays a body's unmodelled fields to a backend of the client's dialect,
and an OpenRouter or LiteLLM endpoint honours these. A key limited to some models may send
them only when every model they name is in its scope.

- OpenRouter: `models` (models to try in turn), `route` (`"fallback"`: without `models`,
  OpenRouter picks a stand-in itself); its Anthropic Messages endpoint takes `fallbacks`.
- LiteLLM: `fallbacks` (names, `{"model": ...}` objects, or `{"model": ["stand-in"]}`
  maps), `context_window_fallbacks` and `content_policy_fallbacks` (maps), the legacy
  `metadata.fallbacks`, `context_window_fallback_dict` (`{"model": "larger"}`), and
  `user_config` / `model_list`: a whole router configuration, whose deployments can name any
  model the backend's credentials reach.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Any of these among a body's keys sends it to `named_models`; a body without them costs one
# set operation.
MODEL_FIELDS = frozenset({
    "models", "route", "fallbacks", "context_window_fallbacks", "content_policy_fallbacks",
    "context_window_fallback_dict", "user_config", "model_list", "metadata",
})
# Fields that define models rather than name them: which model they reach cannot be told.
_CONFIGURATIONS = ("user_config", "model_list")
_FALLBACK_LISTS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


def named_models(body: Mapping[str, Any]) -> Iterator[tuple[str, str | None]]:
    """(field, model) for each model `body`'s fields name besides its `model`. The model is
    None where the field lets the backend choose one the request does not name (a router
    configuration, `route` without `models`, or a value of a shape no backend documents)."""
    for name in _CONFIGURATIONS:
        if body.get(name) is not None:
            yield name, None
    models = body.get("models")
    if models is not None:
        yield from _entries("models", models)
    if body.get("route") is not None and models is None:
        yield "route", None
    for name in _FALLBACK_LISTS:
        value = body.get(name)
        if value is not None:
            yield from _entries(name, value)
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("fallbacks") is not None:
        yield from _entries("metadata.fallbacks", metadata["fallbacks"])
    mapping = body.get("context_window_fallback_dict")
    if isinstance(mapping, Mapping):
        yield from _mapping("context_window_fallback_dict", mapping)
    elif mapping is not None:
        yield "context_window_fallback_dict", None


def _entries(name: str, value: Any) -> Iterator[tuple[str, str | None]]:
    """A list of models: names, `{"model": name, ...}` objects (their other fields are the
    attempt's settings), or `{"model": [stand-ins]}` maps."""
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, str):
            yield name, entry
        elif isinstance(entry, Mapping) and "model" in entry:
            model = entry["model"]
            yield name, model if isinstance(model, str) else None
        elif isinstance(entry, Mapping):
            yield from _mapping(name, entry)
        else:
            yield name, None


def _mapping(name: str, value: Mapping[Any, Any]) -> Iterator[tuple[str, str | None]]:
    """`{"model": "stand-in"}` or `{"model": ["stand-in", ...]}`: every name on either side."""
    for key, stand_ins in value.items():
        yield name, key if isinstance(key, str) else None
        for stand_in in stand_ins if isinstance(stand_ins, list) else [stand_ins]:
            yield name, stand_in if isinstance(stand_in, str) else None
