"""The application factory.

``create_app(settings)`` builds the Starlette app. Its lifespan opens the gateway's
services (:meth:`teamgpu.gateway.Gateway.open`) and closes them, audit log flushed, when
it ends; ``app.state.gw`` is the :class:`~teamgpu.gateway.Gateway` while the app runs.
Nothing happens at import time or in this function but building the route table.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from teamgpu.api import routes
from teamgpu.api.errors import (
    gateway_error_handler,
    http_exception_handler,
    unhandled_error_handler,
)
from teamgpu.api.pipeline import ModelHost
from teamgpu.api.request_id import RequestIdMiddleware
from teamgpu.errors import GatewayError
from teamgpu.gateway import Gateway
from teamgpu.metrics.prometheus import GpuSource
from teamgpu.settings import Settings

__all__ = ["create_app"]


def create_app(
    settings: Settings,
    *,
    store: Engine | None = None,
    gpu: GpuSource | None = None,
    on_open: Callable[[Gateway], Awaitable[None]] | None = None,
    on_close: Callable[[], None] | None = None,
    host: ModelHost | None = None,
    model_capacity: dict[str, int] | None = None,
    declared: dict[str, list[str]] | None = None,
) -> Starlette:
    """Build the gateway's ASGI app.

    Args:
        settings: the effective settings.
        store: an already opened store engine (default: opened from ``settings`` when the
            app starts).
        gpu: the GPU source for the metrics (default: NVML).
        on_open: awaited with the gateway once its services are open, before the first
            request (``teamgpu up`` connects its engine supervisor to the backend pool).
        on_close: called when the app stops, before its services close (``serve`` and
            ``up`` remove their server record: uvicorn re-raises SIGTERM after it stops,
            so code after ``Server.run()`` may never run).
        host, model_capacity, declared: the engines behind the gateway (``teamgpu up``);
            see :meth:`teamgpu.gateway.Gateway.open`.

    Raises (when the app starts, from its lifespan):
        ConfigError: a configuration the gateway cannot work with.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        gw = await Gateway.open(settings, store=store, gpu=gpu, host=host,
                                model_capacity=model_capacity, declared=declared)
        app.state.gw = gw
        try:
            if on_open is not None:
                await on_open(gw)
            yield {}
        finally:
            if on_close is not None:
                on_close()
            await gw.close()

    from teamgpu.api import observability
    from teamgpu.batch import batch_routes
    from teamgpu.dashboard import routes as dashboard_routes

    app = Starlette(
        routes=[
            *(Route(path, fn, methods=methods) for path, fn, methods in routes.ROUTES),
            *batch_routes(lambda request: request.app.state.gw.batch),
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
    app.add_middleware(RequestIdMiddleware)
    return app
