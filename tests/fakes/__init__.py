"""Fake LLM backends (OpenAI-compatible, Ollama, Anthropic) on real loopback HTTP servers.

Build a backend with a ``Script`` (per model or as the default), then inside a trio task
``async with backend.serve() as server:`` and point a client at ``server.url``. Afterwards
inspect ``backend.requests`` / ``backend.disconnects`` / the counters, or await
``backend.wait_disconnect(1.0)`` and friends.
"""

from .anthropic_backend import AnthropicBackend
from .base import FakeBackend
from .ollama_backend import OllamaBackend
from .openai_backend import OpenAIBackend
from .recorder import Disconnect, Generation, RecordedRequest, Recorder
from .script import Script, ToolCall, Usage
from .server import AbortConnection, Exchange, FakeServer, Request, run_forever, serve_fake

__all__ = [
    "AbortConnection",
    "AnthropicBackend",
    "Disconnect",
    "Exchange",
    "FakeBackend",
    "FakeServer",
    "Generation",
    "OllamaBackend",
    "OpenAIBackend",
    "RecordedRequest",
    "Recorder",
    "Request",
    "Script",
    "ToolCall",
    "Usage",
    "run_forever",
    "serve_fake",
]
