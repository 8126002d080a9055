"""Batch items through the pipeline: the gateway's :class:`~teamgpu.batch.BatchExecutor`.

Each item runs down the same path as a client's request (:meth:`Pipeline.serve`), with
the item's owner key, at the batch class (``low``, capped by the key's ceiling: a key whose
ceiling is ``low`` never runs above it), with the user's fair share and the key's limits.
Its one audit row carries the batch id (``usage.batch_id``) and the class ``low``.

A limit that refuses an item (RPM, TPM, concurrency, the daily quota: 429 with
``Retry-After``), or the per-user queue bound, pauses the job until it allows: the item is
not failed, and since nothing was served, the refused attempt leaves no audit row; the
retry that is served has one. Any other error is the item's answer (the error file).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from teamgpu.api.adapters.base import ProtocolAdapter
from teamgpu.api.context import RequestCtx
from teamgpu.api.guard import NoGuard
from teamgpu.api.pipeline import Pipeline
from teamgpu.auth.keys import Principal
from teamgpu.batch import BatchCall, CallResult
from teamgpu.errors import BadRequest, GatewayError, TooManyRequests
from teamgpu.scheduler import PriorityClass
from teamgpu.scheduler.registry import AdmissionRegistry
from teamgpu.upstream.relay import StreamRelay

__all__ = ["PipelineExecutor"]


class PipelineExecutor:
    """Runs batch items as the gateway's own requests.

    Args:
        pipeline: the request path.
        adapters: the protocol adapter of each endpoint a batch may name
            (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
            ``/v1/responses``).
        admissions: the scheduler, for :meth:`slots`.
    """

    def __init__(self, pipeline: Pipeline, adapters: dict[str, ProtocolAdapter],
                 admissions: AdmissionRegistry) -> None:
        self.pipeline = pipeline
        self.adapters = adapters
        self.admissions = admissions

    async def execute(self, call: BatchCall) -> CallResult:
        """Run one item and return what a client would have received (never raises for a
        refusal; cancelling the awaiting task aborts the request, as a client disconnect
        would)."""
        adapter = self.adapters[call.endpoint]
        ctx = RequestCtx(request_id=call.request_id, endpoint=adapter.endpoint,
                         client_addr=None, principal=call.principal, batch_id=call.batch_id)
        payload: dict[str, Any] = dict(call.body)
        priority = PriorityClass.LOW.capped(call.principal.max_priority)
        try:
            if payload.get("stream") is True:
                raise BadRequest("'stream' is not supported in a batch; leave it out",
                                 param="stream")
            answer = await self.pipeline.serve(ctx, adapter, payload, NoGuard(), {},
                                               priority=priority)
        except TooManyRequests as exc:
            # a limit (or the per-user queue bound) frees with time: pause, not fail
            return CallResult(exc.status, exc.body(), retry_after_s=float(exc.retry_after_s))
        except GatewayError as exc:
            await self.pipeline.recorder.record(ctx, status=exc.status, outcome=exc.outcome,
                                                error=exc.message)
            return CallResult(exc.status, exc.body())
        except asyncio.CancelledError:
            # the job stopped (gateway stopping, batch expired or cancelled): the row says
            # so, and the item runs again on resume unless the batch ended
            await asyncio.shield(self.pipeline.recorder.record(
                ctx, status=499, outcome="batch_aborted",
                error="the batch job stopped before the item was answered"))
            raise
        assert not isinstance(answer, StreamRelay)  # a batch item never streams
        try:
            body = orjson.loads(bytes(answer.body))
        except orjson.JSONDecodeError:
            body = {"error": {"message": "the backend's answer is not JSON",
                              "type": "server_error", "param": None, "code": "backend_error"}}
        return CallResult(answer.status_code, body if isinstance(body, dict) else {"data": body})

    def slots(self, principal: Principal, model: str) -> int:
        """Items of one job to keep in flight for ``model``: the slots the batch class may
        use (the model's in-flight slots less the reserves), at least one. With them the
        engine never waits for the job, and the fair queue holds at most one such share of
        the job's items."""
        served = self.pipeline.pool.resolve(model)
        if served is None:
            return 1  # the item will be refused (404): one at a time
        adm = self.admissions.for_model(served)
        return max(1, adm.capacity - self.admissions.config.reserved_slots_total)
