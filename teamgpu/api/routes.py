"""Routes: the OpenAI endpoints and health. ``/stats`` and ``/metrics`` live in
:mod:`teamgpu.api.observability`, the dashboard in :mod:`teamgpu.dashboard.routes`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from teamgpu.api import stored_responses
from teamgpu.api.adapters import CHAT, COMPLETIONS, EMBEDDINGS, ProtocolAdapter
from teamgpu.api.adapters.anthropic import MESSAGES
from teamgpu.api.adapters.openai import RERANK, SCORE
from teamgpu.api.adapters.tokens import COUNT_TOKENS, DETOKENIZE, TOKENIZE
from teamgpu.api.errors import error_response, json_response
from teamgpu.auth.keys import Principal
from teamgpu.errors import GatewayError, ServiceUnavailable

if TYPE_CHECKING:
    from teamgpu.gateway import Gateway
    from teamgpu.upstream.relay import StreamRelay


def _gw(request: Request) -> Gateway:
    return request.app.state.gw  # type: ignore[no-any-return]


def _proxied(adapter: ProtocolAdapter) -> Callable[[Request], Awaitable[Response | StreamRelay]]:
    """The route handler of one protocol adapter: the request goes down the pipeline."""

    async def endpoint(request: Request) -> Response | StreamRelay:
        return await _gw(request).pipeline.handle(request, adapter)

    endpoint.__name__ = adapter.endpoint.replace("/", "_")
    endpoint.__doc__ = f"``POST {adapter.path}`` through the pipeline."
    return endpoint


async def responses_create(request: Request) -> Response | StreamRelay:
    """``POST /v1/responses`` through the pipeline (the gateway's Responses adapter, which
    records who owns each stored response)."""
    gw = _gw(request)
    return await gw.pipeline.handle(request, gw.responses)


def _listing(gw: Gateway, principal: Principal) -> list[dict[str, Any]]:
    """The model cards a key may use: served names, then aliases."""
    data: list[dict[str, Any]] = []
    served = gw.pool.served_names()
    roles_of = {m.name: list(m.roles) for m in gw.settings.models}
    for name in gw.pipeline.names_for(principal):
        if name in served:
            card = dict(gw.pool.card(name))
        else:
            target = gw.pool.aliases[name]
            card = {**gw.pool.card(target), "id": name, "parent": target}
        card.setdefault("object", "model")
        card.setdefault("owned_by", "teamgpu")
        roles = roles_of.get(card.get("parent") or name) or roles_of.get(name)
        if roles:
            card["teamgpu"] = {"roles": roles}  # teamgpu connect maps client roles by it
        data.append(card)
    return data


async def _audited(request: Request, endpoint: str,
                   answer: Callable[[Gateway, Principal], Response]) -> Response:
    """Authenticate, answer, and write the request's one audit row (refusals included:
    a guessed key on ``/v1/models`` leaves a trace like one on a completion)."""
    gw = _gw(request)
    ctx = gw.pipeline.new_ctx(request, endpoint)
    try:
        ctx.principal = await gw.auth.authenticate(request)
        response = answer(gw, ctx.principal)
    except GatewayError as exc:
        await gw.recorder.record(ctx, status=exc.status, outcome=exc.outcome, error=exc.message)
        return error_response(exc)
    await gw.recorder.record(ctx, status=response.status_code, outcome="ok")
    return response


async def models(request: Request) -> Response:
    """``GET /v1/models``: exactly the names this key may use (served names, then aliases).

    401 without a valid key. One audit row (endpoint ``models``).
    """
    return await _audited(request, "models", lambda gw, p: json_response(
        {"object": "list", "data": _listing(gw, p)}))


async def model(request: Request) -> Response:
    """``GET /v1/models/{model}``: one model card, as ``/v1/models`` lists it.

    401 without a valid key; 404 ``model_not_found`` (param ``model``) for a name this
    key may not use. One audit row (endpoint ``models``).
    """
    name = request.path_params["model"]

    def answer(gw: Gateway, principal: Principal) -> Response:
        for card in _listing(gw, principal):
            if card["id"] == name:
                return json_response(card)
        raise gw.pipeline.model_not_found(name, principal)

    return await _audited(request, "models", answer)


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the gateway process is alive (200)."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """``GET /readyz``: 200 when at least one backend answers, else 503 with Retry-After."""
    gw = _gw(request)
    backends = [{"url": b.url, "up": b.up, "models": list(b.models), "error": b.last_error}
                for b in gw.pool.backends]
    if not gw.pool.any_up():
        exc = ServiceUnavailable("no backend is up",
                                 retry_after_s=gw.settings.backend_down_retry_after_s)
        body = {**exc.body(), "backends": backends}
        return json_response(body, 503, headers=exc.headers)
    return json_response({"status": "ready", "backends": backends})


ROUTES = [
    *((a.path, _proxied(a), ["POST"]) for a in (CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES,
                                                  COUNT_TOKENS, SCORE, RERANK)),
    *((path, _proxied(a), ["POST"]) for a in (TOKENIZE, DETOKENIZE)
      for path in (a.path, f"/v1{a.path}")),
    ("/v1/responses", responses_create, ["POST"]),
    *stored_responses.ROUTES,
    ("/v1/models", models, ["GET"]),
    ("/v1/models/{model:path}", model, ["GET"]),
    ("/healthz", healthz, ["GET"]),
    ("/readyz", readyz, ["GET"]),
]
