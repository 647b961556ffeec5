"""Another dialect's JSON schema (an OpenAI `response_format`, an Ollama `format`) as Anthropic's
structured output takes one.

Anthropic refuses a schema an OpenAI-compatible server takes: every object must say
`additionalProperties: false`, and numeric, string-length and most array constraints are not
supported. OpenAI clients send such schemas as a model's JSON schema (pydantic, zod, LangChain
and Ollama's `format` leave `additionalProperties` out unless strict). So, as Anthropic's own
SDKs do for their users: objects are closed, `oneOf` is `anyOf`, and a constraint Anthropic
cannot enforce moves into the description, where the model still reads it. An Anthropic
client's own schema goes as sent.
"""

from __future__ import annotations

from typing import Any

# Keys Anthropic's structured output keeps as they are.
_KEPT = frozenset({"type", "description", "title", "enum", "const", "required", "$ref"})
# Keys whose values are schemas (by name) or lists of schemas, each adapted in turn.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf")
_FORMATS = frozenset({
    "date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid",
})


def structured_schema(schema: Any) -> Any:
    """`schema` as Anthropic takes it (a new object; the client's stays as sent)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _KEPT or _supported(key, value):
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: structured_schema(inner) for name, inner in value.items()}
        elif key in (*_SCHEMA_LISTS, "oneOf") and isinstance(value, list):
            out["anyOf" if key == "oneOf" else key] = [structured_schema(inner) for inner in value]
        elif key == "items" and isinstance(value, dict):
            out[key] = structured_schema(value)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                moved[key] = value  # a map's values: said, since the object is closed
        elif key != "$schema":
            moved[key] = value
    if schema.get("type") == "object" or "properties" in schema:
        out["additionalProperties"] = False
    if moved:
        said = ", ".join(f"{key}: {value}" for key, value in moved.items())
        out["description"] = f"{out['description']}\n\n{{{said}}}" if isinstance(out.get("description"), str) else f"{{{said}}}"
    return out


def _supported(key: str, value: Any) -> bool:
    """The constraints Anthropic takes of those it otherwise refuses."""
    if key == "format":
        return isinstance(value, str) and value in _FORMATS
    if key == "minItems":
        return type(value) is int and value in (0, 1)
    return key == "additionalProperties" and value is False
