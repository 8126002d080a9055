"""Prometheus export: the only module that imports ``prometheus_client``.

:class:`GatewayMetrics` owns its own :class:`~prometheus_client.CollectorRegistry` (no
global registry, so two gateways in one process, as in tests, never share counters).
The request path reports finished requests, token gaps and refusals through three
methods; gauges (queue depth, in-flight, backend health, GPU, models, batch jobs) are read
from callables at scrape time, so they are never stale.

Exported (units in the names; ``_total`` for counters)::

    teamgpu_requests_total                 counter   {user, model, endpoint, priority, status}
    teamgpu_tokens_total                   counter   {user, model, kind="prompt"|"completion"}
    teamgpu_time_to_first_token_seconds    histogram {model, priority}
    teamgpu_request_duration_seconds       histogram {model, priority}
    teamgpu_inter_token_latency_seconds    histogram {model, priority}
    teamgpu_queue_wait_seconds             histogram {model, priority}
    teamgpu_rate_limited_total             counter   {user, limit}
    teamgpu_queue_depth                    gauge     {priority}
    teamgpu_inflight_requests              gauge     {backend}
    teamgpu_backend_up                     gauge     {backend}
    teamgpu_gpu_utilization_percent        gauge     {gpu, uuid, name}   (absent without GPU)
    teamgpu_gpu_memory_used_bytes          gauge     {gpu, uuid, name}
    teamgpu_gpu_memory_total_bytes         gauge     {gpu, uuid, name}
    teamgpu_gpu_temperature_celsius        gauge     {gpu, uuid, name}
    teamgpu_gpu_power_watts                gauge     {gpu, uuid, name}
    teamgpu_model_state                    gauge     {model, state}     (1: current state, else 0)
    teamgpu_model_inflight_requests        gauge     {model}
    teamgpu_model_queue_depth              gauge     {model}
    teamgpu_model_starts_total             counter   {model}            (requests that started it)
    teamgpu_batch_items                    gauge     {batch_id, user, state}   (active jobs)
    teamgpu_batch_eta_seconds              gauge     {batch_id, user}   (active jobs with an ETA)
    teamgpu_batch_jobs                     gauge     {status}           (active and recent jobs)

Label cardinality stays bounded because every label value comes from a bounded set:
``user`` is the user of a known key (the caller passes ``"anonymous"`` when there is
none), ``model`` a served model name (``"unknown"`` before the model was resolved),
``endpoint`` one of the proxy's endpoints, ``priority`` a class name (``"none"`` before
one was chosen), ``status`` an HTTP status code (or a batch status), ``limit`` a limit
name, ``backend`` a configured backend URL, ``state`` one of a fixed list of states, and
``batch_id`` the id of an *active* batch job (at most ``batch_max_active_jobs`` per
gateway; a job's series go away when it ends). Free text from a request never becomes a
label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from teamgpu.batch.protocol import ACTIVE_STATUSES, TERMINAL_STATUSES, JobStats
from teamgpu.metrics.gpu import GpuSample
from teamgpu.metrics.ttft import MinutePoint, TtftSummary, TtftWindow
from teamgpu.scheduler.priority import PriorityClass

log = logging.getLogger("teamgpu.metrics")

__all__ = [
    "BATCH_ITEM_STATES",
    "BATCH_STATUSES",
    "DURATION_BUCKETS_S",
    "ITL_BUCKETS_S",
    "MODEL_STATES",
    "PRIORITIES",
    "QUEUE_WAIT_BUCKETS_S",
    "TTFT_BUCKETS_S",
    "GatewayMetrics",
]

PRIORITIES = PriorityClass.labels()

#: A model's states: its engine's (``teamgpu up``), or ``ready``/``down`` for a model
#: served by servers that run already (``/stats`` ``models[].state``).
MODEL_STATES = ("ready", "starting", "sleeping", "stopped", "restarting", "failed", "down")
#: The states of a batch job's items (``/stats`` ``batches[].items``, total left out).
BATCH_ITEM_STATES = ("queued", "in_flight", "done", "failed")
#: Every batch status, the active ones first.
BATCH_STATUSES = (*ACTIVE_STATUSES, *TERMINAL_STATUSES)

#: Time to first token: an IDE completion should start within 100-250 ms; a queued batch
#: request may wait a minute.
TTFT_BUCKETS_S = (0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                  30.0, 60.0)
#: Whole request: from a short completion (50 ms) to a long batch generation (10 min).
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                      300.0, 600.0)
#: Gap between two streamed tokens: 10-50 ms on a GPU, 30-300 ms on a loaded CPU.
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
#: Wait in the gateway's fair queue: 0 when the engine has room, up to the low class's
#: one-hour timeout.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                        30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0)


class GpuSource(Protocol):
    """Anything with ``sample() -> list[GpuSample]``, e.g. :class:`NvmlSampler`."""

    def sample(self) -> list[GpuSample]: ...


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own.

    Args:
        registry: Registry to register in (default: a new one; never the global one).
        queue_depth: Returns waiting requests per class, e.g. ``{"high": 0, "normal": 2,
            "low": 40}``; classes left out are reported as 0.
        inflight: Returns requests in the engine per backend URL.
        backend_up: Returns per backend URL whether it answered its last health check.
        gpu: A GPU source (``NvmlSampler``) or a callable returning ``list[GpuSample]``.
        redis_errors: Returns Redis errors met so far per component (``limiter``,
            ``auth_throttle``), exported as ``teamgpu_redis_errors_total``; None (no Redis
            configured) leaves the family out.
        models: Returns the served models as ``/stats`` lists them
            (:func:`teamgpu.api.observability.models_json`): mappings with ``name``,
            ``state`` (one of :data:`MODEL_STATES`), ``in_flight``, ``queued`` and
            ``starts`` (``{"count", ...}`` for a model that starts on demand, else None).
            Exported as the ``teamgpu_model_*`` families; None leaves them out.
        batches: Returns the batch jobs as ``BatchRunner.stats`` does (active jobs, then
            those ended in the last hour). Exported as ``teamgpu_batch_items`` and
            ``teamgpu_batch_eta_seconds`` (active jobs only) and ``teamgpu_batch_jobs``
            (every job listed, by status); None leaves them out.
        ttft_window: The rolling TTFT window fed by :meth:`request_done` (default: 5
            minutes, one hour of per-minute history).
        wall_clock: Seconds since the epoch, for the TTFT window (default ``time.time``).

    Every gauge callable is called at scrape time; one that raises is logged and its
    family left out of that scrape, so one broken source never breaks ``/metrics``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        queue_depth: Callable[[], Mapping[str, int]] | None = None,
        inflight: Callable[[], Mapping[str, int]] | None = None,
        backend_up: Callable[[], Mapping[str, bool]] | None = None,
        gpu: GpuSource | Callable[[], list[GpuSample]] | None = None,
        redis_errors: Callable[[], Mapping[str, int]] | None = None,
        models: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        batches: Callable[[], Iterable[JobStats]] | None = None,
        ttft_window: TtftWindow | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft_window = ttft_window if ttft_window is not None else TtftWindow()
        self._wall_clock = wall_clock
        self._lock = threading.Lock()  # the TTFT window; Prometheus metrics lock themselves
        r = self.registry
        self.requests = Counter(
            "teamgpu_requests_total", "Requests answered, by HTTP status.",
            ["user", "model", "endpoint", "priority", "status"], registry=r)
        self.tokens = Counter(
            "teamgpu_tokens_total", "Tokens served (kind: prompt or completion).",
            ["user", "model", "kind"], registry=r)
        self.ttft = Histogram(
            "teamgpu_time_to_first_token_seconds",
            "Seconds from the request's arrival at the gateway to its first token "
            "(queue wait included).",
            ["model", "priority"], buckets=TTFT_BUCKETS_S, registry=r)
        self.duration = Histogram(
            "teamgpu_request_duration_seconds",
            "Seconds from the request's arrival to its last byte.",
            ["model", "priority"], buckets=DURATION_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            "teamgpu_inter_token_latency_seconds",
            "Seconds between two consecutive streamed tokens (chunks) of one response.",
            ["model", "priority"], buckets=ITL_BUCKETS_S, registry=r)
        self.queue_wait = Histogram(
            "teamgpu_queue_wait_seconds",
            "Seconds a request waited in the gateway's fair queue before admission.",
            ["model", "priority"], buckets=QUEUE_WAIT_BUCKETS_S, registry=r)
        self.rate_limited_counter = Counter(
            "teamgpu_rate_limited_total", "Requests refused by a rate limit or quota.",
            ["user", "limit"], registry=r)
        self.collector = LiveGaugeCollector(
            queue_depth=queue_depth, inflight=inflight, backend_up=backend_up, gpu=gpu,
            redis_errors=redis_errors, models=models, batches=batches)
        r.register(self.collector)

    # ------------------------------------------------------------ request path hooks

    def request_done(
        self,
        *,
        user: str | None,
        model: str | None,
        endpoint: str,
        priority: str | None,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        duration_s: float,
        queue_wait_s: float | None,
    ) -> None:
        """Count one finished request (once per request, on every outcome).

        Args:
            user: The key's user; None or ``"anonymous"`` when unauthenticated.
            model: Served model name; None before the model was resolved.
            endpoint: ``chat/completions``, ``completions`` or ``embeddings``.
            priority: ``high``, ``normal`` or ``low``; None before a class was chosen.
            status: HTTP status the client got (499: client disconnected).
            prompt_tokens: Prompt tokens charged, >= 0.
            completion_tokens: Completion tokens charged, >= 0.
            ttft_s: Seconds from arrival to the first token, None when no token came.
            duration_s: Seconds from arrival to the last byte.
            queue_wait_s: Seconds spent in the fair queue, None when never queued.
        """
        u = user or "anonymous"
        m = model or "unknown"
        p = priority or "none"
        self.requests.labels(u, m, endpoint, p, str(status)).inc()
        if prompt_tokens > 0:
            self.tokens.labels(u, m, "prompt").inc(prompt_tokens)
        if completion_tokens > 0:
            self.tokens.labels(u, m, "completion").inc(completion_tokens)
        self.duration.labels(m, p).observe(max(0.0, duration_s))
        if queue_wait_s is not None:
            self.queue_wait.labels(m, p).observe(max(0.0, queue_wait_s))
        if ttft_s is not None:
            self.ttft.labels(m, p).observe(max(0.0, ttft_s))
            with self._lock:
                self.ttft_window.add(ttft_s, self._wall_clock())

    def inter_token(self, *, model: str | None, priority: str | None, gap_s: float) -> None:
        """Observe the gap between two consecutive streamed chunks of one response.

        Args:
            model: Served model name.
            priority: The request's class.
            gap_s: Seconds between the two chunks, >= 0.
        """
        self.inter_token_latency.labels(model or "unknown", priority or "none").observe(
            max(0.0, gap_s))

    def token_gap_observer(
        self,
        *,
        model: str | None,
        priority: str | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> Callable[[int], None]:
        """A callback for one streamed response that feeds :meth:`inter_token`.

        Call it after every read from the backend with the running count of chunks that
        carried generated content (``StreamAccount.content_chunks``). When the count grew
        by ``n`` since the last growth, ``n`` gaps of ``elapsed / n`` seconds are observed
        (one network read may carry several tokens); the first token starts the clock.

        Args:
            model: Served model name.
            priority: The request's class.
            clock: Monotonic seconds (default ``time.perf_counter``).
        """
        last_count = 0
        last_at: float | None = None

        def observe(count: int) -> None:
            nonlocal last_count, last_at
            if count <= last_count:
                return
            now = clock()
            if last_at is not None:
                n = count - last_count
                gap = (now - last_at) / n
                for _ in range(n):
                    self.inter_token(model=model, priority=priority, gap_s=gap)
            last_count, last_at = count, now

        return observe

    def rate_limited(self, *, user: str | None, limit: str) -> None:
        """Count one request refused by a limit.

        Args:
            user: The key's user (``"anonymous"`` for the auth-failure throttle).
            limit: ``requests``, ``tokens``, ``concurrent``, ``daily_tokens`` or
                ``auth_failures`` (``RateLimited.limit``).
        """
        self.rate_limited_counter.labels(user or "anonymous", limit).inc()

    # ------------------------------------------------------------ reading

    def render(self) -> tuple[bytes, str]:
        """The exposition for ``GET /metrics``.

        Returns:
            ``(body, content_type)`` in the Prometheus text format of ``prometheus_client``,
        without the ``*_created`` timestamp series (they double the series count and no
        dashboard here uses them).
        """
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST

    def gpu_samples(self) -> list[GpuSample]:
        """The GPU source's current samples (cached by the source); ``[]`` without a GPU
        or when the source fails."""
        return list(_read("GPU", self.collector.gpu) or [])

    def ttft_summary(self, now: float | None = None) -> TtftSummary:
        """TTFT p50/p95 over the window (default 5 minutes); ``now`` defaults to the clock."""
        with self._lock:
            return self.ttft_window.summary(self._wall_clock() if now is None else now)

    def ttft_per_minute(self, now: float | None = None) -> list[MinutePoint]:
        """TTFT p50/p95 per minute of the last hour, oldest first."""
        with self._lock:
            return self.ttft_window.per_minute(self._wall_clock() if now is None else now)


class _WithoutCreated:
    """A view of a registry that leaves out the ``*_created`` samples of counters and
    histograms (``prometheus_client.disable_created_metrics`` would change global state)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            if family.samples or not family.name.endswith("_created"):
                yield family


