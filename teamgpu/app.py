"""The application factory and the gateway's shared resources.

``create_app(settings)`` builds the Starlette app; resources (store, HTTP client, backend
pool, audit writer) open in its lifespan and close, audit log flushed, when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from teamgpu.api import routes
from teamgpu.api.context import RequestCtx
from teamgpu.api.errors import (
    gateway_error_handler,
    http_exception_handler,
    unhandled_error_handler,
)
from teamgpu.api.request_id import RequestIdMiddleware
from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.errors import AuthenticationError, GatewayError, InvalidPriority
from teamgpu.limits import (
    KeyLimits,
    LimiterUnavailable,
    RateLimited,
    make_auth_failure_throttle,
    make_limiter,
)
from teamgpu.scheduler import (
    Admission,
    EngineLoad,
    EngineLoadPoller,
    FairQueueConfig,
    PriorityClass,
)
from teamgpu.settings import Settings
from teamgpu.store.audit import AuditLog, UsageRow, UsageTotalsCache
from teamgpu.store.db import open_store
from teamgpu.upstream.backends import BackendPool
from teamgpu.upstream.client import UpstreamClient
from teamgpu.upstream.usage import Usage

log = logging.getLogger("teamgpu")

INVALID_KEY_MESSAGES = {"unknown": "Invalid API key", "expired": "API key expired",
                        "revoked": "API key revoked"}
DEFAULT_INFLIGHT = 16  # vLLM's --max-num-seqs as `teamgpu up` sets it on the CPU


def fair_queue_config(s: Settings) -> FairQueueConfig:
    """The scheduler's configuration from the settings."""
    return FairQueueConfig(
        input_token_weight=s.input_token_weight,
        output_token_weight=s.output_token_weight,
        aging_s=s.aging_s,
        max_queued_per_user=s.max_queued_per_user,
        max_queued_total=s.max_queued_total,
        queue_timeout_s={PriorityClass.HIGH: s.queue_timeout_high_s,
                         PriorityClass.NORMAL: s.queue_timeout_normal_s,
                         PriorityClass.LOW: s.queue_timeout_low_s},
        reserved_slots_high=s.reserved_slots_high,
        reserved_slots_normal=s.reserved_slots_normal,
        kv_cache_high_watermark=s.kv_cache_high_watermark,
    )



