"""A gateway on loopback with the observability routes installed.

The lead adds ``/metrics``, ``/stats`` (from :mod:`teamgpu.api.observability`) and the
dashboard to ``create_app``; until then, and regardless of it, these tests put them in
front of the app's own routes, so they exercise exactly the functions the app serves.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from teamgpu.api import observability
from teamgpu.dashboard import routes as dashboard_routes
from tests.support.fake_backend import ServerThread
from tests.support.harness import Harness, start_gateway


def install_observability(app: Any) -> None:
    """Serve /metrics, /stats and /dashboard from the observability modules."""
    app.router.routes[0:0] = [*observability.starlette_routes(),
                              *dashboard_routes.starlette_routes()]


@contextlib.contextmanager
def observed_gateway(data_dir: Path, backends: list[str], **settings: Any) -> Iterator[Harness]:
    with start_gateway(data_dir, backends, **settings) as h:
        install_observability(h.app)
        yield h


def proxy_reports_metrics() -> bool:
    """Whether the request path calls ``GatewayMetrics.request_done`` (the lead's wiring)."""
    import teamgpu.api.proxy
    import teamgpu.app
    import teamgpu.upstream.relay

    return any("request_done" in inspect.getsource(m)
               for m in (teamgpu.api.proxy, teamgpu.app, teamgpu.upstream.relay))


needs_request_path_wiring = pytest.mark.skipif(
    not proxy_reports_metrics(),
    reason="the request path does not call gw.metrics.request_done yet (lead's wiring)",
)


@pytest.fixture
def obs(fake_server: ServerThread, tmp_path: Path) -> Iterator[Harness]:
    """A fresh gateway (default settings) in front of the session's fake backend."""
    with observed_gateway(tmp_path / "gw", [fake_server.url]) as h:
        yield h
