"""OpenAI's chat completions, completions and embeddings APIs as protocol adapters.

Fields the gateway owns in the body sent to the backend: ``model`` (mapped to the served
name), ``priority`` (vLLM's priority, from the request's class; set by the pipeline)
and, for streams whose client did not ask for it, ``stream_options.include_usage``.
Everything else, unknown fields included, is passed through unchanged;
``/v1/completions`` goes to the backend's ``/v1/completions`` with its raw prompt
(fault F10).
"""

from __future__ import annotations

from typing import Any, ClassVar

from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec, estimate_tokens
from teamgpu.api.body import check_stream_fields, positive_int
from teamgpu.upstream.usage import (
    EventAccount,
    StreamAccount,
    Usage,
    text_from_body,
    usage_from_body,
)

__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "RERANK", "SCORE", "ChatCompletions",
           "Completions", "Embeddings", "Rerank", "Score"]


class _OpenAIGenerative(ProtocolAdapter):
    """Chat and completions: streamed as ``data:`` chunks ending with ``[DONE]``."""

    max_tokens_fields: ClassVar[tuple[str, ...]]
    """The fields vLLM reads for the output limit, the first given winning."""

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        model = self.model_of(payload)
        check_stream_fields(payload)
        sequences, param = self.sequences(payload)
        return RequestSpec(model=model, stream=payload.get("stream") is True,
                           max_output_tokens=self.requested_max_tokens(
                               payload, default_max_tokens) * sequences,
                           est_prompt_tokens=estimate_tokens(payload, self.prompt_keys),
                           sequences=sequences, sequences_param=param)

    def requested_max_tokens(self, payload: dict[str, Any], default: int) -> int:
        """The most output tokens one sequence may produce, as vLLM reads the request.

        Chat: ``max_completion_tokens``, else ``max_tokens``; completions: ``max_tokens``
        only (the legacy API has no ``max_completion_tokens``). ``default`` when absent.
        :meth:`read` multiplies it by the sequences generated.

        Raises:
            BadRequest: 400, one of those fields is not a positive integer.
        """
        per_sequence = default
        for key in reversed(self.max_tokens_fields):  # validate each; the first one wins
            v = positive_int(payload, key)
            if v is not None:
                per_sequence = v
        return per_sequence

    def sequences(self, payload: dict[str, Any]) -> tuple[int, str]:
        """``(sequences generated at once, the field that asked for them)``: ``n``.

        Raises:
            BadRequest: 400, the field is not a positive integer.
        """
        return positive_int(payload, "n") or 1, "n"

    def prepare(self, payload: dict[str, Any], spec: RequestSpec, *, served: str) -> bool:
        payload["model"] = served
        if not spec.stream:
            return False
        so = payload.get("stream_options")
        if isinstance(so, dict) and so.get("include_usage") is True:
            return False
        so = dict(so) if isinstance(so, dict) else {}
        so["include_usage"] = True  # the gateway needs the usage of every stream
        payload["stream_options"] = so
        return True

    def usage(self, body: bytes) -> Usage | None:
        return usage_from_body(body)

    def text(self, body: bytes) -> str | None:
        return text_from_body(body)

    def new_account(self, *, strip_usage: bool, keep_text: bool) -> EventAccount:
        return StreamAccount(strip_usage_chunk=strip_usage, keep_text=keep_text)


class ChatCompletions(_OpenAIGenerative):
    """``POST /v1/chat/completions``."""

    endpoint = "chat/completions"
    path = "/v1/chat/completions"
    max_tokens_fields = ("max_completion_tokens", "max_tokens")

    def tokenize_body(self, payload: dict[str, Any], served: str) -> dict[str, Any] | None:
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return None
        return {"model": served, "messages": messages, "add_generation_prompt": True}


class Completions(_OpenAIGenerative):
    """``POST /v1/completions``: the raw prompt goes to the backend's own completions
    endpoint unchanged (IDE autocomplete's fill-in-the-middle prompts, fault F10)."""

    endpoint = "completions"
    path = "/v1/completions"
    max_tokens_fields = ("max_tokens",)

    def sequences(self, payload: dict[str, Any]) -> tuple[int, str]:
        """``n``, or ``best_of`` if larger (vLLM generates ``best_of`` and returns ``n``)."""
        n, param = super().sequences(payload)
        best_of = positive_int(payload, "best_of") or 1
        return (best_of, "best_of") if best_of > n else (n, param)

    def tokenize_body(self, payload: dict[str, Any], served: str) -> dict[str, Any] | None:
        prompt = payload.get("prompt")
        return {"model": served, "prompt": prompt} if isinstance(prompt, str) else None


class Embeddings(ProtocolAdapter):
    """``POST /v1/embeddings``: never streamed, no output tokens, no vLLM priority."""

    endpoint = "embeddings"
    path = "/v1/embeddings"
    generative = False

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        model = self.model_of(payload)
        check_stream_fields(payload)
        return RequestSpec(model=model, stream=False, max_output_tokens=0,
                           est_prompt_tokens=estimate_tokens(payload, self.prompt_keys))

    def usage(self, body: bytes) -> Usage | None:
        return usage_from_body(body)


class Score(Embeddings):
    """``POST /v1/score`` (a pooling model: cross-encoder or embedding similarity)."""

    endpoint = "score"
    path = "/v1/score"
    prompt_keys = ("text_1", "text_2", "queries", "documents", "data_1", "data_2")


class Rerank(Embeddings):
    """``POST /v1/rerank`` (Jina/Cohere-style rerank on a pooling model)."""

    endpoint = "rerank"
    path = "/v1/rerank"
    prompt_keys = ("query", "documents")


CHAT = ChatCompletions()
COMPLETIONS = Completions()
EMBEDDINGS = Embeddings()
SCORE = Score()
RERANK = Rerank()
