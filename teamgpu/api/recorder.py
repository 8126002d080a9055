"""The one audit row (and the metrics) of each request."""

from __future__ import annotations

from teamgpu.api.context import RequestCtx
from teamgpu.metrics.prometheus import GatewayMetrics
from teamgpu.store.audit import AuditLog, UsageRow
from teamgpu.upstream.usage import Usage

__all__ = ["Recorder"]


class Recorder:
    """Writes a request's audit row (off the request path, through the audit writer) and
    its request metrics, once per request.

    Args:
        audit: the audit writer.
        metrics: the gateway's metrics.
        store_prompts: keep prompt and completion text in the row.
    """

    def __init__(self, audit: AuditLog, metrics: GatewayMetrics, *, store_prompts: bool) -> None:
        self.audit = audit
        self.metrics = metrics
        self.store_prompts = store_prompts

    async def record(
        self,
        ctx: RequestCtx,
        *,
        status: int,
        outcome: str,
        usage: Usage | None = None,
        error: str | None = None,
        completion_text: str | None = None,
    ) -> None:
        """Queue the request's one audit row (a second call for the same request is
        ignored). Waits only when the audit queue is full (back-pressure, no row lost)."""
        if ctx.recorded:
            return
        ctx.recorded = True
        p = ctx.principal
        u = usage or Usage(0, 0)
        priority = ctx.priority.label if ctx.priority is not None else None
        self.metrics.request_done(
            # a name a client made up never becomes a label (bounded cardinality)
            user=p.user if p else None, model=ctx.model if ctx.model_served else None,
            endpoint=ctx.endpoint,
            priority=priority, status=status, prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            ttft_s=ctx.ttft_ms / 1000 if ctx.ttft_ms is not None else None,
            duration_s=ctx.elapsed_ms() / 1000,
            queue_wait_s=ctx.queue_ms / 1000 if ctx.queue_ms is not None else None,
        )
        await self.audit.record(
            UsageRow(
                request_id=ctx.request_id,
                endpoint=ctx.endpoint,
                status=status,
                outcome=outcome,
                total_ms=ctx.elapsed_ms(),
                user=p.user if p else None,
                key_id=p.key_id if p else None,
                model=ctx.model,
                priority=priority,
                stream=ctx.stream,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                queue_ms=ctx.queue_ms,
                ttft_ms=ctx.ttft_ms,
                backend=ctx.backend,
                client_addr=ctx.client_addr,
                error=error,
                prompt_text=ctx.prompt_text if self.store_prompts else None,
                completion_text=completion_text if self.store_prompts else None,
                batch_id=ctx.batch_id,
            )
        )
