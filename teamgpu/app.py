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
from teamgpu.settings import Settings
from teamgpu.store.audit import AuditLog, UsageRow
from teamgpu.store.db import open_store
from teamgpu.upstream.backends import BackendPool
from teamgpu.upstream.client import UpstreamClient
from teamgpu.upstream.usage import Usage

log = logging.getLogger("teamgpu")

PRIORITY_ALIASES = {"interactive": "high", "batch": "low", "high": "high", "normal": "normal",
                    "low": "low"}
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}


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
        self.send_priority_field = True
        self.started_at = datetime.now(UTC)
        self.audit: AuditLog
        self.client: UpstreamClient
        self.pool: BackendPool

    async def open(self) -> None:
        s = self.settings
        self.client = UpstreamClient(connect_timeout_s=s.connect_timeout_s,
                                     read_timeout_s=s.read_timeout_s)
        self.pool = BackendPool(s.backends, self.client, health_interval_s=s.health_interval_s,
                                aliases=s.model_aliases)
        self.audit = AuditLog(self.store, queue_size=s.audit_queue_size)
        self.audit.start()
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        await self.audit.close()
        await self.client.close()

    # --- request helpers --------------------------------------------------------------
    def client_addr(self, request: Request) -> str | None:
        if self.settings.trust_forwarded_for:
            fwd = request.headers.get("x-forwarded-for")
            if fwd:
                return fwd.split(",")[0].strip()[:64]
        return request.client.host if request.client else None

    async def authenticate(self, request: Request, ctx: RequestCtx | None = None) -> Principal:
        """The key's principal, from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``.

        Raises:
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
        if secret is None:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="missing_api_key",
            )
        if self._sqlite:
            p = self.keys.verify(secret)
        else:
            p = await asyncio.to_thread(self.keys.verify, secret)
        if p is None:
            raise AuthenticationError(self._why_invalid(secret))
        if ctx is not None:
            ctx.principal = p
        return p

    def _why_invalid(self, secret: str) -> str:
        p = self.keys.lookup(secret)
        if p is not None and p.revoked_at is not None:
            return "API key revoked"
        if p is not None:
            return "API key expired"
        return "Invalid API key"

    async def require_admin(self, request: Request) -> Principal:
        from teamgpu.errors import PermissionDenied

        p = await self.authenticate(request)
        if not p.is_admin:
            raise PermissionDenied("this endpoint needs an admin key")
        return p

    def request_priority(self, request: Request, principal: Principal | None) -> str:
        """The class a request is served at: ``X-Priority`` (or the key's default), capped
        at the key's ceiling.

        Raises:
            InvalidPriority: 400, an ``X-Priority`` value that is not a class or alias.
        """
        default = principal.default_priority if principal else "normal"
        ceiling = principal.max_priority if principal else "high"
        raw = request.headers.get("x-priority")
        if raw is None or not raw.strip():
            wanted = default
        else:
            wanted = PRIORITY_ALIASES.get(raw.strip().lower())
            if wanted is None:
                raise InvalidPriority(
                    f"X-Priority must be one of high, normal, low, interactive, batch; got {raw!r}",
                    param="X-Priority",
                )
        if PRIORITY_ORDER[wanted] < PRIORITY_ORDER[ceiling]:
            wanted = ceiling
        return wanted

    @staticmethod
    def priority_value(priority: str) -> int:
        """vLLM's ``priority`` for a class (lower is served first)."""
        return PRIORITY_ORDER[priority]

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

    app = Starlette(
        routes=[Route(path, fn, methods=methods) for path, fn, methods in routes.ROUTES],
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
