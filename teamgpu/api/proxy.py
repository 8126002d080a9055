"""The OpenAI-compatible proxy path: chat, completions, embeddings.

One request flows: authenticate -> read and check the body -> resolve the model ->
[limits] -> [scheduler] -> backend -> relay -> audit row. Every outcome, including every
error, leaves exactly one audit row.

Fields the gateway owns in the body sent to the backend: ``model`` (mapped to the served
name), ``priority`` (vLLM's priority, from the request's class) and, for streams whose
client did not ask for it, ``stream_options.include_usage``. Everything else, unknown
fields included, is passed through unchanged; ``/v1/completions`` goes to the backend's
``/v1/completions`` with its raw prompt (fault F10).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from teamgpu.api.context import RequestCtx
from teamgpu.api.errors import error_response
from teamgpu.errors import (
    BackendError,
    BadRequest,
    ContextLengthExceeded,
    GatewayError,
    InvalidJSON,
    ModelNotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    UnsupportedMediaType,
)
from teamgpu.limits import Reservation
from teamgpu.scheduler import Lease, PriorityClass, QueuedRequest
from teamgpu.upstream.relay import (
    STREAM_HEADERS,
    StreamRelay,
    error_from_stream_start,
    read_first_event,
)
from teamgpu.upstream.sse import SSEParser
from teamgpu.upstream.usage import StreamAccount, Usage, text_from_body, usage_from_body

if TYPE_CHECKING:
    from teamgpu.app import Gateway

T = TypeVar("T")

GENERATIVE = {"chat/completions", "completions"}
NESTING_CHECK_BRACKETS = 200  # bodies with more brackets than this get the depth check


class ClientDisconnected(Exception):
    """The client went away before the answer was ready (audit status 499)."""


class DisconnectGuard:
    """Interrupts the request's awaits when the client disconnects, with one watcher task
    per request (not one per await).

    The watcher reads the ASGI ``receive`` channel for ``http.disconnect``. While an await
    runs under :meth:`run`, a disconnect cancels the handler's task and :meth:`run`
    raises :class:`ClientDisconnected`; outside :meth:`run` (writing the audit row,
    settling limits) a disconnect is only noted, and the next :meth:`run` raises at once.
    :meth:`close` stops the watcher; call it before a streaming response (which watches
    for itself) starts.
    """

    __slots__ = ("_armed", "_cancelling", "_owner", "_receive", "_watcher", "disconnected")

    def __init__(self, request: Request) -> None:
        self._receive = request.receive
        self._owner: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._armed = False
        self._cancelling = False
        self.disconnected = False

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        if self._armed and self._owner is not None:
            self._cancelling = True
            self._owner.cancel()

    async def run(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless the client disconnects first; then ``aw`` is cancelled.

        Raises:
            ClientDisconnected: the client closed the connection (audit status 499).
        """
        if self.disconnected:
            if inspect.iscoroutine(aw):
                aw.close()
            raise ClientDisconnected()
        if self._watcher is None:
            self._owner = asyncio.current_task()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        self._armed = True
        try:
            return await aw
        except asyncio.CancelledError:
            if not self._cancelling:
                raise  # cancelled from elsewhere (server shutdown): not ours to swallow
            raise ClientDisconnected() from None
        finally:
            self._armed = False
            if self._cancelling:
                self._cancelling = False
                assert self._owner is not None
                self._owner.uncancel()

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        PayloadTooLarge: 413, by Content-Length or while reading.
        ClientDisconnected: the client closed the connection mid-body (audit status 499).
    """
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise PayloadTooLarge(f"request body of {cl} bytes is over the limit of {limit} bytes")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left before sending the whole body (499)
        raise ClientDisconnected() from None
    return b"".join(chunks)


def parse_json_object(request: Request, body: bytes) -> dict[str, Any]:
    """Decode a JSON object body.

    Raises:
        UnsupportedMediaType: 415, a content type other than JSON.
        InvalidJSON: 400, empty, malformed, invalid UTF-8 or lone surrogates, not an object,
            or nested deeper than the gateway can forward (about 250 levels).
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {ctype!r}"
        )
    if not body:
        raise InvalidJSON("request body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("request body must be a JSON object")
    if body.count(b"[") + body.count(b"{") > NESTING_CHECK_BRACKETS:
        # the decoder takes 1,024 levels, the encoder that forwards the body about 250
        try:
            orjson.dumps(data)
        except orjson.JSONEncodeError:
            raise InvalidJSON("request body is nested too deeply to forward (at most about "
                              "250 levels of arrays and objects)") from None
    return data


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
    """A conservative prompt-token estimate: one token per 2 bytes of UTF-8 text, at least 1.

    Real tokenizers average about 4 bytes per token on English text and code, so this
    over-estimates; it is replaced by the backend's count when the request ends.
    """
    size = 0
    for key in ("messages", "prompt", "input"):
        v = payload.get(key)
        if v is not None:
            size += len(orjson.dumps(v))
    return max(1, size // 2)


def prompt_text(payload: dict[str, Any]) -> str | None:
    for key in ("messages", "prompt", "input"):
        if key in payload:
            v = payload[key]
            return v if isinstance(v, str) else orjson.dumps(v).decode()
    return None


def _positive_int(payload: dict[str, Any], key: str) -> int | None:
    """``payload[key]`` when it is a positive integer, None when absent or null.

    Raises:
        BadRequest: 400 (param ``key``), any other value. The gateway must read these
            fields exactly as the engine will, or a limit could be passed around.
    """
    v = payload.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f"'{key}' must be an integer of at least 1, got {v!r}"[:300],
                         param=key)
    return v


def check_stream_fields(payload: dict[str, Any]) -> None:
    """``stream`` must be a boolean and ``stream_options`` an object, when given.

    vLLM would take ``1``, ``"true"`` or ``"yes"`` for true: accepted here they would
    stream without the gateway knowing, and so without its usage accounting.

    Raises:
        BadRequest: 400 (param ``stream`` or ``stream_options``).
    """
    v = payload.get("stream")
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"'stream' must be true or false, got {v!r}"[:300], param="stream")
    so = payload.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")


