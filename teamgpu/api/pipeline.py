"""The one request path every client API takes.

    authenticate -> read the body -> resolve the model -> [limits] -> [scheduler]
      -> backend -> answer or stream relay -> settle -> audit row

:meth:`Pipeline.handle` serves an HTTP request through a protocol adapter
(:mod:`teamgpu.api.adapters`) that says how its API reads a request, where its usage is
and how its errors look. Every outcome, including every error, leaves exactly one audit
row. The claims an admitted request holds (limits reservation, scheduler lease, backend
slot) are owned by one :class:`~teamgpu.api.inflight.InFlight` and given back in one
place (:meth:`Pipeline.admitted`).

:meth:`Pipeline.serve` is the same path without HTTP around it, for callers inside the
gateway (batch items): they bring a principal and a body, and get the answer back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response

from teamgpu.api.adapters.base import ProtocolAdapter, RequestSpec
from teamgpu.api.body import parse_json_object, read_body
from teamgpu.api.context import RequestCtx
from teamgpu.api.guard import ClientDisconnected, DisconnectGuard, Guard
from teamgpu.api.inflight import InFlight
from teamgpu.api.recorder import Recorder
from teamgpu.auth.authenticator import Authenticator
from teamgpu.auth.keys import Principal
from teamgpu.errors import (
    BackendError,
    BadRequest,
    GatewayError,
    InvalidPriority,
    ModelNotFound,
    ServiceUnavailable,
)
from teamgpu.limits import KeyLimits
from teamgpu.limits.policy import LimitPolicy
from teamgpu.metrics.prometheus import GatewayMetrics
from teamgpu.scheduler import PriorityClass, QueuedRequest
from teamgpu.scheduler.registry import AdmissionRegistry
from teamgpu.settings import Settings
from teamgpu.upstream.backend_errors import error_from_backend
from teamgpu.upstream.backends import Backend, BackendPool
from teamgpu.upstream.client import UpstreamClient, UpstreamResponse
from teamgpu.upstream.relay import STREAM_HEADERS, StreamRelay, read_first_event
from teamgpu.upstream.routing import RoutingKey, routing_key
from teamgpu.upstream.sse import SSEParser
from teamgpu.upstream.tokenize import PromptCounter
from teamgpu.upstream.usage import EventAccount, Usage

__all__ = ["ModelHost", "Pipeline", "request_priority"]

log = logging.getLogger("teamgpu.pipeline")

Answer = Response | StreamRelay


class ModelHost(Protocol):
    """The engines behind the gateway, when it runs them (``teamgpu up``;
    :class:`teamgpu.engine.host.FleetHost`): models may start on demand."""

    async def ensure_ready(self, served: str) -> None:
        """Return when ``served`` can take a request, starting it if it starts on demand.

        Raises:
            ServiceUnavailable: 503 with Retry-After, it cannot now.
        """

    def begin(self, served: str) -> None:
        """A request of ``served`` was admitted (an engine in use is never stopped)."""

    def end(self, served: str) -> None:
        """That request ended."""

    def states(self) -> dict[str, str]:
        """Each of its models' engine state (``ready``, ``stopped``, ...)."""

    def starts_json(self) -> dict[str, dict[str, Any]]:
        """Per model that starts on demand: ``{"count", "last_wait_s", "waiting"}``."""


def request_priority(header: str | None, principal: Principal) -> PriorityClass:
    """The class a request is served at: ``X-Priority`` (or the key's default), capped at
    the key's ceiling.

    Raises:
        InvalidPriority: 400 (param ``X-Priority``), a value that is not a class or alias.
    """
    if header is None or not header.strip():
        wanted = principal.default_priority
    else:
        try:
            wanted = PriorityClass.parse(header)
        except InvalidPriority as exc:
            exc.param = "X-Priority"
            raise
    return wanted.capped(principal.max_priority)