class LiveGaugeCollector(Collector):
    """Gauges read at scrape time from callables (see :class:`GatewayMetrics`)."""

    def __init__(
        self,
        *,
        queue_depth: Callable[[], Mapping[str, int]] | None,
        inflight: Callable[[], Mapping[str, int]] | None,
        backend_up: Callable[[], Mapping[str, bool]] | None,
        gpu: GpuSource | Callable[[], list[GpuSample]] | None,
        redis_errors: Callable[[], Mapping[str, int]] | None = None,
        models: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        batches: Callable[[], Iterable[JobStats]] | None = None,
    ) -> None:
        self._queue_depth = queue_depth
        self._models = models
        self._batches = batches
        self._redis_errors = redis_errors
        self._inflight = inflight
        self._backend_up = backend_up
        if gpu is None or callable(gpu):
            self.gpu: Callable[[], list[GpuSample]] | None = gpu
        else:
            self.gpu = gpu.sample

    def describe(self) -> Iterable[Metric]:
        """The families this collector may yield (for the registry's duplicate check)."""
        for name, doc, labels in _GAUGES:
            yield GaugeMetricFamily(name, doc, labels=labels)
        if self._redis_errors is not None:
            yield CounterMetricFamily(*_REDIS_ERRORS)
        if self._models is not None:
            for name, doc, labels in _MODEL_GAUGES:
                yield GaugeMetricFamily(name, doc, labels=labels)
            yield CounterMetricFamily(*_MODEL_STARTS)
        if self._batches is not None:
            for name, doc, labels in _BATCH_GAUGES:
                yield GaugeMetricFamily(name, doc, labels=labels)

    def collect(self) -> Iterable[Metric]:
        """Read every source now and yield its gauges."""
        docs = {name: (doc, labels) for name, doc, labels in _GAUGES}

        def family(name: str) -> GaugeMetricFamily:
            doc, labels = docs[name]
            return GaugeMetricFamily(name, doc, labels=labels)

        depth = _read("queue depth", self._queue_depth)
        if depth is not None:
            f = family("teamgpu_queue_depth")
            for p in PRIORITIES:
                f.add_metric([p], float(depth.get(p, 0)))
            yield f
        inflight = _read("in-flight requests", self._inflight)
        if inflight is not None:
            f = family("teamgpu_inflight_requests")
            for backend, n in inflight.items():
                f.add_metric([backend], float(n))
            yield f
        up = _read("backend health", self._backend_up)
        if up is not None:
            f = family("teamgpu_backend_up")
            for backend, ok in up.items():
                f.add_metric([backend], 1.0 if ok else 0.0)
            yield f
        errors = _read("Redis errors", self._redis_errors)
        if errors is not None:
            c = CounterMetricFamily(*_REDIS_ERRORS)
            for component, n in errors.items():
                c.add_metric([component], float(n))
            yield c
        gpus = _read("GPU", self.gpu) or []
        if gpus:
            yield from _gpu_families(gpus, family)
        models = self._models
        if models is not None:
            yield from _read("models", lambda: _model_families(models())) or []
        batches = self._batches
        if batches is not None:
            yield from _read("batch jobs", lambda: _batch_families(batches())) or []