def requested_max_tokens(payload: dict[str, Any], default: int, endpoint: str) -> int:
    """The most output tokens the request may produce, as vLLM reads the request.

    Chat: ``max_completion_tokens``, else ``max_tokens``; completions: ``max_tokens``
    only (the legacy API has no ``max_completion_tokens``). ``default`` when absent. Times
    the number of sequences generated: ``n`` (and ``best_of`` on completions, if larger).

    Raises:
        BadRequest: 400, one of those fields is not a positive integer.
    """
    keys = ("max_completion_tokens", "max_tokens") if endpoint == "chat/completions" \
        else ("max_tokens",)
    per_sequence = default
    for key in reversed(keys):  # validate each; the first in ``keys`` wins
        v = _positive_int(payload, key)
        if v is not None:
            per_sequence = v
    sequences = _positive_int(payload, "n") or 1
    if endpoint == "completions":
        sequences = max(sequences, _positive_int(payload, "best_of") or 1)
    return per_sequence * sequences


def request_ctx(gw: Gateway, request: Request, endpoint: str) -> RequestCtx:
    """The context of one request to ``endpoint``: its id (set by the request-id
    middleware) and the client's address (X-Forwarded-For only when trusted)."""
    return RequestCtx(request_id=request.scope["state"]["request_id"], endpoint=endpoint,
                      client_addr=gw.client_addr(request))


