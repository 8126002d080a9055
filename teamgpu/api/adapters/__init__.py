"""Protocol adapters: what differs between the client APIs on the one pipeline."""

from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec, estimate_tokens
from teamgpu.api.adapters.openai import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ChatCompletions,
    Completions,
    Embeddings,
)

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "ChatCompletions",
    "Completions",
    "Embeddings",
    "ProtocolAdapter",
    "RequestSpec",
    "estimate_tokens",
]
