"""Per-request context: what the audit row and the metrics need to know about a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from teamgpu.auth.keys import Principal
from teamgpu.scheduler.priority import PriorityClass


@dataclass
class RequestCtx:
    """One request as the pipeline fills it in, from its id to its audit row.

    Attributes:
        request_id: the ``X-Request-Id`` (the client's, or a new ``req_`` id).
        endpoint: the audit endpoint (``chat/completions``, ``models``, ...).
        client_addr: the client's address (see ``Authenticator.client_addr``).
        started: ``time.perf_counter()`` when the request arrived (seconds).
        principal: the key's principal, once authenticated.
        model: the name asked for until resolved, then the served name.
        model_served: ``model`` is a served model name (safe as a metric label).
        priority: the class the request is served at, once known.
        stream: the answer is a stream.
        backend: the base URL of the backend the request was sent to.
        queue_ms, ttft_ms: time in the gateway's queue and to the first token (ms).
        prompt_text: the prompt, only with ``store_prompts``.
        est_prompt_tokens: the prompt estimate (or exact count) reserved and charged.
        batch_id: the Batch API job the request is an item of.
        recorded: its audit row was queued (a second record is ignored).
    """

    request_id: str
    endpoint: str
    client_addr: str | None
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    model: str | None = None
    model_served: bool = False
    priority: PriorityClass | None = None
    stream: bool = False
    backend: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    prompt_text: str | None = None
    est_prompt_tokens: int = 0
    batch_id: str | None = None
    recorded: bool = False

    def elapsed_ms(self) -> float:
        """Milliseconds since the request arrived."""
        return (time.perf_counter() - self.started) * 1000.0