class Pipeline:
    """The request path. Built once per gateway (see :class:`teamgpu.gateway.Gateway`)."""

    def __init__(
        self,
        *,
        settings: Settings,
        auth: Authenticator,
        limits: LimitPolicy,
        pool: BackendPool,
        client: UpstreamClient,
        admissions: AdmissionRegistry,
        prompts: PromptCounter,
        recorder: Recorder,
        metrics: GatewayMetrics,
        send_priority_field: bool = True,
        host: ModelHost | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.limits = limits
        self.pool = pool
        self.client = client
        self.admissions = admissions
        self.prompts = prompts
        self.recorder = recorder
        self.metrics = metrics
        self.send_priority_field = send_priority_field
        self.host = host

    def new_ctx(self, request: Request, endpoint: str) -> RequestCtx:
        """The context of one request to ``endpoint``: its id (set by the request-id
        middleware) and the client's address."""
        return RequestCtx(request_id=request.scope["state"]["request_id"], endpoint=endpoint,
                          client_addr=self.auth.client_addr(request))

    # --- HTTP ---------------------------------------------------------------------------
    async def handle(self, request: Request, adapter: ProtocolAdapter) -> Answer:
        """Serve one HTTP request of ``adapter``'s API.

        Errors come back in the API's own shape (:meth:`ProtocolAdapter.error_response`)
        with the status of :mod:`teamgpu.errors`: 400 bad body, 401/429 keys and limits,
        404 unknown model, 413/415, 503 with Retry-After while no backend can serve, 502
        and 504 for backend failures. A client that disconnects is recorded as 499.
        """
        ctx = self.new_ctx(request, adapter.endpoint)
        extra_headers: dict[str, str] = {}
        guard = DisconnectGuard(request)
        try:
            ctx.principal = await self.auth.authenticate(request)
            body = await read_body(request, self.settings.max_body_bytes)
            payload = parse_json_object(request, body)
            if not adapter.scheduled:
                return await self.passthrough(ctx, adapter, payload, guard)
            return await self.serve(ctx, adapter, payload, guard, extra_headers,
                                    priority_header=request.headers.get("x-priority"))
        except GatewayError as exc:
            await self.recorder.record(ctx, status=exc.status, outcome=exc.outcome,
                                       error=exc.message)
            if ctx.principal is not None and not any(
                    k.lower().startswith("x-ratelimit-") for k in (*exc.headers, *extra_headers)):
                # refused before admission (bad body, unknown model, too large): still the
                # key's standing, as on every answer to a known key
                extra_headers.update(await self.limits.headers(ctx.principal))
            return adapter.error_response(exc, extra_headers)
        except ClientDisconnected:
            await self.recorder.record(ctx, status=499, outcome="client_disconnected")
            return Response(status_code=499)
        except Exception as exc:
            # a server bug: still one audit row; the app's handler renders the 500
            await self.recorder.record(ctx, status=500, outcome="gateway_error",
                                       error=f"{type(exc).__name__}: {exc}"[:1000])
            raise
        except asyncio.CancelledError:
            # cancelled from elsewhere: the server stopping with the request still running
            # past its grace period (a client disconnect is ClientDisconnected). The client
            # sees its connection close; the request still gets its one row.
            await asyncio.shield(self.recorder.record(
                ctx, status=503, outcome="gateway_stopped",
                error="the gateway stopped before the answer was complete"))
            raise
        finally:
            guard.close()

    # --- the path -------------------------------------------------------------------------
    async def serve(self, ctx: RequestCtx, adapter: ProtocolAdapter, payload: dict[str, Any],
                    guard: Guard, extra_headers: dict[str, str], *,
                    priority_header: str | None = None,
                    priority: PriorityClass | None = None) -> Answer:
        """Serve an authenticated request (``ctx.principal`` set) whose body is
        ``payload``, at ``priority`` if given, else at the class ``priority_header`` asks
        for within the key's ceiling.

        Returns:
            The answer (a JSON response, or a stream relay that streams the rest and
            settles at its end); its audit row is written (a stream's when it ends).

        Raises:
            GatewayError: the request is refused or failed; nothing was recorded yet.
            ClientDisconnected: the client left (recorded by the caller as 499).
        """
        principal = ctx.principal
        assert principal is not None
        settings = self.settings
        model = adapter.model_of(payload)
        ctx.model = model[:256]  # the name asked for, in the audit row of a refused request
        served = self.resolve_model(model, principal)
        ctx.model = served
        ctx.model_served = True
        spec = adapter.read(payload, settings.default_max_tokens)  # 400s before any start
        if spec.sequences > settings.max_sequences_per_request:
            # each sequence holds an engine slot, and admission counts the request once
            raise BadRequest(f"'{spec.sequences_param}' asks for {spec.sequences} sequences; "
                             f"this server allows at most {settings.max_sequences_per_request}"
                             " per request (setting max_sequences_per_request)",
                             param=spec.sequences_param)
        if self.host is not None:  # a model that starts on demand starts now
            await guard.run(self.host.ensure_ready(served))
        ctx.stream = spec.stream
        ctx.priority = priority if priority is not None else request_priority(priority_header,
                                                                                principal)
        extra_headers["X-Priority"] = ctx.priority.label
        if settings.store_prompts:
            ctx.prompt_text = adapter.prompt_text(payload)
        ctx.est_prompt_tokens = spec.est_prompt_tokens
        # 404 for another user's state
        pinned = await adapter.locate(principal, payload, served) if adapter.keeps_state \
            else None
        strip_usage = adapter.prepare(payload, spec, served=served)
        limits = self.limits.for_key(principal)
        exact_prompt: int | None = None
        if limits.tpm or limits.daily_tokens:
            tokenize = adapter.tokenize_body(payload, served)
            if tokenize is not None:
                exact_prompt = await self.prompts.count(served, tokenize)
            if exact_prompt is not None:
                ctx.est_prompt_tokens = exact_prompt
        async with self.admitted(ctx, served, spec, limits, exact_prompt, guard,
                                 extra_headers) as job:
            if adapter.generative and self.send_priority_field:
                payload["priority"] = int(job.lease.priority)  # vLLM serves lower values first
            else:
                # a client's own vLLM priority would skip the key's ceiling
                payload.pop("priority", None)
            return await self.send(ctx, adapter, job, payload, served, strip_usage, guard,
                                   extra_headers, pinned=pinned)

    async def passthrough(self, ctx: RequestCtx, adapter: ProtocolAdapter,
                          payload: dict[str, Any], guard: Guard) -> Response:
        """Serve a request that is not scheduled (a tokenizer call): the model is resolved
        for the key as on every path, the body goes to one backend serving it, and its
        answer comes back unchanged. No limits are reserved, no audit tokens counted.

        Raises:
            GatewayError: as :meth:`serve` (404 for a model the key may not use, 503 with
                Retry-After while no backend is up, the backend's own 4xx).
            ClientDisconnected: the client left.
        """
        principal = ctx.principal
        assert principal is not None
        model = adapter.model_of(payload)
        ctx.model = model[:256]
        served = self.resolve_model(model, principal)
        ctx.model, ctx.model_served = served, True
        if self.host is not None:
            await guard.run(self.host.ensure_ready(served))
        adapter.prepare(payload, adapter.read(payload, self.settings.default_max_tokens),
                        served=served)
        backend = self.pool.pick(served)
        if backend is None:
            raise ServiceUnavailable(f"no backend serving {served!r} is up; try again shortly",
                                     retry_after_s=self.settings.backend_down_retry_after_s,
                                     code="backend_unavailable")
        ctx.backend = backend.url
        upstream = await guard.run(self.client.post(
            f"{backend.url}{adapter.path}", orjson.dumps(payload),
            {"content-type": "application/json", "x-request-id": ctx.request_id},
            backend_url=backend.url, retry_after_s=self.settings.backend_down_retry_after_s))
        try:
            raw = await guard.run(upstream.read())
        finally:
            upstream.close()
        if upstream.status != 200:
            raise error_from_backend(upstream.status, raw, backend.url,
                                     upstream.headers.get("retry-after"), path=adapter.path,
                                     model=served)
        await self.recorder.record(ctx, status=200, outcome="ok")
        return Response(raw, 200, media_type=upstream.headers.get("content-type",
                                                                  "application/json"))

    def models_for(self, principal: Principal) -> set[str] | None:
        """The served model names ``principal`` may use, or None for every model: the key's
        ``--models`` list (served names or aliases) resolved to served names."""
        if principal.models is None:
            return None
        return {s for m in principal.models if (s := self.pool.resolve(m)) is not None}

    def names_for(self, principal: Principal) -> list[str]:
        """The model names ``principal`` may send (served names, then aliases), as
        ``/v1/models`` lists them."""
        names = self.pool.names_for_clients()
        allowed = self.models_for(principal)
        if allowed is None:
            return names
        return [n for n in names if self.pool.resolve(n) in allowed]

    def resolve_model(self, model: str, principal: Principal) -> str:
        """The served model name a client's ``model`` maps to, for this key.

        A model the key may not use (``keys create --models``) gets exactly the answer of
        an unknown one: nothing tells the client that it exists.

        Raises:
            ServiceUnavailable: 503 with Retry-After, the name is unknown but a backend
                that never answered may serve it once it is up.
            ModelNotFound: 404 (param ``model``), listing the names this key may use.
        """
        served = self.pool.resolve(model)
        allowed = self.models_for(principal)
        if served is not None and (allowed is None or served in allowed):
            return served
        may_exist = allowed is None or model in (principal.models or ())
        if served is None and may_exist and self.pool.models_unknown():
            # not a 404: a backend that never answered may serve it once it is up
            raise ServiceUnavailable(
                f"no backend is up that could serve {model!r}; try again shortly",
                retry_after_s=self.settings.backend_down_retry_after_s,
                code="backend_unavailable",
            )
        raise self.model_not_found(model, principal)

    def model_not_found(self, model: str, principal: Principal) -> ModelNotFound:
        """The one 404 of a model ``principal`` may not use or that does not exist, on
        every endpoint and on ``/v1/models/{model}``: it lists the names the key may use."""
        names = self.names_for(principal)
        if names:
            available = ", ".join(names)
        elif principal.models is not None and self.pool.any_up():
            available = "(none: none of this key's models is served now)"
        else:
            available = "(none: no backend is up)"
        return ModelNotFound(
            f"The model {model!r} does not exist or is not served here. "
            f"Models available to this key: {available}", param="model")

    @contextlib.asynccontextmanager
    async def admitted(self, ctx: RequestCtx, served: str, spec: RequestSpec,
                       limits: KeyLimits, exact_prompt: int | None, guard: Guard,
                       extra_headers: dict[str, str]) -> AsyncIterator[InFlight]:
        """Reserve the request against the key's limits, wait for the scheduler to admit
        it, and yield its :class:`InFlight`; when the block ends, give its claims back
        (unless a stream relay took them over, which gives them back when it ends).

        Raises:
            RateLimited: 429, a limit refuses (nothing is held).
            UserQueueFull, QueueFull, QueueTimeout: 429/503 from the scheduler.
            ClientDisconnected: the client left while the request waited.
        """
        principal, priority = ctx.principal, ctx.priority
        assert principal is not None and priority is not None
        reservation, limit_status = await self.limits.reserve(
            principal, limits, ctx.est_prompt_tokens + spec.max_output_tokens)
        extra_headers.update(limit_status.headers())
        try:
            queued = QueuedRequest(
                request_id=ctx.request_id, user=principal.user, priority=priority,
                weight=principal.weight,
                # VTC charges the prompt at dispatch and never refunds: a typical estimate
                # (4 bytes per token), corrected upwards by the real count at the end
                est_prompt_tokens=exact_prompt if exact_prompt is not None
                else max(1, ctx.est_prompt_tokens // 2),
                est_output_tokens=spec.max_output_tokens,
            )
            lease = await guard.run(self.admissions.for_model(served).acquire(queued))
        except BaseException:
            await self.limits.settle(reservation, 0)
            raise
        ctx.queue_ms = lease.wait_s * 1000.0
        host = self.host
        if host is not None:
            host.begin(served)
        job = InFlight(self.limits, reservation, lease,
                       on_finish=None if host is None else lambda: host.end(served))
        try:
            yield job
        except ClientDisconnected:
            if ctx.backend is not None:
                # the engine had the prompt (and aborts on the disconnect): the tokens it
                # produced are unknown, the prompt was processed
                job.abandoned(ctx.est_prompt_tokens)
            raise
        finally:
            if not job.streaming:
                await job.finish()

    async def send(self, ctx: RequestCtx, adapter: ProtocolAdapter, job: InFlight,
                   payload: dict[str, Any], served: str, strip_usage: bool, guard: Guard,
                   extra_headers: dict[str, str], *, pinned: str | None = None) -> Answer:
        """Send the admitted request to a backend serving ``served`` and answer.

        Before the first byte of an answer, a backend that cannot be reached, or whose
        engine turns out dead (a 5xx after which its health check fails), is marked down
        and the request goes to another backend serving the model, if one is up; it is
        never sent again once a backend started answering it.

        ``pinned`` (from :meth:`ProtocolAdapter.locate`) names the one backend that may
        take the request (it holds state the request refers to): no other is tried.

        Returns:
            The complete answer (its audit row written), or the stream relay.

        Raises:
            ServiceUnavailable: 503 with Retry-After, no backend could take it.
            GatewayError: the backend refused or failed it (status from the backend).
        """
        body = orjson.dumps(payload)
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   "x-request-id": ctx.request_id}
        if isinstance(payload.get("priority"), int):
            # vLLM reads the header before the body field, and its Messages request model
            # drops a body ``priority`` (it has none): the header reaches every endpoint
            headers["x-vllm-priority"] = str(payload["priority"])
        # prefix affinity only matters when there is a choice of backend (docs/gateway.md)
        route_key = routing_key(adapter.endpoint, payload) \
            if len(self.pool.candidates(served)) > 1 else None
        tried: set[str] = set()
        failed: _EngineGone | None = None
        while True:
            backend = self._pinned(pinned, served, tried) if pinned is not None \
                else self.pool.pick(served, route_key, exclude=tried)
            if backend is None and failed is not None:
                raise failed.error  # every backend tried failed before answering
            if backend is None:
                raise ServiceUnavailable(
                    f"no backend serving {served!r} is up; try again shortly",
                    retry_after_s=self.settings.backend_down_retry_after_s,
                    code="backend_unavailable",
                )
            tried.add(backend.url)
            ctx.backend = backend.url
            job.use_backend(backend)
            try:
                return await self._answer(ctx, adapter, job, backend, payload, body, headers,
                                          served, route_key, strip_usage, guard, extra_headers)
            except _EngineGone as gone:
                job.release_backend()
                failed = gone
                log.warning("request %s: %s", ctx.request_id, gone.reason)

    def _pinned(self, url: str, served: str, tried: set[str]) -> Backend | None:
        """The pinned backend, when it is up, serves ``served`` and was not tried."""
        for b in self.pool.candidates(served):
            if b.url == url and b.up and b.url not in tried:
                return b
        return None

    async def _answer(self, ctx: RequestCtx, adapter: ProtocolAdapter, job: InFlight,
                      backend: Backend, payload: dict[str, Any], body: bytes,
                      headers: dict[str, str], served: str,
                      route_key: RoutingKey | None, strip_usage: bool, guard: Guard,
                      extra_headers: dict[str, str]) -> Answer:
        """One attempt on ``backend`` (see :meth:`send`).

        Raises:
            _EngineGone: nothing reached the client and another backend may serve it.
        """
        settings = self.settings
        try:
            upstream = await guard.run(
                self.client.post(f"{backend.url}{adapter.path}", body, headers,
                                 backend_url=backend.url,
                                 retry_after_s=settings.backend_down_retry_after_s))
        except ServiceUnavailable as exc:
            self.pool.report_failure(backend, exc.message)
            raise _EngineGone(exc.message, exc) from None
        self.pool.record(served, route_key, backend)  # its prefix cache now holds the prompt
        try:
            if upstream.status != 200:
                raw = await guard.run(upstream.read())
                if upstream.status >= 500 and await self._engine_dead(backend, served):
                    raise _EngineGone(f"backend {backend.url} answered {upstream.status} and "
                                      "its health check failed", self._dead_engine_error(served))
                raise error_from_backend(upstream.status, raw, backend.url,
                                         upstream.headers.get("retry-after"),
                                         path=adapter.path, model=served)
            if not ctx.stream:
                raw = await guard.run(upstream.read())
                upstream.release()
                job.usage = adapter.usage(raw) or Usage(0, 0)
                ctx.ttft_ms = ctx.elapsed_ms()
                if adapter.keeps_state:
                    await adapter.answered(ctx, payload, adapter.answer_id(raw), backend.url)
                await self.recorder.record(
                    ctx, status=200, outcome="ok", usage=job.usage,
                    completion_text=adapter.text(raw) if settings.store_prompts else None)
                ctype = upstream.headers.get("content-type", "application/json")
                return Response(raw, 200, headers=extra_headers, media_type=ctype)
        except BaseException:
            upstream.close()
            raise
        return await self._start_stream(ctx, adapter, job, backend, upstream, payload, served,
                                        strip_usage, guard, extra_headers)

    async def _start_stream(self, ctx: RequestCtx, adapter: ProtocolAdapter, job: InFlight,
                            backend: Backend, upstream: UpstreamResponse,
                            payload: dict[str, Any], served: str,
                            strip_usage: bool, guard: Guard, extra_headers: dict[str, str]
                            ) -> Answer:
        """Read the stream's first event; answer an error there as JSON (fault F13), else
        hand the claims and the rest of the stream to a relay."""
        settings = self.settings
        parser = SSEParser()
        account = adapter.new_account(strip_usage=strip_usage, keep_text=settings.store_prompts)
        try:
            first, rest = await guard.run(read_first_event(upstream, parser, account))
        except BaseException:
            upstream.close()
            raise
        if account.first_error_body is not None:
            upstream.close()
            status, err_body = adapter.stream_start_error(account.first_error_body)
            if status >= 500 and await self._engine_dead(backend, served):
                raise _EngineGone(f"backend {backend.url}'s stream failed at once and its "
                                  "health check failed", self._dead_engine_error(served))
            await self.recorder.record(ctx, status=status, outcome="backend_rejected",
                                       error=err_body.decode("utf-8", "replace")[:1000])
            return Response(err_body, status, headers=extra_headers,
                            media_type="application/json")
        if not first:
            upstream.close()
            raise BackendError(f"backend {backend.url} sent an empty stream")
        job.hand_to_stream()  # from here the relay gives the claims back when it ends
        job.charge_output(account.content_chunks)  # the first event may carry a token
        gap = self.metrics.token_gap_observer(
            model=ctx.model, priority=None if ctx.priority is None else ctx.priority.label)

        def on_chunk(acc: EventAccount) -> None:
            gap(acc.content_chunks)
            job.charge_output(acc.content_chunks)

        async def on_finishing() -> None:
            # before the client sees the end: its next request may refer to this answer
            # (previous_response_id) and must find its limits free
            job.usage = account.final_usage(ctx.est_prompt_tokens)
            if adapter.keeps_state and account.done and account.error is None:
                await adapter.answered(ctx, payload, adapter.stream_answer_id(account),
                                       backend.url)
            await job.settle_limits()

        async def on_end(outcome: str, error: str | None) -> None:
            if account.first_token_at is not None:
                ctx.ttft_ms = (account.first_token_at - ctx.started) * 1000.0
            job.usage = account.final_usage(ctx.est_prompt_tokens)
            job.release_backend()
            status = 200 if outcome in ("ok", "backend_error", "backend_timeout",
                                         "gateway_stopped") else 499
            try:
                await self.recorder.record(
                    ctx, status=status, outcome=outcome, usage=job.usage, error=error,
                    completion_text="".join(account.text) if settings.store_prompts else None)
            finally:
                await job.finish()

        hdrs = list(STREAM_HEADERS) + [
            (k.lower().encode(), v.encode()) for k, v in extra_headers.items()
        ]
        # the limits reservation is settled before the client sees the stream end, so its
        # next request finds the tokens and the concurrency slot free
        return StreamRelay(upstream, first, rest, parser, account, headers=hdrs,
                           on_chunk=on_chunk, on_end=on_end, backend_url=backend.url,
                           on_finishing=on_finishing, error_event=adapter.error_event)

    # --- dead engines -----------------------------------------------------------------------
    async def _engine_dead(self, backend: Backend, served: str) -> bool:
        """After a 5xx: poll the backend's health at once; True when it is now down (the
        engine died: vLLM answers 500 "EngineCore encountered an issue" until its API
        server exits)."""
        await self.pool.poll(backend)
        return not backend.up

    def _dead_engine_error(self, served: str) -> ServiceUnavailable:
        """The gateway's own words for a dead engine (never the engine's internal text)."""
        return ServiceUnavailable(
            f"the engine serving {served!r} stopped (it is being restarted); "
            f"try again in {self.settings.backend_down_retry_after_s} s",
            retry_after_s=self.settings.backend_down_retry_after_s,
            code="backend_unavailable")


class _EngineGone(Exception):
    """One backend attempt failed before the answer started; another backend may serve
    the request. Carries the error the client gets if none can."""

    def __init__(self, reason: str, error: GatewayError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
