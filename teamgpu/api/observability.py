"""Observability routes: ``GET /metrics`` and the ``/stats`` snapshot.

``/metrics`` is the Prometheus exposition of :class:`~teamgpu.metrics.GatewayMetrics`; it
needs no key unless ``settings.metrics_require_key`` (then an admin key: 401 without a
key, 403 with a non-admin key).

:func:`stats_snapshot` builds the JSON that ``/stats`` (admin key), the dashboard
(``/dashboard/api/stats``) and ``teamgpu top`` show, so all three report the same
numbers. Its shape is documented in docs/observability.md.

What this module reads from the :class:`~teamgpu.gateway.Gateway` (``gw``): its
``settings``, ``store``, ``started_at``, ``auth`` (admin keys), ``pool`` (backends),
``admissions`` (the scheduler's admission controllers, one per served model), ``audit``
(flushed first, so a request that was answered is counted), ``metrics`` and
``usage_totals``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from teamgpu.api.errors import json_response
from teamgpu.metrics.prometheus import PRIORITIES
from teamgpu.metrics.ttft import nearest_rank
from teamgpu.metrics.usage_report import start_of_day, usage_report
from teamgpu.scheduler.priority import PriorityClass

if TYPE_CHECKING:
    from teamgpu.gateway import Gateway
    from teamgpu.scheduler.stats import SchedulerStats

__all__ = [
    "ROUTES",
    "metrics",
    "starlette_routes",
    "stats",
    "stats_snapshot",
]


# ---------------------------------------------------------------------- snapshot


async def stats_snapshot(gw: Gateway, *, now: datetime | None = None) -> dict[str, Any]:
    """The JSON of ``/stats``: queue, in-flight, today's usage per user, TTFT, GPU,
    backends.

    Waits for the audit writer first, so every answered request is counted; the store
    is read in a worker thread. Shape (times in seconds, memory in bytes)::

        {"generated_at": iso, "started_at": iso, "uptime_s": float,
         "requests_total": int, "users": {user: {requests, prompt_tokens,
                                                 completion_tokens}},      # since ever
         "queue": {"high": int, "normal": int, "low": int, "total": int,
                   "oldest_wait_s": {"high": float, "normal": float, "low": float}},
         "in_flight": {"total": int, "capacity": int | None, "by_backend": {url: int}},
         "today": {"date": "YYYY-MM-DD", "requests", "prompt_tokens",
                   "completion_tokens", "total_tokens", "errors"},
         "users_today": {user: {requests, prompt_tokens, completion_tokens,
                                total_tokens, errors}},   # most tokens first
         "ttft": {"window_s": 300, "count": int, "p50_s": float | None,
                  "p95_s": float | None,
                  "per_minute": [{"t": epoch_s, "count", "p50_s", "p95_s"}] * 60},
         "gpu": [{"index", "name", "uuid", "utilization_percent", "memory_used_bytes",
                  "memory_total_bytes", "temperature_c", "power_w"}],   # [] without GPU
         "backends": [{"url", "up", "in_flight", "models", "error"}],
         "scheduler": {"admitted_total", "expired_total", "removed_total",
                       "rejected_total", "engine_held", "queue_wait_p50_s",
                       "queue_wait_p95_s"} | None,
         "models": [{"name", "roles", "state", "backends", "in_flight", "queued",
                     "capacity", "starts": {"count", "last_wait_s", "waiting"} | None}],
         "batches": [{"id", "user", "endpoint", "status",
                      "items": {"total", "queued", "in_flight", "done", "failed"},
                      "tokens": {...}, "started_at", "finished_at", "eta_s",
                      "paused_until"}]}   # active jobs, then those ended in the last hour

    Args:
        gw: The gateway.
        now: The current time (default: the clock), for "today".
    """
    now = now or datetime.now(UTC)
    await gw.audit.flush()
    midnight = start_of_day(now)
    # in-memory state first, read in the event loop that changes it
    m = gw.metrics
    wall = now.timestamp()
    summary = m.ttft_summary(wall)
    per_minute = m.ttft_per_minute(wall)
    sched = gw.admissions.stats()
    backends = list(gw.pool.backends)
    depth = gw.admissions.queue_depth()
    gpus = m.gpu_samples()
    totals, today_groups = await asyncio.to_thread(_read_store, gw, midnight)

    users_today = {g.key: {k: v for k, v in g.to_dict("user").items()
                           if k not in ("user", "p50_ttft_ms")} for g in today_groups}
    today = {"date": midnight.date().isoformat(),
             "requests": sum(g.requests for g in today_groups),
             "prompt_tokens": sum(g.prompt_tokens for g in today_groups),
             "completion_tokens": sum(g.completion_tokens for g in today_groups),
             "total_tokens": sum(g.total_tokens for g in today_groups),
             "errors": sum(g.errors for g in today_groups)}
    oldest = dict.fromkeys(PRIORITIES, 0.0)
    for st in sched:
        for cls, w in st.oldest_wait_s.items():
            label = PriorityClass(cls).label
            oldest[label] = max(oldest[label], w)
    return {
        "generated_at": now.isoformat(),
        "started_at": gw.started_at.isoformat(),
        "uptime_s": round((now - gw.started_at).total_seconds(), 3),
        "requests_total": totals["requests"],
        "users": totals["users"],
        "queue": {**depth, "total": sum(depth.values()), "oldest_wait_s": oldest},
        "in_flight": {
            "total": sum(b.in_flight for b in backends),
            "capacity": sum(st.capacity for st in sched) if sched else None,
            "by_backend": {b.url: b.in_flight for b in backends},
        },
        "today": today,
        "users_today": users_today,
        "ttft": {
            "window_s": summary.window_s,
            "count": summary.count,
            "p50_s": summary.p50_s,
            "p95_s": summary.p95_s,
            "per_minute": [{"t": p.t, "count": p.count, "p50_s": p.p50_s, "p95_s": p.p95_s}
                           for p in per_minute],
        },
        "gpu": [g.to_dict() for g in gpus],
        "backends": [{"url": b.url, "up": b.up, "in_flight": b.in_flight,
                      "models": list(b.models), "error": b.last_error} for b in backends],
        "scheduler": _scheduler_json(sched),
        "models": models_json(gw),
        "batches": [dict(j) for j in gw.batch_runner.stats()],
    }


def models_json(gw: Gateway) -> list[dict[str, Any]]:
    """Each served model: roles, its engine's state (``up``'s engines: ``starting``,
    ``ready``, ``sleeping``, ``stopped``, ``restarting``, ``failed``; a model served by
    other servers: ``ready`` while one of its backends is up, else ``down``), its backends,
    requests in flight and waiting, and, for one that starts on demand, its starts."""
    roles = {m.name: list(m.roles) for m in gw.settings.models}
    host = gw.pipeline.host
    states = host.states() if host is not None else {}
    starts = host.starts_json() if host is not None else {}
    out = []
    for name in gw.pool.served_names():
        backends = gw.pool.candidates(name)
        adm = gw.admissions.admissions.get(name)
        st = adm.stats() if adm is not None else None
        out.append({
            "name": name,
            "roles": roles.get(name, []),
            "state": states.get(name) or ("ready" if any(b.up for b in backends) else "down"),
            "backends": [b.url for b in backends],
            "in_flight": sum(b.in_flight for b in backends),
            "queued": sum(st.queued.values()) if st is not None else 0,
            "capacity": st.capacity if st is not None else None,
            "starts": starts.get(name),
        })
    return out


def _read_store(gw: Gateway, midnight: datetime) -> tuple[dict[str, Any], list[Any]]:
    """All-time totals per user and today's usage per user (runs in a worker thread)."""
    totals = gw.usage_totals.get()
    today = usage_report(gw.store, by="user", since=midnight, with_ttft=False)
    return totals, today


