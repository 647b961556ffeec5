"""Ollama's model endpoints: `/api/tags`, `/api/show`, `/api/version`, and reading a backend's tags.

Models served by Ollama backends keep the backend's own facts (size, digest, details). Others
get placeholders: size 0, a digest derived from the backend and name (stable, so clients that
key on it keep working), and a family guessed from the name's leading letters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects.ollama._response import parse_timestamp, timestamp

# What `/api/version` says. Clients gate on it (VS Code Copilot refuses a server below 0.6.4,
# Open WebUI warns below 0.1.16, tool-calling clients ask for 0.3.0), so it must not be older
# than what the gateway serves; nor newer, or a client would use an API it lacks. Choose the
# Ollama release that brought the newest `/api/*` feature the gateway's Ollama surface serves:
# 0.12.11, `logprobs`/`top_logprobs` on `/api/chat` and `/api/generate`. Raise it as features
# of later releases are served, never past a release whose native API changes are missing.
OLLAMA_VERSION = "0.12.11"
ROOT_TEXT = b"Ollama is running"

_TAG_FIELDS = ("modified_at", "size", "digest", "details")


def version_body() -> bytes:
    return dumps({"version": OLLAMA_VERSION})


def name_variants(name: str) -> tuple[str, ...]:
    """Ollama's naming: `llama3.2` and `llama3.2:latest` are the same model."""
    base = name.rsplit("/", 1)[-1]
    if ":" not in base:
        return (name, name + ":latest")
    if name.endswith(":latest"):
        return (name, name.removesuffix(":latest"))
    return (name,)


def parse_tag(item: Any) -> tuple[str, int, dict[str, Any]] | None:
    """One entry of a backend's `/api/tags`: its name, modification time, and the facts the
    gateway's own `/api/tags` passes through (kept as `ModelInfo.details`)."""
    if not isinstance(item, dict):
        return None
    name = item.get("model") or item.get("name")
    if not isinstance(name, str) or not name:
        return None
    facts = {key: item[key] for key in _TAG_FIELDS if key in item}
    return name, parse_timestamp(item.get("modified_at")), facts


# A size in a model's name, as Hugging Face repositories and Ollama tags spell it: `8B`,
# `1.5b`, `8x7B` (experts), `135M`; a separate word, so `A3B` (Qwen3-30B-A3B's active
# parameters), `v2b` or a version number are not taken for one.
_SIZE = re.compile(r"(?<![A-Za-z0-9.])((?:\d+x)?\d+(?:\.\d+)?)([bBmM])(?![A-Za-z0-9])")
# Quantizations a name states (`-AWQ`, `-FP8`, `.Q4_K_M`), as a word of their own.
_QUANTIZATION = re.compile(
    r"(?<![A-Za-z0-9])(AWQ|GPTQ|FP8|FP4|NVFP4|MXFP4|INT8|INT4|W8A8|W4A16|BNB|(?:I?Q[2-8](?:_[0-9A-Z]+)*)|F16|BF16)(?![A-Za-z0-9])",
    re.IGNORECASE,
)


def placeholder_details(name: str) -> dict[str, Any]:
    """Details for a model whose backend gives none, from its name: the family from its
    leading letters (`Qwen2.5-7B` → `qwen`), and the parameter count and quantization only
    where the name states them (`Llama-3.1-8B-Instruct-AWQ` → `8B`, `AWQ`)."""
    base = name.rsplit("/", 1)[-1]
    match = re.match(r"[A-Za-z]+", base)
    family = match.group(0).lower() if match else ""
    size = _SIZE.search(base.replace(":", "-"))
    quantization = _QUANTIZATION.search(base)
    return {
        "parent_model": "",
        "format": "",
        "family": family,
        "families": [family] if family else [],
        "parameter_size": size.group(1) + size.group(2).upper() if size else "",
        "quantization_level": quantization.group(1).upper() if quantization else "",
    }


def tag_entry(name: str, *, backend: str, created: int, facts: Mapping[str, Any]) -> dict[str, Any]:
    """One `/api/tags` entry; `facts` are an Ollama backend's (see `parse_tag`), or empty."""
    details = facts.get("details")
    modified = facts.get("modified_at")
    size = facts.get("size")
    digest = facts.get("digest")
    return {
        "name": name,
        "model": name,
        "modified_at": modified if isinstance(modified, str) and modified else timestamp(created or None),
        "size": size if isinstance(size, int) else 0,
        "digest": digest if isinstance(digest, str) and digest else hashlib.sha256(f"{backend}/{name}".encode()).hexdigest(),
        "details": dict(details) if isinstance(details, dict) else placeholder_details(name),
    }


def render_tags(entries: list[dict[str, Any]]) -> bytes:
    return dumps({"models": entries})


def pull_reply(*, stream: bool) -> bytes:
    """`/api/pull` of a model the gateway already serves: nothing to fetch, so the progress
    Ollama streams for a model it has is its first and last line."""
    if not stream:
        return dumps({"status": "success"})
    return dumps({"status": "pulling manifest"}) + b"\n" + dumps({"status": "success"}) + b"\n"


def show_body(
    entry: Mapping[str, Any],
    *,
    capabilities: tuple[str, ...] = ("completion", "tools"),
    model_info: Mapping[str, Any] | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """`/api/show` for a model whose backend cannot say more than its tags entry.

    `capabilities` is what clients check before they call the model (`completion` for chat
    and generate, `embedding` for an embedding model); `model_info` adds facts under
    `model_info` (`<family>.embedding_length`, …); `context_length` is the model's window,
    as `<family>.context_length` (where clients read it: Copilot's Ollama provider budgets
    its prompts from it, and takes a model without one for 4096 tokens, all of them output)."""
    details = entry.get("details") or placeholder_details(str(entry.get("name", "")))
    family = details.get("family") or ""
    info: dict[str, Any] = {"general.architecture": family} if family else {}
    if family and context_length:
        info[f"{family}.context_length"] = context_length
    info.update(model_info or {})
    return {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details,
        "model_info": info,
        "capabilities": list(capabilities),
        "modified_at": entry.get("modified_at") or timestamp(),
    }
