"""Tokenizer endpoints: authenticated, resolved for the key and audited, but not
scheduled (no limits reserved, no slot taken): ``/tokenize`` and ``/detokenize`` (also
under ``/v1/``), and Anthropic's ``/v1/messages/count_tokens``.

vLLM answers all three itself; the gateway maps ``model`` to the served name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from teamgpu.api.adapters.anthropic import AnthropicMessages
from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec, estimate_tokens
from teamgpu.upstream.usage import Usage

__all__ = ["COUNT_TOKENS", "DETOKENIZE", "TOKENIZE", "CountTokens", "Detokenize", "Tokenize"]


class _Unscheduled(ProtocolAdapter):
    scheduled = False
    generative = False

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        return RequestSpec(model=self.model_of(payload), stream=False, max_output_tokens=0,
                           est_prompt_tokens=estimate_tokens(payload, self.prompt_keys))

    def usage(self, body: bytes) -> Usage | None:
        return None


class Tokenize(_Unscheduled):
    """vLLM's ``POST /tokenize``: ``{"model", "prompt"}`` or ``{"model", "messages"}``."""

    endpoint = "tokenize"
    path = "/tokenize"


class Detokenize(_Unscheduled):
    """vLLM's ``POST /detokenize``: ``{"model", "tokens"}``."""

    endpoint = "detokenize"
    path = "/detokenize"
    prompt_keys: ClassVar[tuple[str, ...]] = ("tokens",)


class CountTokens(AnthropicMessages):
    """Anthropic's ``POST /v1/messages/count_tokens`` (errors in Anthropic's shape)."""

    endpoint = "messages.count_tokens"
    path = "/v1/messages/count_tokens"
    scheduled = False
    generative = False

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        return RequestSpec(model=self.model_of(payload), stream=False, max_output_tokens=0,
                           est_prompt_tokens=estimate_tokens(payload, self.prompt_keys))


TOKENIZE = Tokenize()
DETOKENIZE = Detokenize()
COUNT_TOKENS = CountTokens()