_REDIS_ERRORS_DOC = ("Redis errors met by the limiter or the failed-authentication throttle "
                     "(with redis_url set); see docs/limits.md for what each does while "
                     "Redis is down.")
_REDIS_ERRORS = ("teamgpu_redis_errors", _REDIS_ERRORS_DOC, None, ["component"])


_GPU_LABELS = ["gpu", "uuid", "name"]
_GAUGES: list[tuple[str, str, list[str]]] = [
    ("teamgpu_queue_depth", "Requests waiting in the gateway's fair queue, by requested class.",
     ["priority"]),
    ("teamgpu_inflight_requests", "Requests the gateway has open on each backend.", ["backend"]),
    ("teamgpu_backend_up", "1 when the backend answered its last health check, else 0.",
     ["backend"]),
    ("teamgpu_gpu_utilization_percent",
     "Share of the last sample period in which a kernel ran on the GPU (NVML), percent.",
     _GPU_LABELS),
    ("teamgpu_gpu_memory_used_bytes", "GPU memory in use (NVML), bytes.", _GPU_LABELS),
    ("teamgpu_gpu_memory_total_bytes", "GPU memory installed (NVML), bytes.", _GPU_LABELS),
    ("teamgpu_gpu_temperature_celsius", "GPU core temperature (NVML), degrees Celsius.",
     _GPU_LABELS),
    ("teamgpu_gpu_power_watts", "GPU power draw (NVML), watts.", _GPU_LABELS),
]

