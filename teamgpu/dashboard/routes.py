"""The admin web dashboard at ``/dashboard``.

Sign-in: an admin pastes an admin key into the form; the gateway checks it and starts a
session (see :mod:`teamgpu.dashboard.sessions`). The browser gets only the session id,
in a cookie that is ``HttpOnly``, ``SameSite=Strict``, limited to ``/dashboard``, and
``Secure`` when the request came over HTTPS (directly or as told by
``X-Forwarded-Proto: https`` from a TLS proxy). Every request re-checks that the key is
still active and still an admin key: revoking it ends its sessions at once.

State-changing requests (sign-out, revoking a key) must carry the session's CSRF token
(form field ``csrf`` or header ``X-CSRF-Token``); without it they get 403.

The page is static HTML plus ``dashboard.js``, which polls ``/dashboard/api/stats`` (the
same :func:`~teamgpu.api.observability.stats_snapshot` as ``/stats``) every 2 s and draws
charts with Chart.js, vendored under ``static/`` (no internet needed). A Content Security
Policy allows only the gateway's own scripts, styles and connections.

Routes (``ROUTES``, plus the static files from :func:`mounts`)::

    GET  /dashboard                        the page (303 to the sign-in page without a session)
    GET  /dashboard/login                  sign-in form
    POST /dashboard/login                  form field "key": 303 to /dashboard, or the form
                                           again with 401 (invalid key) / 403 (not admin)
    POST /dashboard/logout                 form field "csrf": ends the session, 303
    GET  /dashboard/api/stats              stats_snapshot (401 without a live session)
    GET  /dashboard/api/keys               every key, without secrets
    POST /dashboard/api/keys/{key_id}/revoke   header X-CSRF-Token: revoke one key
    GET  /dashboard/static/...             dashboard.js, dashboard.css, chart.umd.min.js
"""

from __future__ import annotations