def _scheduler_json(sched: list[SchedulerStats]) -> dict[str, Any] | None:
    if not sched:
        return None
    waits = sorted(w for st in sched for ws in st.recent_waits_s.values() for w in ws)

    return {
        "admitted_total": sum(st.admitted_total for st in sched),
        "expired_total": sum(st.expired_total for st in sched),
        "removed_total": sum(st.removed_total for st in sched),
        "rejected_total": sum(st.rejected_queue_full_total + st.rejected_user_queue_full_total
                              for st in sched),
        "engine_held": any(st.engine_held for st in sched),
        "queue_wait_p50_s": nearest_rank(waits, 0.5),
        "queue_wait_p95_s": nearest_rank(waits, 0.95),
    }


# ---------------------------------------------------------------------- routes


def _gw(request: Request) -> Gateway:
    return request.app.state.gw  # type: ignore[no-any-return]


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the Prometheus exposition.

    Open by default; with ``metrics_require_key`` it needs an admin key (401 without a
    valid key, 403 with a non-admin key).
    """
    gw = _gw(request)
    if gw.settings.metrics_require_key:
        await gw.auth.require_admin(request)
    body, content_type = gw.metrics.render()
    return Response(body, 200, headers={"content-type": content_type,
                                        "cache-control": "no-store"})


async def stats(request: Request) -> Response:
    """``GET /stats`` (admin key): :func:`stats_snapshot` as JSON.

    401 without a valid key, 403 with a key that is not an admin key.
    """
    gw = _gw(request)
    await gw.auth.require_admin(request)
    return json_response(await stats_snapshot(gw), headers={"cache-control": "no-store"})


ROUTES = [
    ("/metrics", metrics, ["GET"]),
]


def starlette_routes(*, include_stats: bool = True) -> list[BaseRoute]:
    """``ROUTES`` (and, with ``include_stats``, ``GET /stats`` served by :func:`stats`) as
    Starlette routes, for ``Starlette(routes=...)``."""
    table = [*ROUTES, *([("/stats", stats, ["GET"])] if include_stats else [])]
    return [Route(path, fn, methods=methods) for path, fn, methods in table]
