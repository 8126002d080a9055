"""Stored Responses API objects: retrieve, cancel, delete and input items, for the user whose
key created them only (anyone else gets 404, as for an unknown id; so does a key of that
user limited to other models than the response's, ``keys --models``).

``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` go to the backend that
holds the response (vLLM keeps it in the engine's memory); ``DELETE`` and
``GET .../input_items`` are answered from the gateway's own record, since vLLM 0.32 serves
neither. Every request is authenticated and audited (endpoints ``responses.retrieve``,
``responses.cancel``, ``responses.delete``, ``responses.input_items``; not counted as
usage). See :mod:`teamgpu.store.responses` and docs/gateway.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from teamgpu.api.errors import error_response, json_response
from teamgpu.auth.keys import Principal
from teamgpu.errors import BadRequest, GatewayError, NotFound, ServiceUnavailable
from teamgpu.store.responses import ResponseRecord
from teamgpu.upstream.backend_errors import error_from_backend

if TYPE_CHECKING:
    from teamgpu.gateway import Gateway

__all__ = ["ROUTES"]

Answer = Callable[["Gateway", Principal, ResponseRecord, Request], Awaitable[Response]]


def _gw(request: Request) -> Gateway:
    return request.app.state.gw  # type: ignore[no-any-return]


async def _owned(request: Request, endpoint: str, answer: Answer) -> Response:
    """Authenticate, find the response for this key's user (404 otherwise), answer, and
    write the request's one audit row."""
    gw = _gw(request)
    ctx = gw.pipeline.new_ctx(request, endpoint)
    rid = request.path_params["response_id"]
    try:
        ctx.principal = p = await gw.auth.authenticate(request)
        rec = await _record(gw, rid)
        if rec is None or rec.deleted_at is not None or rec.user != p.user \
                or not _may_use(gw, p, rec.model):
            raise NotFound(f"Response with id {rid!r} not found.", param="response_id",
                           code="response_not_found")
        ctx.model, ctx.model_served, ctx.backend = rec.model, True, rec.backend
        response = await answer(gw, p, rec, request)
    except GatewayError as exc:
        await gw.recorder.record(ctx, status=exc.status, outcome=exc.outcome, error=exc.message)
        return error_response(exc)
    await gw.recorder.record(ctx, status=response.status_code, outcome="ok")
    return response


def _may_use(gw: Gateway, p: Principal, model: str) -> bool:
    """Whether the key may use ``model`` (a served name): a key limited to other models
    sees its user's responses of this one as unknown ids, as it sees the model itself."""
    allowed = gw.pipeline.models_for(p)
    return allowed is None or model in allowed or model in (p.models or ())


async def _record(gw: Gateway, rid: str) -> ResponseRecord | None:
    store = gw.responses.store
    if gw.store.url.get_backend_name() == "sqlite":
        return store.get(rid)
    return await asyncio.to_thread(store.get, rid)


async def _to_backend(gw: Gateway, rec: ResponseRecord, method: str, path: str,
                      query: str = "") -> Response:
    """Relay one request about ``rec`` to the backend that holds it."""
    backend = next((b for b in gw.pool.backends if b.url == rec.backend), None)
    if backend is None or not backend.up:
        raise ServiceUnavailable(
            f"the backend holding response {rec.id!r} is not up; try again shortly",
            retry_after_s=gw.settings.backend_down_retry_after_s, code="backend_unavailable")
    url = f"{rec.backend}{path}" + (f"?{query}" if query else "")
    status, body = await gw.client.request_bytes(method, url, gw.settings.connect_timeout_s * 6)
    if status == 404:
        # the engine forgot it: it restarted since (vLLM keeps responses in memory)
        raise NotFound(f"Response with id {rec.id!r} not found (the engine that held it "
                       "restarted).", param="response_id", code="response_not_found")
    if status != 200:
        raise error_from_backend(status, body, rec.backend, path=path, model=rec.model)
    return Response(body, 200, media_type="application/json")


async def retrieve(request: Request) -> Response:
    """``GET /v1/responses/{response_id}``: the stored response (not streamed).

    404 for an unknown id, or one another user created; 503 while its backend is down.
    """
    if request.query_params.get("stream", "false").lower() == "true":
        async def refuse(*_: Any) -> Response:
            raise BadRequest("streaming a stored response again (stream=true) is not "
                             "supported by this gateway", param="stream")
        return await _owned(request, "responses.retrieve", refuse)

    async def answer(gw: Gateway, p: Principal, rec: ResponseRecord, r: Request) -> Response:
        return await _to_backend(gw, rec, "GET", f"/v1/responses/{rec.id}")

    return await _owned(request, "responses.retrieve", answer)


async def cancel(request: Request) -> Response:
    """``POST /v1/responses/{response_id}/cancel`` (a background response)."""

    async def answer(gw: Gateway, p: Principal, rec: ResponseRecord, r: Request) -> Response:
        return await _to_backend(gw, rec, "POST", f"/v1/responses/{rec.id}/cancel")

    return await _owned(request, "responses.cancel", answer)


async def delete(request: Request) -> Response:
    """``DELETE /v1/responses/{response_id}``: forgotten by the gateway at once (and by
    the engine when it restarts)."""

    async def answer(gw: Gateway, p: Principal, rec: ResponseRecord, r: Request) -> Response:
        if gw.store.url.get_backend_name() == "sqlite":
            gw.responses.store.delete(rec.id)
        else:
            await asyncio.to_thread(gw.responses.store.delete, rec.id)
        return json_response({"id": rec.id, "object": "response", "deleted": True})

    return await _owned(request, "responses.delete", answer)


async def input_items(request: Request) -> Response:
    """``GET /v1/responses/{response_id}/input_items``: OpenAI's list shape, with
    ``limit`` (1-100, default 20), ``order`` (``desc`` default, or ``asc``) and ``after``.
    """

    async def answer(gw: Gateway, p: Principal, rec: ResponseRecord, r: Request) -> Response:
        q = r.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise BadRequest("'limit' must be an integer from 1 to 100", param="limit")
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise BadRequest("'order' must be 'asc' or 'desc'", param="order")
        items = list(rec.input_items) if order == "asc" else list(reversed(rec.input_items))
        after = q.get("after")
        if after:
            ids = [i.get("id") for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return json_response({
            "object": "list", "data": page,
            "first_id": page[0].get("id") if page else None,
            "last_id": page[-1].get("id") if page else None,
            "has_more": len(items) > limit})

    return await _owned(request, "responses.input_items", answer)


ROUTES = [
    ("/v1/responses/{response_id}", retrieve, ["GET"]),
    ("/v1/responses/{response_id}", delete, ["DELETE"]),
    ("/v1/responses/{response_id}/cancel", cancel, ["POST"]),
    ("/v1/responses/{response_id}/input_items", input_items, ["GET"]),
]
