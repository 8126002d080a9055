"""Who owns each stored Responses API object, and where it lives.

vLLM (0.32, with ``VLLM_ENABLE_RESPONSES_API_STORE=1``, which ``teamgpu up`` sets) keeps
responses in the engine's memory and serves ``GET /v1/responses/{id}`` to anyone who has
the id. The gateway records, for every response it relays with ``store`` on, the user and
key that created it, the backend that holds it, and its input items (for
``GET /v1/responses/{id}/input_items``, which vLLM does not serve). Retrieval, cancel,
delete, input items and ``previous_response_id`` are allowed to that user only; anyone
else gets 404, as for an unknown id. ``DELETE`` marks the row deleted (vLLM has no delete);
the engine forgets the response itself when it restarts. See docs/gateway.md.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Engine, insert, select, update

from teamgpu.store.tables import stored_responses

__all__ = ["ResponseRecord", "ResponseStore"]


@dataclass(frozen=True)
class ResponseRecord:
    """One stored response as the gateway knows it.

    Attributes:
        id: the response id (``resp_...``).
        user: the user whose key created it.
        key_id: that key.
        model: the served model name.
        backend: the base URL of the backend that holds it.
        created_at: when the gateway first saw it (UTC).
        deleted_at: when ``DELETE`` was called, else None.
        input_items: the request's input as a list of items.
    """

    id: str
    user: str
    key_id: str
    model: str
    backend: str
    created_at: datetime
    deleted_at: datetime | None
    input_items: builtins.list[dict[str, Any]]


class ResponseStore:
    """The ``responses`` table. Synchronous; call off the event loop for PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, response_id: str, *, user: str, key_id: str, model: str, backend: str,
               input_items: builtins.list[dict[str, Any]]) -> None:
        """Record a new response (a second record of the same id is ignored)."""
        if self.get(response_id) is not None:
            return
        with self.engine.begin() as conn:
            conn.execute(insert(stored_responses).values(
                id=response_id[:128], user=user, key_id=key_id, model=model[:256],
                backend=backend[:256], created_at=datetime.now(UTC), deleted_at=None,
                input_items=orjson.dumps(input_items).decode()))

    def get(self, response_id: str) -> ResponseRecord | None:
        """The record of ``response_id``, deleted or not; None if unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(select(stored_responses).where(
                stored_responses.c.id == response_id)).first()
        if row is None:
            return None
        m = row._mapping
        return ResponseRecord(
            id=m["id"], user=m["user"], key_id=m["key_id"], model=m["model"],
            backend=m["backend"], created_at=_aware(m["created_at"]),
            deleted_at=_aware(m["deleted_at"]) if m["deleted_at"] is not None else None,
            input_items=orjson.loads(m["input_items"] or "[]"))

    def delete(self, response_id: str) -> None:
        """Mark ``response_id`` deleted."""
        with self.engine.begin() as conn:
            conn.execute(update(stored_responses).where(stored_responses.c.id == response_id)
                         .values(deleted_at=datetime.now(UTC)))


def _aware(dt: Any) -> datetime:
    value = dt if isinstance(dt, datetime) else datetime.fromisoformat(str(dt))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
