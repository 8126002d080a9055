"""ASGI middleware: every response carries ``X-Request-Id``.

A client-sent ``X-Request-Id`` made of at most 64 letters, digits, ``-``, ``_`` or ``.`` is
kept (so a client can correlate); otherwise a new ``req_`` id is made.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

_OK = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id" and _OK.match(v):
                rid = v.decode()
                break
        if rid is None:
            rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
