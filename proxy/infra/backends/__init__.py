"""Backend adapters: one per wire protocol, all behind the `Backend` protocol."""

from proxy.config import BackendConfig
from proxy.infra.backends._anthropic import AnthropicBackend
from proxy.infra.backends._base import (
    Backend,
    BackendCall,
    Batch,
    BatchSink,
    ModelInfo,
    ReplicaState,
    Served,
    current_served,
    current_trace,
)
from proxy.infra.backends._ollama import OllamaBackend
from proxy.infra.backends._openai import OpenAIBackend


def create_backend(config: BackendConfig, *, refuse_private_media_urls: bool = False) -> Backend:
    if config.kind == "openai":
        return OpenAIBackend(config, refuse_private_media_urls=refuse_private_media_urls)
    if config.kind == "ollama":
        return OllamaBackend(config)
    if config.kind == "anthropic":
        return AnthropicBackend(config, refuse_private_media_urls=refuse_private_media_urls)
    raise NotImplementedError(f"backend kind {config.kind!r} is not supported yet")


__all__ = [
    "AnthropicBackend", "Backend", "BackendCall", "Batch", "BatchSink", "ModelInfo", "OpenAIBackend", "ReplicaState", "Served",
    "create_backend", "current_served", "current_trace",
]