async def handle(request: Request, endpoint: str) -> Response | StreamRelay:
    """Serve one OpenAI request on ``endpoint`` (``chat/completions``, ``completions`` or
    ``embeddings``). Errors come back in OpenAI's shape; see :mod:`teamgpu.errors`."""
    gw: Gateway = request.app.state.gw
    ctx = request_ctx(gw, request, endpoint)
    extra_headers: dict[str, str] = {}
    guard = DisconnectGuard(request)
    try:
        ctx.principal = await gw.authenticate(request, ctx)
        body = await read_body(request, gw.settings.max_body_bytes)
        payload = parse_json_object(request, body)
        return await _forward(gw, request, guard, ctx, payload, extra_headers)
    except GatewayError as exc:
        await gw.record(ctx, status=exc.status, outcome=exc.outcome, error=exc.message)
        if ctx.principal is not None and not any(
                k.lower().startswith("x-ratelimit-") for k in (*exc.headers, *extra_headers)):
            # refused before admission (bad body, unknown model, too large): still the
            # key's standing, as on every answer to a known key
            extra_headers.update(await gw.limit_headers(ctx.principal))
        return error_response(exc, extra_headers)
    except ClientDisconnected:
        await gw.record(ctx, status=499, outcome="client_disconnected")
        return Response(status_code=499)
    except Exception as exc:
        # a server bug: still one audit row; the app's handler renders the 500
        await gw.record(ctx, status=500, outcome="gateway_error",
                        error=f"{type(exc).__name__}: {exc}"[:1000])
        raise
    except asyncio.CancelledError:
        # cancelled from elsewhere: the server stopping with the request still running
        # past its grace period (a client disconnect is ClientDisconnected). The client
        # sees its connection close; the request still gets its one row.
        await asyncio.shield(gw.record(
            ctx, status=503, outcome="gateway_stopped",
            error="the gateway stopped before the answer was complete"))
        raise
    finally:
        guard.close()


