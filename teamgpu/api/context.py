"""Per-request context: what the audit row and the metrics need to know about a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from teamgpu.auth.keys import Principal


@dataclass
class RequestCtx:
    request_id: str
    endpoint: str
    client_addr: str | None
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    model: str | None = None  # the name asked for until resolved, then the served name
    model_served: bool = False  # ``model`` is a served model name (safe as a metric label)
    priority: str | None = None
    stream: bool = False
    backend: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    prompt_text: str | None = None
    est_prompt_tokens: int = 0
    recorded: bool = False

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0
