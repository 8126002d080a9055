"""The gateway's services, built together in the app's lifespan.

:meth:`Gateway.open` builds every service at once (nothing appears later) and starts what
runs in the background (health polls, engine-load scrapes, the audit writer);
:meth:`Gateway.close` stops them, the audit log flushed. Constructors do no I/O: the
store is opened (and migrated) by :func:`teamgpu.preflight.open_store_checked` before,
or by :meth:`Gateway.open` when none is given.

Services, in the order a request meets them (docs/architecture.md)::

    auth (Authenticator)  ->  limits (LimitPolicy)  ->  admissions (AdmissionRegistry)
      ->  pool + client (BackendPool, UpstreamClient)  ->  recorder (AuditLog + metrics)

and the :class:`~teamgpu.api.pipeline.Pipeline` that takes a request through them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from starlette.requests import Request

from teamgpu.api.adapters import CHAT, COMPLETIONS, EMBEDDINGS
from teamgpu.api.adapters.responses import Responses
from teamgpu.api.batch_executor import PipelineExecutor
from teamgpu.api.observability import models_json
from teamgpu.api.pipeline import ModelHost, Pipeline
from teamgpu.api.recorder import Recorder
from teamgpu.auth.authenticator import Authenticator
from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.batch import BatchRunner, BatchService, FileStore
from teamgpu.errors import GatewayError
from teamgpu.limits import (
    AuthFailureThrottle,
    KeyLimits,
    Limiter,
    make_auth_failure_throttle,
    make_limiter,
)
from teamgpu.limits.policy import LimitPolicy
from teamgpu.metrics.gpu import NvmlSampler
from teamgpu.metrics.prometheus import GatewayMetrics, GpuSource
from teamgpu.preflight import DEFAULT_INFLIGHT, check_settings, open_store_checked, scheduler_config
from teamgpu.scheduler.registry import AdmissionRegistry
from teamgpu.settings import Settings
from teamgpu.store.audit import AuditLog, UsageTotalsCache
from teamgpu.store.responses import ResponseStore
from teamgpu.upstream.backends import BackendPool
from teamgpu.upstream.client import UpstreamClient
from teamgpu.upstream.tokenize import PromptCounter

__all__ = ["Gateway"]

log = logging.getLogger("teamgpu")


@dataclass(eq=False)
class Gateway:
    """Every service a request needs, built by :meth:`open`.

    Attributes:
        settings: the effective settings.
        store: the SQLAlchemy engine of the store (keys, audit log).
        started_at: when the gateway opened (UTC).
        keys: the key store.
        auth: authentication and the failed-auth throttle.
        limiter: where limit state lives (in process or Redis).
        limits: the limit policy (each key's limits through the limiter).
        client: the one pooled HTTP client to the backends (aiohttp).
        pool: the backends and their health.
        admissions: one admission controller per served model.
        audit: the audit writer.
        metrics: the Prometheus metrics.
        recorder: writes each request's audit row and metrics.
        usage_totals: all-time usage totals for ``/stats``.
        pipeline: the request path.
        responses: the Responses API's adapter, with the record of stored responses.
        batch: the Batch API's service (files, batches) over the store.
        batch_runner: runs the store's batch jobs through the pipeline.
    """

    settings: Settings
    store: Engine
    started_at: datetime
    keys: KeyStore
    auth: Authenticator
    auth_throttle: AuthFailureThrottle
    limiter: Limiter
    limits: LimitPolicy
    client: UpstreamClient
    pool: BackendPool
    admissions: AdmissionRegistry
    audit: AuditLog
    metrics: GatewayMetrics
    recorder: Recorder
    usage_totals: UsageTotalsCache
    pipeline: Pipeline
    responses: Responses
    batch: BatchService
    batch_runner: BatchRunner

    @classmethod
    async def open(cls, settings: Settings, *, store: Engine | None = None,
                   gpu: GpuSource | None = None, host: ModelHost | None = None,
                   model_capacity: dict[str, int] | None = None,
                   declared: dict[str, list[str]] | None = None) -> Gateway:
        """Build and start the gateway's services (inside the event loop that serves it).

        Args:
            settings: the effective settings.
            store: an already opened store (default: opened and migrated here).
            gpu: the GPU source of the metrics (default: NVML, 1 s cache).
            host: the engines behind the gateway (``teamgpu up``), for models that start
                on demand; None in front of servers that run already (``serve``).
            model_capacity: in-flight slots per backend of each served model whose engine
                is known (``up``: its ``--max-num-seqs``); others use
                ``max_inflight_per_backend``.
            declared: backend URL -> the model names it serves, known before it answers
                (``up``'s engines, some of which start on demand).

        Raises:
            ConfigError: a setting the gateway cannot work with (see
                :mod:`teamgpu.preflight`); adapted ones are logged as warnings.
        """
        s = settings
        check_settings(s)
        inflight = s.max_inflight_per_backend or DEFAULT_INFLIGHT
        # the reserves must fit the smallest engine (they are one setting for all models)
        fq_config, warnings = scheduler_config(s, min([inflight, *(model_capacity or {})
                                                       .values()]))
        for w in warnings:
            log.warning("%s", w)
        if store is None:
            store = open_store_checked(s)
        redis_url = s.redis_url.get_secret_value() if s.redis_url else None
        limiter = make_limiter(redis_url, on_redis_error=s.redis_failure_mode,
                               key_prefix=s.redis_key_prefix)
        throttle = make_auth_failure_throttle(
            redis_url, max_failures_per_minute=s.auth_failures_per_minute,
            on_redis_error=s.redis_failure_mode, key_prefix=s.redis_key_prefix)
        client = UpstreamClient(connect_timeout_s=s.connect_timeout_s,
                                read_timeout_s=s.read_timeout_s)
        pool = BackendPool(s.backends, client, health_interval_s=s.health_interval_s,
                           aliases=s.model_aliases, routing=s.routing)
        for url, names in (declared or {}).items():
            pool.declare(url, names)
        admissions = AdmissionRegistry(fq_config, inflight_per_backend=inflight, pool=pool,
                                       scrape_interval_s=s.engine_metrics_interval_s,
                                       model_capacity=model_capacity)
        metrics = GatewayMetrics(
            queue_depth=admissions.queue_depth,
            inflight=lambda: {b.url: b.in_flight for b in pool.backends},
            backend_up=lambda: {b.url: b.up for b in pool.backends},
            gpu=gpu if gpu is not None else NvmlSampler(),
            redis_errors=(lambda: {"limiter": limiter.redis_errors_total,
                                   "auth_throttle": throttle.redis_errors_total})
            if redis_url else None,
            # read at scrape time, so only once open() returned and gw exists: the same
            # models (pool, admissions, pipeline.host) and jobs (batch_runner) as /stats
            models=lambda: models_json(gw),
            batches=lambda: gw.batch_runner.stats(),
        )
        keys = KeyStore(store)
        auth = Authenticator(keys, throttle, trust_forwarded_for=s.trust_forwarded_for,
                             on_throttled=lambda: metrics.rate_limited(user=None,
                                                                       limit="auth_failures"))
        limits = LimitPolicy(
            limiter,
            KeyLimits(rpm=s.default_rpm, tpm=s.default_tpm,
                      max_concurrent=s.default_max_concurrent,
                      daily_tokens=s.default_daily_tokens),
            on_refused=lambda user, limit: metrics.rate_limited(user=user, limit=limit))
        audit = AuditLog(store, queue_size=s.audit_queue_size)
        recorder = Recorder(audit, metrics, store_prompts=s.store_prompts)
        pipeline = Pipeline(settings=s, auth=auth, limits=limits, pool=pool, client=client,
                            admissions=admissions, prompts=PromptCounter(client, pool),
                            recorder=recorder, metrics=metrics, host=host)
        responses = Responses(ResponseStore(store, retention_s=s.stored_responses_days * 86400),
                              store_in_thread=store.url.get_backend_name() != "sqlite")
        executor = PipelineExecutor(pipeline, {
            "/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS,
            "/v1/embeddings": EMBEDDINGS, "/v1/responses": responses}, admissions)
        runner = BatchRunner(store, executor, keys, s)

        async def authenticate(request: Request) -> Principal:
            p = await auth.authenticate(request)
            request.state.principal = p  # for the request's audit row
            return p

        async def audit_row(request: Request, endpoint: str, status: int,
                            error: GatewayError | None) -> None:
            ctx = pipeline.new_ctx(request, endpoint)
            ctx.principal = getattr(request.state, "principal", None)
            await recorder.record(ctx, status=status,
                                   outcome="ok" if error is None else error.outcome,
                                   error=None if error is None else error.message)

        batch = BatchService(authenticate=authenticate, engine=store, files=FileStore(store),
                             runner=runner, settings=s, audit=audit_row)
        gw = cls(settings=s, store=store, started_at=datetime.now(UTC), keys=keys, auth=auth,
                 auth_throttle=throttle, limiter=limiter, limits=limits, client=client,
                 pool=pool, admissions=admissions, audit=audit, metrics=metrics,
                 recorder=recorder, usage_totals=UsageTotalsCache(store), pipeline=pipeline,
                 responses=responses, batch=batch, batch_runner=runner)
        audit.start()
        await responses.store.start()
        await admissions.start()
        await pool.start()
        await runner.start()
        return gw

    async def close(self) -> None:
        """Stop the background work (batch jobs first: their items in flight run again on
        the next start), flush the audit log, close connections."""
        await self.batch_runner.stop()
        await self.responses.store.close()
        await self.admissions.close()
        await self.pool.close()
        await self.audit.close()
        await self.client.close()
        await self.limiter.close()
        await self.auth_throttle.close()