async def _forward(
    gw: Gateway,
    request: Request,
    guard: DisconnectGuard,
    ctx: RequestCtx,
    payload: dict[str, Any],
    extra_headers: dict[str, str],
) -> Response | StreamRelay:
    settings = gw.settings
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    ctx.model = model[:256]  # the name asked for, in the audit row of a refused request
    served = gw.pool.resolve(model)
    if served is None and gw.pool.models_unknown():
        # not a 404: a backend that never answered may serve it once it is up
        raise ServiceUnavailable(
            f"no backend is up that could serve {model!r}; try again shortly",
            retry_after_s=settings.backend_down_retry_after_s,
            code="backend_unavailable",
        )
    if served is None:
        names = gw.pool.names_for_clients()
        raise ModelNotFound(
            f"The model {model!r} does not exist or is not served here. "
            f"Models available to this key: {', '.join(names) or '(none: no backend is up)'}",
            param="model",
        )
    ctx.model = served
    ctx.model_served = True
    payload["model"] = served
    check_stream_fields(payload)
    stream = payload.get("stream") is True and ctx.endpoint in GENERATIVE
    ctx.stream = stream
    ctx.priority = gw.request_priority(request, ctx.principal)
    extra_headers["X-Priority"] = ctx.priority
    if settings.store_prompts:
        ctx.prompt_text = prompt_text(payload)
    ctx.est_prompt_tokens = estimate_prompt_tokens(payload)
    strip_usage = False
    if stream:
        so = payload.get("stream_options")
        if not isinstance(so, dict) or so.get("include_usage") is not True:
            so = dict(so) if isinstance(so, dict) else {}
            so["include_usage"] = True
            payload["stream_options"] = so
            strip_usage = True
    principal = ctx.principal
    assert principal is not None
    max_tokens = requested_max_tokens(payload, settings.default_max_tokens, ctx.endpoint) \
        if ctx.endpoint in GENERATIVE else 0
    limits = gw.key_limits(principal)
    exact_prompt: int | None = None
    if limits.tpm or limits.daily_tokens:
        exact_prompt = await gw.count_prompt_tokens(served, ctx.endpoint, payload)
        if exact_prompt is not None:
            ctx.est_prompt_tokens = exact_prompt
    try:
        reservation, limit_status = await gw.limiter.reserve(
            principal.key_id, limits, ctx.est_prompt_tokens + max_tokens)
    except TooManyRequests as exc:
        gw.metrics.rate_limited(user=principal.user, limit=getattr(exc, "limit", "unknown"))
        raise
    extra_headers.update(limit_status.headers())
    final = Usage(0, 0)
    abandoned_tokens = 0  # charged when the client leaves after the engine got the prompt
    lease: Lease | None = None
    handed_off = False
    try:
        adm = gw.admission_for(served)
        qreq = QueuedRequest(
            request_id=ctx.request_id, user=principal.user,
            priority=PriorityClass.parse(ctx.priority), weight=principal.weight,
            # VTC charges the prompt at dispatch and never refunds: a typical estimate
            # (4 bytes per token), corrected upwards by the real count at the end
            est_prompt_tokens=exact_prompt if exact_prompt is not None
            else max(1, ctx.est_prompt_tokens // 2),
            est_output_tokens=max_tokens,
        )
        lease = await guard.run(adm.acquire(qreq))
        ctx.queue_ms = lease.wait_s * 1000.0
        if ctx.endpoint in GENERATIVE and gw.send_priority_field:
            payload["priority"] = int(lease.priority)  # vLLM serves lower values first
        else:
            # a client's own vLLM priority would skip the key's ceiling
            payload.pop("priority", None)
        result = await _send(gw, guard, ctx, payload, served, strip_usage, extra_headers,
                             lease, reservation)
        if isinstance(result, tuple):
            response, final = result
            return response
        handed_off = True  # the stream relay settles the lease and the reservation
        return result
    except ClientDisconnected:
        if ctx.backend is not None:
            # the engine had the prompt (and aborts on the disconnect): the tokens it
            # produced are unknown, the prompt was processed
            abandoned_tokens = ctx.est_prompt_tokens
        raise
    finally:
        if not handed_off:
            if lease is not None:
                lease.charge(prompt_tokens=final.prompt_tokens,
                             completion_tokens=final.completion_tokens)
                lease.release()
            await gw.limiter.settle(reservation, max(final.total, abandoned_tokens))


async def _send(
    gw: Gateway,
    guard: DisconnectGuard,
    ctx: RequestCtx,
    payload: dict[str, Any],
    served: str,
    strip_usage: bool,
    extra_headers: dict[str, str],
    lease: Lease,
    reservation: Reservation,
) -> tuple[Response, Usage] | StreamRelay:
    """Send the admitted request to a backend.

    Returns:
        ``(response, usage)`` for a complete answer (or an error answered by the backend),
        or the stream relay that streams the rest and settles at its end.
    """
    settings = gw.settings
    stream = ctx.stream
    backend = gw.pool.pick(served)
    if backend is None:
        raise ServiceUnavailable(
            f"no backend serving {served!r} is up; try again shortly",
            retry_after_s=settings.backend_down_retry_after_s,
            code="backend_unavailable",
        )
    ctx.backend = backend.url
    body = orjson.dumps(payload)
    url = f"{backend.url}/v1/{ctx.endpoint}"
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               "x-request-id": ctx.request_id}
    backend.in_flight += 1
    released = False
    handed_off = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            backend.in_flight -= 1

    try:
        try:
            upstream = await guard.run(
                gw.client.post(url, body, headers, backend_url=backend.url,
                               retry_after_s=settings.backend_down_retry_after_s),
            )
        except ServiceUnavailable as exc:
            gw.pool.report_failure(backend, exc.message)
            raise
        try:
            if upstream.status != 200:
                raw = await guard.run(upstream.read())
                raise _backend_status_error(upstream.status, raw, backend.url,
                                            upstream.headers.get("retry-after"),
                                            endpoint=ctx.endpoint, model=served)
            if not stream:
                raw = await guard.run(upstream.read())
                upstream.release()
                usage = usage_from_body(raw) or Usage(0, 0)
                ctx.ttft_ms = ctx.elapsed_ms()
                await gw.record(
                    ctx, status=200, outcome="ok", usage=usage,
                    completion_text=text_from_body(raw) if settings.store_prompts else None,
                )
                ctype = upstream.headers.get("content-type", "application/json")
                return Response(raw, 200, headers=extra_headers, media_type=ctype), usage
        except BaseException:
            upstream.close()
            raise
        parser = SSEParser()
        account = StreamAccount(strip_usage_chunk=strip_usage, keep_text=settings.store_prompts)
        try:
            first, rest = await guard.run(read_first_event(upstream, parser, account))
        except BaseException:
            upstream.close()
            raise
        if account.first_error_body is not None:
            upstream.close()
            status, err_body = error_from_stream_start(account.first_error_body)
            await gw.record(ctx, status=status, outcome="backend_rejected",
                            error=err_body.decode("utf-8", "replace")[:1000])
            return Response(err_body, status, headers=extra_headers,
                            media_type="application/json"), Usage(0, 0)
        if not first:
            upstream.close()
            raise BackendError(f"backend {backend.url} sent an empty stream")
        handed_off = True  # from here the relay releases the backend when the stream ends
    finally:
        if not handed_off:
            release()

    gap = gw.metrics.token_gap_observer(model=ctx.model, priority=ctx.priority)
    charged = 0

    def on_chunk(acc: StreamAccount) -> None:
        # VTC charges output tokens as they are produced (Sheng et al., OSDI 2024)
        nonlocal charged
        gap(acc.content_chunks)
        if acc.content_chunks > charged:
            lease.charge(completion_tokens=acc.content_chunks - charged)
            charged = acc.content_chunks

    on_chunk(account)  # the first event may already carry a token

    async def on_end(outcome: str, error: str | None) -> None:
        release()
        if account.first_token_at is not None:
            ctx.ttft_ms = (account.first_token_at - ctx.started) * 1000.0
        usage = account.final_usage(ctx.est_prompt_tokens)
        lease.charge(prompt_tokens=usage.prompt_tokens,
                     completion_tokens=max(0, usage.completion_tokens - charged))
        lease.release()
        status = 200 if outcome in ("ok", "backend_error", "backend_timeout",
                                     "gateway_stopped") else 499
        try:
            await gw.record(
                ctx, status=status, outcome=outcome, usage=usage, error=error,
                completion_text="".join(account.text) if settings.store_prompts else None,
            )
        finally:
            await gw.limiter.settle(reservation, usage.total)

    hdrs = list(STREAM_HEADERS) + [
        (k.lower().encode(), v.encode()) for k, v in extra_headers.items()
    ]
    # the limits reservation is settled before the client sees the stream end, so its
    # next request finds the tokens and the concurrency slot free (settle is idempotent:
    # on_end then settles nothing more; a disconnect settles in on_end)
    return StreamRelay(
        upstream, first, rest, parser, account,
        headers=hdrs, on_chunk=on_chunk, on_end=on_end, backend_url=backend.url,
        on_finishing=lambda: gw.limiter.settle(
            reservation, account.final_usage(ctx.est_prompt_tokens).total),
    )


