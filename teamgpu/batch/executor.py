"""The seam between batch jobs and the request path.

The batch runner (:mod:`teamgpu.batch.runner`) never talks to a backend itself. It hands
each item of a job to a :class:`BatchExecutor`, which the gateway's request pipeline
implements: the call runs at the key's batch class (``low``, capped by the key's
ceiling), with the user's fair share and the key's limits, and leaves one audit row
marked with the batch id (``usage.batch_id``). Tests swap in a fake executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from teamgpu.auth.keys import Principal

__all__ = ["BatchCall", "BatchExecutor", "CallResult"]


@dataclass(frozen=True)
class BatchCall:
    """One item of a batch job, as the pipeline runs it."""

    principal: Principal          # the batch owner's key (teamgpu.auth.keys.Principal)
    # "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/responses"
    endpoint: str
    body: dict[str, Any]          # the line's "body"
    batch_id: str
    custom_id: str
    request_id: str               # unique per attempt, e.g. f"{batch_id}-{line_no}-{attempt}"


@dataclass(frozen=True)
class CallResult:
    """What the pipeline answered for one :class:`BatchCall`."""

    status: int                   # the HTTP status a client would have seen
    body: dict[str, Any]          # the answer, or {"error": {...}} in OpenAI's shape
    retry_after_s: float | None = None
    """Set on a 429 from a limit that frees with time (RPM/TPM/daily quota/concurrency):
    the job pauses, then retries THIS item; None = final."""


class BatchExecutor(Protocol):
    """Runs batch items through the gateway's request pipeline."""

    async def execute(self, call: BatchCall) -> CallResult:
        """Run ``call`` to its end and return what a client would have received.

        Cancelling the awaiting task (the job is stopped, cancelled or expired) aborts the
        request as a client disconnect would.
        """
        ...

    def slots(self, principal: Principal, model: str) -> int:
        """Items of this job to keep in flight at once so the job never fills the queue
        (the batch class's share of the engine's slots; >= 1)."""
        ...