import html
import secrets
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from teamgpu import __version__
from teamgpu.api.errors import error_response, json_response
from teamgpu.api.observability import stats_snapshot
from teamgpu.auth.keys import KeyError_, Principal
from teamgpu.dashboard.sessions import Session, SessionStore
from teamgpu.errors import (
    AuthenticationError,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    from teamgpu.gateway import Gateway

__all__ = ["COOKIE", "ROUTES", "mounts", "session_store", "starlette_routes"]

COOKIE = "teamgpu_session"
COOKIE_PATH = "/dashboard"
MAX_FORM_BYTES = 4096
STATIC_DIR = Path(__file__).parent / "static"

#: Only the gateway's own files; no inline script or style; never framed.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class KeyNotActive(GatewayError):
    """The key to revoke is already revoked or expired (409)."""

    status = 409
    type = "invalid_request_error"
    code = "key_not_active"
    outcome = "bad_request"


# ---------------------------------------------------------------------- helpers


def _gw(request: Request) -> Gateway:
    return request.app.state.gw  # type: ignore[no-any-return]


def session_store(request: Request) -> SessionStore:
    """The app's dashboard sessions (created with the first sign-in)."""
    store = getattr(request.app.state, "dashboard_sessions", None)
    if store is None:
        store = SessionStore()
        request.app.state.dashboard_sessions = store
    return store


def _is_https(request: Request) -> bool:
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or proto == "https"


def _admin_key(gw: Gateway, key_id: str) -> Principal | None:
    """The key if it is still active and an admin key, else None."""
    try:
        p = gw.keys.get(key_id)
    except KeyError_:
        return None
    if not p.is_admin or p.status(datetime.now(UTC)) != "active":
        return None
    return p


def _session(request: Request) -> Session | None:
    """The request's live session whose key is still an active admin key, or None.

    A session whose key was revoked, expired or lost its admin role is ended here.
    """
    store = session_store(request)
    s = store.get(request.cookies.get(COOKIE), time.monotonic())
    if s is None:
        return None
    if _admin_key(_gw(request), s.key_id) is None:
        store.delete_key(s.key_id)
        return None
    return s


def _require_session(request: Request) -> Session:
    """Raises AuthenticationError (401) without a live session."""
    s = _session(request)
    if s is None:
        raise AuthenticationError("dashboard session missing, expired or ended; sign in again",
                                  code="session_required")
    return s


def _check_csrf(session: Session, token: str | None) -> None:
    """Raises PermissionDenied (403) unless ``token`` is the session's CSRF token."""
    if not token or not secrets.compare_digest(token.encode(), session.csrf.encode()):
        raise PermissionDenied("missing or wrong CSRF token; reload the page",
                               code="csrf_failed")


def _template(name: str, **values: str) -> str:
    text = resources.files("teamgpu.dashboard").joinpath("templates", name).read_text("utf-8")
    return Template(text).substitute({k: html.escape(v, quote=True) for k, v in values.items()})


def _page(body: str, status: int = 200) -> Response:
    return Response(body, status, headers=PAGE_HEADERS, media_type="text/html; charset=utf-8")


async def _read_form(request: Request) -> dict[str, str]:
    """A small ``application/x-www-form-urlencoded`` body.

    Raises:
        UnsupportedMediaType: 415, another content type.
        PayloadTooLarge: 413, over 4 KiB.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("send the form as application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"form body over {MAX_FORM_BYTES} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _login_page(error: str = "", status: int = 200) -> Response:
    return _page(_template("login.html", error=error, version=__version__), status)


# ---------------------------------------------------------------------- routes


async def page(request: Request) -> Response:
    """``GET /dashboard``: the dashboard, or 303 to the sign-in page."""
    s = _session(request)
    if s is None:
        return RedirectResponse("/dashboard/login", 303, headers={"cache-control": "no-store"})
    return _page(_template("dashboard.html", csrf=s.csrf, user=s.user, key_id=s.key_id,
                           version=__version__))


async def login_form(request: Request) -> Response:
    """``GET /dashboard/login``: the sign-in form."""
    if _session(request) is not None:
        return RedirectResponse("/dashboard", 303, headers={"cache-control": "no-store"})
    expired = request.query_params.get("expired")
    return _login_page("Your session ended; sign in again." if expired else "")


async def login(request: Request) -> Response:
    """``POST /dashboard/login`` with form field ``key``: sign in with an admin key.

    303 to ``/dashboard`` with the session cookie; the form again with 401 for a missing,
    unknown, expired or revoked key and 403 for a key that is not an admin key. Sign-ins
    go through the same per-address failed-authentication throttle as the API
    (:meth:`Authenticator.verify_secret`): a key that was never issued counts as a failure, and
    an address over the limit gets the form with 429 and ``Retry-After`` before its key is
    even looked at (docs/limits.md).
    """
    gw = _gw(request)
    try:
        form = await _read_form(request)
    except GatewayError as exc:
        return _login_page(exc.message, exc.status)
    try:
        p = await gw.auth.verify_secret(form.get("key", "").strip() or None,
                                        gw.auth.client_addr(request) or "unknown")
    except GatewayError as exc:  # 401 not a valid key; 429 the address is throttled
        r = _login_page("That key is not valid (unknown, expired or revoked)."
                        if exc.status == 401 else exc.message, exc.status)
        r.headers.update(exc.headers)
        return r
    if not p.is_admin:
        return _login_page("That key is not an admin key.", 403)
    s = session_store(request).create(p.key_id, p.user, time.monotonic())
    r = RedirectResponse("/dashboard", 303, headers={"cache-control": "no-store"})
    r.set_cookie(COOKIE, s.sid, max_age=int(session_store(request).ttl_s), path=COOKIE_PATH,
                 secure=_is_https(request), httponly=True, samesite="strict")
    return r


async def logout(request: Request) -> Response:
    """``POST /dashboard/logout`` with form field ``csrf``: end the session, 303 to the
    sign-in page (403 with a wrong CSRF token)."""
    s = _session(request)
    if s is not None:
        try:
            form = await _read_form(request)
            _check_csrf(s, form.get("csrf"))
        except GatewayError as exc:
            return error_response(exc)
        session_store(request).delete(s.sid)
    r = RedirectResponse("/dashboard/login", 303, headers={"cache-control": "no-store"})
    r.delete_cookie(COOKIE, path=COOKIE_PATH, secure=_is_https(request), httponly=True,
                    samesite="strict")
    return r


async def api_stats(request: Request) -> Response:
    """``GET /dashboard/api/stats``: the ``/stats`` snapshot, plus ``session``
    (``{"user", "key_id"}``). 401 without a live session."""
    try:
        s = _require_session(request)
    except GatewayError as exc:
        return error_response(exc)
    snap = await stats_snapshot(_gw(request))
    snap["session"] = {"user": s.user, "key_id": s.key_id}
    return json_response(snap, headers={"cache-control": "no-store"})


async def api_keys(request: Request) -> Response:
    """``GET /dashboard/api/keys``: ``{"keys": [...]}``, every key without its secret,
    with its ``status`` (active, expired, revoked). 401 without a live session."""
    try:
        _require_session(request)
    except GatewayError as exc:
        return error_response(exc)
    now = datetime.now(UTC)
    keys = [_key_json(k, now) for k in _gw(request).keys.list()]
    return json_response({"keys": keys}, headers={"cache-control": "no-store"})


async def api_revoke(request: Request) -> Response:
    """``POST /dashboard/api/keys/{key_id}/revoke`` with header ``X-CSRF-Token``.

    Revokes exactly that key, at once (a request with it then gets 401). Answers the
    key's JSON; 401 without a session, 403 with a wrong CSRF token, 404 for an unknown
    key, 409 for a key that is already revoked or expired.
    """
    try:
        s = _require_session(request)
        _check_csrf(s, request.headers.get("x-csrf-token"))
        key_id = request.path_params["key_id"]
        ks = _gw(request).keys
        now = datetime.now(UTC)
        try:
            key = ks.get(key_id)
        except KeyError_:
            raise NotFound(f"no key with id {key_id!r}", code="key_not_found") from None
        if key.status(now) != "active":
            raise KeyNotActive(f"key {key_id} is already {key.status(now)}")
        try:
            # revoke() takes an id or a user name: make sure this id names only this key
            # (a user could be called like a key id) before revoking by it
            if any(k.key_id != key_id for k in ks.resolve(key_id)):
                raise KeyNotActive(f"{key_id!r} is also a user name; revoke it with "
                                   f"'teamgpu keys revoke'")
            revoked = [k for k in ks.revoke(key_id) if k.key_id == key_id]
        except KeyError_ as exc:
            raise KeyNotActive(str(exc)) from None
        session_store(request).delete_key(key_id)
    except GatewayError as exc:
        return error_response(exc)
    return json_response({"revoked": _key_json(revoked[0], datetime.now(UTC))})


def _key_json(k: Principal, now: datetime) -> dict[str, Any]:
    return {
        "id": k.key_id,
        "user": k.user,
        "prefix": k.prefix,
        "is_admin": k.is_admin,
        "status": k.status(now),
        "created_at": k.created_at.isoformat(),
        "expires_at": k.expires_at.isoformat() if k.expires_at else None,
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        "max_priority": k.max_priority.label,
        "default_priority": k.default_priority.label,
        "weight": k.weight,
        "models": list(k.models) if k.models is not None else None,  # None: every model
    }


def mounts() -> list[Mount]:
    """The static files (script, style, vendored Chart.js) under ``/dashboard/static``."""
    return [Mount("/dashboard/static", app=StaticFiles(directory=STATIC_DIR),
                  name="dashboard-static")]


ROUTES = [
    ("/dashboard", page, ["GET"]),
    ("/dashboard/login", login_form, ["GET"]),
    ("/dashboard/login", login, ["POST"]),
    ("/dashboard/logout", logout, ["POST"]),
    ("/dashboard/api/stats", api_stats, ["GET"]),
    ("/dashboard/api/keys", api_keys, ["GET"]),
    ("/dashboard/api/keys/{key_id}/revoke", api_revoke, ["POST"]),
]


def starlette_routes() -> list[BaseRoute]:
    """``ROUTES`` as Starlette routes plus :func:`mounts`, for ``Starlette(routes=...)``."""
    return [*(Route(path, fn, methods=methods) for path, fn, methods in ROUTES), *mounts()]