def _backend_status_error(status: int, raw: bytes, backend_url: str,
                          retry_after: str | None = None, *, endpoint: str = "",
                          model: str = "") -> GatewayError:
    """A non-200 answer of the backend as the client's error.

    4xx keep their status and the backend's message (a too-long prompt stays a 400 with
    code ``context_length_exceeded``, fault F8; the backend is not marked down), except
    401/403, which mean the gateway's own access to the backend is misconfigured: 502.
    429 and 503 keep their status with an integer ``Retry-After`` (the backend's, when it
    sent one; fault F7); other 5xx become 502.
    """
    message = raw.decode("utf-8", "replace")[:2000]
    param, code = None, None
    try:
        obj = orjson.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or message)
            param, code = err.get("param"), err.get("code")
        elif isinstance(obj, dict) and "detail" in obj:
            message = str(obj["detail"])
    except orjson.JSONDecodeError:
        pass
    wait_s = _retry_after_s(retry_after)
    if status == 429:
        return TooManyRequests(f"backend {backend_url} is overloaded: {message}",
                               retry_after_s=wait_s or 1, code="backend_rate_limited")
    if status == 503:
        return ServiceUnavailable(f"backend {backend_url} is busy: {message}",
                                  retry_after_s=wait_s or 2)
    if status in (401, 403, 407):
        return BackendError(f"backend {backend_url} refused the gateway ({status}): {message}")
    if 400 <= status < 500:
        exc: GatewayError
        if status == 400 and "context length" in message.lower():
            exc = ContextLengthExceeded(message)
        else:
            if status in (404, 405) and message.strip().lower() in ("not found",
                                                                    "method not allowed"):
                message = (f"the backend serving {model!r} does not offer /v1/{endpoint} "
                           f"(it answered {status} {message.strip()})")
            exc = GatewayError(message, param=param if isinstance(param, str) else None,
                               status=status,
                               code=code if isinstance(code, str) else "invalid_request")
            # vLLM names its errors after exceptions ("BadRequestError"); clients expect
            # OpenAI's types
            exc.type = "invalid_request_error"
        exc.outcome = "backend_rejected"
        return exc
    return BackendError(f"backend {backend_url} answered {status}: {message}")


def _retry_after_s(value: str | None) -> int | None:
    """An integer ``Retry-After`` in seconds, or None (absent, or an HTTP date)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())
