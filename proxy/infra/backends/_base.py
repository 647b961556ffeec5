"""What every backend adapter provides, and the pieces they share: the face the adapters
import from, gathered from the private modules that hold each piece (`_types`, `_replicas`,
`_pump`, `_errors`)."""

from proxy.infra.backends._errors import (
    body_text,
    is_html,
    json_mended,
    listing_refused,
    not_json,
    page_not_stream,
    read_limited,
    read_whole,
    status_error,
    timeout_error,
    transport_errors,
)
from proxy.infra.backends._pump import DRAIN_SECONDS, KEEPALIVE_SECONDS, pump_stream
from proxy.infra.backends._replicas import (
    SET_ASIDE_MAX_SECONDS,
    SET_ASIDE_SECONDS,
    BackendClient,
    ReplicaState,
    Served,
    create_client,
    current_served,
    current_trace,
    path_segment,
)
from proxy.infra.backends._types import (
    TOKEN_ARRAYS_HINT,
    Backend,
    BackendCall,
    Batch,
    BatchSink,
    EmbeddingBackend,
    EmbeddingCall,
    EmbeddingOutput,
    ModelInfo,
    ParsedOutput,
    RelayBackend,
    StreamParser,
    embedding_vectors,
    loads_yielding,
    off_loop_if_large,
)

__all__ = [
    "DRAIN_SECONDS", "KEEPALIVE_SECONDS", "SET_ASIDE_MAX_SECONDS", "SET_ASIDE_SECONDS", "TOKEN_ARRAYS_HINT", "Backend",
    "BackendCall", "BackendClient", "Batch", "BatchSink", "EmbeddingBackend", "EmbeddingCall", "EmbeddingOutput",
    "ModelInfo", "ParsedOutput", "RelayBackend", "ReplicaState", "Served", "StreamParser", "body_text", "create_client",
    "current_served", "current_trace", "embedding_vectors", "is_html", "json_mended", "listing_refused", "loads_yielding",
    "not_json", "off_loop_if_large",
    "page_not_stream", "path_segment", "pump_stream", "read_limited", "read_whole", "status_error", "timeout_error", "transport_errors",
]