_MODEL_GAUGES: list[tuple[str, str, list[str]]] = [
    ("teamgpu_model_state",
     "1 for the served model's current state (its engine's with teamgpu up, else ready "
     "while one of its backends is up, down otherwise), 0 for its other states.",
     ["model", "state"]),
    ("teamgpu_model_inflight_requests", "Requests the gateway has open for the model, on "
     "all its backends.", ["model"]),
    ("teamgpu_model_queue_depth", "Requests waiting in the model's fair queue.", ["model"]),
]
_MODEL_STARTS = ("teamgpu_model_starts",
                 "Requests that found the model's engine stopped or asleep and waited until "
                 "it had started (teamgpu up, models that start on demand).",
                 None, ["model"])
_BATCH_GAUGES: list[tuple[str, str, list[str]]] = [
    ("teamgpu_batch_items", "Items of an active batch job by state (queued, in_flight, done: "
     "answered 2xx, failed: any other final answer).", ["batch_id", "user", "state"]),
    ("teamgpu_batch_eta_seconds", "Estimated seconds until an active batch job has answered "
     "every item (from its recent completion rate; a paused job's counts the pause).",
     ["batch_id", "user"]),
    ("teamgpu_batch_jobs", "Batch jobs this gateway runs or ended in the last hour, by "
     "status.", ["status"]),
]