class Gateway:
    """Everything a request needs, opened in the app's lifespan.

    Attributes:
        settings: the effective settings.
        keys: the key store.
        audit: the audit writer.
        client: the one pooled HTTP client to the backends (aiohttp).
        pool: backends and their health.
    """

    def __init__(self, settings: Settings, *, store: Engine | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else open_store(settings.db_url)
        self.keys = KeyStore(self.store)
        self._sqlite = self.store.url.get_backend_name() == "sqlite"
        self.usage_totals = UsageTotalsCache(self.store)  # /stats all-time totals
        self.send_priority_field = True
        self.started_at = datetime.now(UTC)
        self.audit: AuditLog
        self.client: UpstreamClient
        self.pool: BackendPool
        from teamgpu.api.observability import gateway_metrics

        self.metrics = gateway_metrics(self)
        self.fair_queue_config = fair_queue_config(settings)
        self.inflight_per_backend = settings.max_inflight_per_backend or DEFAULT_INFLIGHT
        # one admission controller per served model name, over the backends serving it
        self.admission: dict[str, Admission] = {}
        self._load_pollers: dict[str, EngineLoadPoller] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._no_tokenize: set[str] = set()
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.limiter = make_limiter(redis_url, on_redis_error=settings.redis_failure_mode,
                                    key_prefix=settings.redis_key_prefix)
        self.auth_throttle = make_auth_failure_throttle(
            redis_url, max_failures_per_minute=settings.auth_failures_per_minute,
            on_redis_error=settings.redis_failure_mode, key_prefix=settings.redis_key_prefix)

    async def open(self) -> None:
        s = self.settings
        self.client = UpstreamClient(connect_timeout_s=s.connect_timeout_s,
                                     read_timeout_s=s.read_timeout_s)
        self.pool = BackendPool(s.backends, self.client, health_interval_s=s.health_interval_s,
                                aliases=s.model_aliases)
        self.audit = AuditLog(self.store, queue_size=s.audit_queue_size)
        self.audit.start()
        self._scrape_client = httpx.AsyncClient(trust_env=False)
        for b in self.pool.backends:
            poller = EngineLoadPoller(self._scrape_client, f"{b.url}/metrics",
                                      interval_ms=s.engine_metrics_interval_s * 1000)
            self._load_pollers[b.url] = poller
            self._tasks.append(asyncio.create_task(poller.run(), name=f"load:{b.url}"))
        await self.pool.start()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.pool.close()
        await self.audit.close()
        await self.client.close()
        await self._scrape_client.aclose()
        await self.limiter.close()
        await self.auth_throttle.close()

    # --- scheduling -------------------------------------------------------------------
    def admission_for(self, served: str) -> Admission:
        """The admission controller of a served model; its capacity is
        ``inflight_per_backend`` times the number of up backends serving it (at least one).
        """
        n_up = max(1, sum(1 for b in self.pool.candidates(served) if b.up))
        capacity = self.inflight_per_backend * n_up
        adm = self.admission.get(served)
        if adm is None:
            adm = Admission(self.fair_queue_config, capacity=capacity,
                            engine_load=lambda: self.engine_load(served))
            self.admission[served] = adm
        elif adm.capacity != capacity:
            adm.capacity = capacity
        return adm

    def engine_load(self, served: str) -> EngineLoad | None:
        """Combined load of the up backends serving ``served``: waiting requests summed,
        KV cache usage the largest; None when no backend's load is known."""
        loads = [p.latest() for b in self.pool.candidates(served) if b.up
                 and (p := self._load_pollers.get(b.url)) is not None]
        known = [x for x in loads if x is not None]
        if not known:
            return None
        return EngineLoad(num_requests_waiting=sum(x.num_requests_waiting for x in known),
                          kv_cache_usage_perc=max(x.kv_cache_usage_perc for x in known))

    async def count_prompt_tokens(self, served: str, endpoint: str,
                                  payload: dict[str, Any]) -> int | None:
        """The exact prompt-token count from the backend's ``/tokenize`` (vLLM), or None
        when the backend has none, fails, or the prompt is not a string / message list.

        Used only for keys with a token limit, where the reservation should be exact. A
        dropped keep-alive connection is retried once; a timeout (2 s) is not.
        """
        b = self.pool.pick(served)
        if b is None or b.url in self._no_tokenize:
            return None
        if endpoint == "completions" and isinstance(payload.get("prompt"), str):
            body: dict[str, Any] = {"model": served, "prompt": payload["prompt"]}
        elif endpoint == "chat/completions" and isinstance(payload.get("messages"), list):
            body = {"model": served, "messages": payload["messages"],
                    "add_generation_prompt": True}
        else:
            return None
        for attempt in (1, 2):
            try:
                status, data = await self.client.post_json(f"{b.url}/tokenize", body, 2.0)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # a pooled keep-alive connection the engine closed just as it was reused
                # (uvicorn, as vLLM runs it, closes idle ones after 5 s): /tokenize has no
                # side effects, so once more, on another connection
                if attempt == 2:
                    return None
            except (aiohttp.ClientError, TimeoutError, OSError):
                return None
        if status == 404:
            self._no_tokenize.add(b.url)
            return None
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("count"), int):
            return None
        return int(data["count"])

    def key_limits(self, p: Principal) -> KeyLimits:
        """The key's limits, team defaults where the key has none (0 = unlimited)."""
        s = self.settings
        return KeyLimits(
            rpm=s.default_rpm if p.rpm is None else p.rpm,
            tpm=s.default_tpm if p.tpm is None else p.tpm,
            max_concurrent=s.default_max_concurrent if p.max_concurrent is None
            else p.max_concurrent,
            daily_tokens=s.default_daily_tokens if p.daily_tokens is None else p.daily_tokens,
        )

    async def limit_headers(self, p: Principal) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers of the key's standing, for answers refused
        before admission; ``{}`` without RPM and TPM or when the limit state cannot be read
        (Redis down and failing closed)."""
        limits = self.key_limits(p)
        if not (limits.rpm or limits.tpm):
            return {}
        try:
            st = await self.limiter.status(p.key_id, limits)
        except LimiterUnavailable:
            return {}
        return st.headers()

    # --- request helpers --------------------------------------------------------------
    def client_addr(self, request: Request) -> str | None:
        if self.settings.trust_forwarded_for:
            fwd = request.headers.get("x-forwarded-for")
            if fwd:
                # the rightmost entry is the one our proxy added; the rest the client sent
                return fwd.split(",")[-1].strip()[:64]
        return request.client.host if request.client else None

    async def authenticate(self, request: Request, ctx: RequestCtx | None = None) -> Principal:
        """The key's principal, from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.

        Raises:
            RateLimited: 429, the client's address made too many failed attempts.
            AuthenticationError: 401, missing, unknown, expired or revoked key.
        """
        secret = None
        auth = request.headers.get("authorization")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                secret = value.strip()
        if secret is None:
            secret = request.headers.get("x-api-key") or None
        p = await self.verify_secret(secret, self.client_addr(request) or "unknown")
        if ctx is not None:
            ctx.principal = p
        return p

    async def verify_secret(self, secret: str | None, addr: str) -> Principal:
        """The active key ``secret``, checked through the per-address failed-authentication
        throttle (docs/limits.md). The API and the dashboard's sign-in form both use it.

        Only a key that was never issued counts as a failure: a revoked or expired key is a
        stale client (an IDE still set up with it), and no key at all is a misconfigured
        one; counting those would lock out everyone behind the same address.

        Raises:
            RateLimited: 429, ``addr`` made too many failed attempts; the key is not
                looked at.
            AuthenticationError: 401, missing, unknown, expired or revoked key.
        """
        try:
            await self.auth_throttle.check(addr)
        except RateLimited:
            self.metrics.rate_limited(user=None, limit="auth_failures")
            raise
        if secret is None:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="missing_api_key",
            )
        # one look-up whatever the outcome: the reason of a refusal comes from the same row
        if self._sqlite:
            p = self.keys.lookup(secret)
        else:
            p = await asyncio.to_thread(self.keys.lookup, secret)
        status = "unknown" if p is None else p.status(datetime.now(UTC))
        if p is None or status != "active":
            if p is None:
                await self.auth_throttle.record_failure(addr)
            raise AuthenticationError(INVALID_KEY_MESSAGES[status])
        return p

    async def require_admin(self, request: Request) -> Principal:
        from teamgpu.errors import PermissionDenied

        p = await self.authenticate(request)
        if not p.is_admin:
            raise PermissionDenied("this endpoint needs an admin key")
        return p

    def request_priority(self, request: Request, principal: Principal | None) -> str:
        """The class a request is served at: ``X-Priority`` (or the key's default), capped
        at the key's ceiling; ``high``, ``normal`` or ``low``.

        Raises:
            InvalidPriority: 400 (param ``X-Priority``), a value that is not a class or alias.
        """
        default = principal.default_priority if principal else "normal"
        ceiling = PriorityClass.parse(principal.max_priority if principal else "high")
        raw = request.headers.get("x-priority")
        try:
            wanted = PriorityClass.parse(raw if raw and raw.strip() else default)
        except InvalidPriority as exc:
            exc.param = "X-Priority"
            raise
        return wanted.capped(ceiling).name.lower()

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
        """Queue the request's one audit row (a second call for the same request is ignored)."""
        if ctx.recorded:
            return
        ctx.recorded = True
        p = ctx.principal
        u = usage or Usage(0, 0)
        self.metrics.request_done(
            # a name a client made up never becomes a label (bounded cardinality)
            user=p.user if p else None, model=ctx.model if ctx.model_served else None,
            endpoint=ctx.endpoint,
            priority=ctx.priority, status=status, prompt_tokens=u.prompt_tokens,
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
                priority=ctx.priority,
                stream=ctx.stream,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                queue_ms=ctx.queue_ms,
                ttft_ms=ctx.ttft_ms,
                backend=ctx.backend,
                client_addr=ctx.client_addr,
                error=error,
                prompt_text=ctx.prompt_text if self.settings.store_prompts else None,
                completion_text=completion_text if self.settings.store_prompts else None,
            )
        )


def create_app(
    settings: Settings,
    *,
    store: Engine | None = None,
    gateway: Gateway | None = None,
) -> Starlette:
    """Build the gateway's ASGI app.

    Args:
        settings: the effective settings.
        store: an already opened store engine (default: opened from ``settings``).
        gateway: a prepared :class:`Gateway` (``teamgpu up`` adds its engine to it).
    """
    gw = gateway or Gateway(settings, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await gw.open()
        try:
            yield {}
        finally:
            await gw.close()

    from teamgpu.api import observability
    from teamgpu.dashboard import routes as dashboard_routes

    app = Starlette(
        routes=[
            *(Route(path, fn, methods=methods) for path, fn, methods in routes.ROUTES),
            *observability.starlette_routes(),
            *dashboard_routes.starlette_routes(),
        ],
        exception_handlers={
            HTTPException: http_exception_handler,
            GatewayError: gateway_error_handler,
            Exception: unhandled_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.gw = gw
    app.add_middleware(RequestIdMiddleware)
    return app
