"""What the pipeline needs to know of one client API: the protocol adapter.

The pipeline (:mod:`teamgpu.api.pipeline`) does the same for every API: authenticate,
read the body, resolve the model, reserve limits, wait for the scheduler, send to a
backend, relay the answer, settle, write one audit row. An adapter says only what
differs between APIs:

- how to read a request (:meth:`ProtocolAdapter.read`: model, stream, output tokens it
  may produce, prompt estimate) and what to change in it before it goes to the backend
  (:meth:`ProtocolAdapter.prepare`);
- where the usage is, in a complete answer (:meth:`ProtocolAdapter.usage`) or in a
  stream (:meth:`ProtocolAdapter.new_account`);
- how errors look to its clients (:meth:`ProtocolAdapter.error_response`, a mid-stream
  :meth:`ProtocolAdapter.error_event`, and the answer to a stream whose first event is an
  error, :meth:`ProtocolAdapter.stream_start_error`).

OpenAI's chat, completions and embeddings adapters are in
:mod:`teamgpu.api.adapters.openai`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

from teamgpu.api.context import RequestCtx
from teamgpu.api.errors import error_response
from teamgpu.auth.keys import Principal
from teamgpu.errors import BadRequest, GatewayError
from teamgpu.upstream.relay import error_from_stream_start, mid_stream_error_event
from teamgpu.upstream.usage import EventAccount, Usage

__all__ = ["ProtocolAdapter", "RequestSpec", "estimate_tokens"]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """What the pipeline reads from a request body.

    Attributes:
        model: the model name the client asked for (before aliases are resolved).
        stream: the answer is a server-sent event stream.
        max_output_tokens: the most tokens the request may generate, all sequences
            together (0 for embeddings); reserved against the key's token limits.
        est_prompt_tokens: a conservative prompt-token estimate (see
            :func:`estimate_tokens`), replaced by the backend's count at the end.
        sequences: how many sequences the engine generates at once for the request
            (``n``, or ``best_of`` on completions); each holds one of the engine's
            ``--max-num-seqs`` while admission counts the request once.
        sequences_param: the field that asked for them (for a 400's ``param``).
    """

    model: str
    stream: bool
    max_output_tokens: int
    est_prompt_tokens: int
    sequences: int = 1
    sequences_param: str = "n"


def estimate_tokens(payload: dict[str, Any], keys: tuple[str, ...]) -> int:
    """A conservative prompt-token estimate: one token per 2 bytes of the JSON of the
    fields ``keys`` (the prompt's fields), at least 1.

    Real tokenizers average about 4 bytes per token on English text and code, so this
    over-estimates; it is replaced by the backend's count when the request ends.
    """
    size = 0
    for key in keys:
        v = payload.get(key)
        if v is not None:
            size += len(orjson.dumps(v))
    return max(1, size // 2)


class ProtocolAdapter:
    """One client API on the pipeline. Subclasses set the class attributes and
    :meth:`read`; the other methods have OpenAI's behaviour by default.

    Attributes:
        endpoint: the name in the audit log and metric labels (``chat/completions``).
        path: the backend path the request goes to (``/v1/chat/completions``).
        generative: the request generates tokens: its output tokens are reserved and it
            carries vLLM's ``priority`` field (embeddings do not).
        scheduled: the request goes through the limits and the scheduler; tokenizer
            calls do not (they are authenticated, resolved and audited only).
        keeps_state: answers are state later requests refer to (:meth:`locate`,
            :meth:`answered`); the pipeline calls those hooks only then.
        prompt_keys: the body fields that hold the prompt (estimate, stored text).
    """

    endpoint: ClassVar[str]
    path: ClassVar[str]
    generative: ClassVar[bool] = True
    scheduled: ClassVar[bool] = True
    keeps_state: ClassVar[bool] = False
    prompt_keys: ClassVar[tuple[str, ...]] = ("messages", "prompt", "input")

    def model_of(self, payload: dict[str, Any]) -> str:
        """The model the request asks for: the body's ``model``.

        Raises:
            BadRequest: 400 (param ``model``), absent, empty or not a string.
        """
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", param="model")
        return model

    def read(self, payload: dict[str, Any], default_max_tokens: int) -> RequestSpec:
        """Read and check the fields the gateway needs.

        Args:
            payload: the request body (a JSON object).
            default_max_tokens: the output tokens assumed when the request sets none.

        Raises:
            BadRequest: 400, a field the gateway reads has the wrong type or value.
        """
        raise NotImplementedError

    def prepare(self, payload: dict[str, Any], spec: RequestSpec, *, served: str) -> bool:
        """Change ``payload`` in place before it goes to the backend: the served model
        name, and whatever the gateway needs for its accounting.

        Returns:
            True when the stream will carry a usage event the client did not ask for,
            which the relay must leave out.
        """
        payload["model"] = served
        return False

    def tokenize_body(self, payload: dict[str, Any], served: str) -> dict[str, Any] | None:
        """The body of vLLM's ``/tokenize`` that counts this request's prompt exactly, or
        None when the prompt has no form ``/tokenize`` takes."""
        return None

    def prompt_text(self, payload: dict[str, Any]) -> str | None:
        """The prompt as text for the audit log (``store_prompts``)."""
        for key in self.prompt_keys:
            if key in payload:
                v = payload[key]
                return v if isinstance(v, str) else orjson.dumps(v).decode()
        return None

    async def locate(self, principal: Principal, payload: dict[str, Any],
                     served: str) -> str | None:
        """The base URL of the backend the request must go to, because it holds state the
        request refers to (a stored response), or None for any backend of the model.
        ``served`` is the served model name the request resolved to.

        Raises:
            NotFound: 404, the request refers to state that is not the key's user's, or
                that lives with another model (no backend of ``served`` holds it).
        """
        return None

    async def answered(self, ctx: RequestCtx, payload: dict[str, Any], answer_id: str | None,
                       backend: str) -> None:
        """Called once the backend answered with success, before the client sees the end of
        the answer: ``answer_id`` is the answer's id (:meth:`answer_id`,
        :meth:`stream_answer_id`), ``backend`` the backend that answered."""

    def answer_id(self, body: bytes) -> str | None:
        """The id of a complete answer the API lets clients refer to later, or None."""
        return None

    def stream_answer_id(self, account: EventAccount) -> str | None:
        """The id a stream's events named, or None."""
        return None

    def usage(self, body: bytes) -> Usage | None:
        """The usage of a complete (non-streamed) answer, or None when it has none."""
        raise NotImplementedError

    def text(self, body: bytes) -> str | None:
        """The generated text of a complete answer, for the audit log (``store_prompts``)."""
        return None

    def new_account(self, *, strip_usage: bool, keep_text: bool) -> EventAccount:
        """A fresh account of one stream's events."""
        raise NotImplementedError

    # --- errors in the API's own shape -----------------------------------------------------
    def error_response(self, exc: GatewayError, headers: dict[str, str] | None = None
                       ) -> Response:
        """The client's view of ``exc``: its status and headers, OpenAI's error shape."""
        return error_response(exc, headers)

    def error_event(self, message: str, code: str) -> bytes:
        """The SSE event that ends a stream that broke after it started (fault F13)."""
        return mid_stream_error_event(message, code)

    def stream_start_error(self, data: bytes) -> tuple[int, bytes]:
        """Status and JSON body that answer a stream whose first event is the error
        ``data`` (fault F13)."""
        return error_from_stream_start(data)