_GPU_FIELDS = {
    "teamgpu_gpu_utilization_percent": "utilization_percent",
    "teamgpu_gpu_memory_used_bytes": "memory_used_bytes",
    "teamgpu_gpu_memory_total_bytes": "memory_total_bytes",
    "teamgpu_gpu_temperature_celsius": "temperature_c",
    "teamgpu_gpu_power_watts": "power_w",
}


def _gpu_families(
    gpus: list[GpuSample], family: Callable[[str], GaugeMetricFamily]
) -> Iterable[GaugeMetricFamily]:
    for name, attr in _GPU_FIELDS.items():
        f = family(name)
        for g in gpus:
            value = getattr(g, attr)
            if value is not None:
                f.add_metric([str(g.index), g.uuid or "", g.name], float(value))
        if f.samples:
            yield f


def _model_families(models: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """The ``teamgpu_model_*`` families of ``models`` (``/stats`` ``models`` items)."""
    docs = {name: (doc, labels) for name, doc, labels in _MODEL_GAUGES}
    state, inflight, queued = (GaugeMetricFamily(name, docs[name][0], labels=docs[name][1])
                               for name in ("teamgpu_model_state",
                                            "teamgpu_model_inflight_requests",
                                            "teamgpu_model_queue_depth"))
    starts = CounterMetricFamily(*_MODEL_STARTS)
    for m in models:
        name, current = str(m["name"]), str(m["state"])
        extra = () if current in MODEL_STATES else (current,)  # never hide a new state
        for st in (*MODEL_STATES, *extra):
            state.add_metric([name, st], 1.0 if st == current else 0.0)
        inflight.add_metric([name], float(m["in_flight"]))
        queued.add_metric([name], float(m["queued"]))
        if m.get("starts") is not None:
            starts.add_metric([name], float(m["starts"]["count"]))
    return [state, inflight, queued, starts]


def _batch_families(jobs: Iterable[JobStats]) -> list[Metric]:
    """The ``teamgpu_batch_*`` families: items and ETA of the active jobs (a paused job's
    counts the rest of its pause, as the runner reports it), and every job listed counted
    by status."""
    docs = {name: (doc, labels) for name, doc, labels in _BATCH_GAUGES}
    items, eta, by_status = (GaugeMetricFamily(name, docs[name][0], labels=docs[name][1])
                             for name in ("teamgpu_batch_items", "teamgpu_batch_eta_seconds",
                                          "teamgpu_batch_jobs"))
    counts = dict.fromkeys(BATCH_STATUSES, 0)
    for j in jobs:
        counts[j["status"]] = counts.get(j["status"], 0) + 1
        if j["status"] not in ACTIVE_STATUSES:
            continue
        it = j["items"]
        counted = (it["queued"], it["in_flight"], it["done"], it["failed"])
        for st, count in zip(BATCH_ITEM_STATES, counted, strict=True):
            items.add_metric([j["id"], j["user"], st], float(count))
        if j["eta_s"] is not None:
            eta.add_metric([j["id"], j["user"]], float(j["eta_s"]))
    for status, n in counts.items():
        by_status.add_metric([status], float(n))
    return [items, eta, by_status]


def _read(what: str, source: Callable[[], Any] | None) -> Any:
    """Call a gauge source; None when there is none or it failed (logged)."""
    if source is None:
        return None
    try:
        return source()
    except Exception:  # one broken source must not break the scrape
        log.exception("metrics: reading %s failed; left out of this scrape", what)
        return None
