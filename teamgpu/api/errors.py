"""Rendering errors as responses: OpenAI's shape, with the request id and Retry-After;
Anthropic's shape on the paths of Anthropic's API (:mod:`teamgpu.api.anthropic_errors`),
the route-level 404 and 405 and the 500 of a server bug included."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from teamgpu.api.anthropic_errors import anthropic_error_body, is_anthropic_path
from teamgpu.api.request_id import new_request_id
from teamgpu.errors import GatewayError, error_json

log = logging.getLogger("teamgpu.errors")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """The client's view of ``exc``: its status, OpenAI's error shape, its headers."""
    h = dict(exc.headers)
    if headers:
        h.update(headers)
    return Response(
        orjson.dumps(exc.body()), exc.status, headers=h, media_type="application/json"
    )


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's shape (Anthropic's under ``/v1/messages``)."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    msg = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
    body = anthropic_error_body(exc.status_code, str(msg)) \
        if is_anthropic_path(request.url.path) \
        else error_json(str(msg), "invalid_request_error", None, code)
    return Response(body, exc.status_code, headers=dict(exc.headers or {}),
                    media_type="application/json")


async def gateway_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if is_anthropic_path(request.url.path):
        return Response(anthropic_error_body(exc.status, exc.message), exc.status,
                        headers=dict(exc.headers), media_type="application/json")
    return error_response(exc)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    """A server bug: 500 ``internal_error`` (never a 4xx), logged with its traceback.

    Starlette calls this handler outside every middleware, so the request id middleware
    cannot add ``X-Request-Id`` here; it is added from the request's state instead.
    """
    rid = (request.scope.get("state") or {}).get("request_id") or new_request_id()
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path,
                  rid, exc_info=exc)
    message = "internal gateway error; see the gateway log"
    body = anthropic_error_body(500, message) if is_anthropic_path(request.url.path) \
        else error_json(message, "server_error", None, "internal_error")
    return Response(body, 500, headers={"X-Request-Id": rid}, media_type="application/json")
