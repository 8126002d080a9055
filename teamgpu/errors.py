"""The gateway's error tree and its one rendering, OpenAI's error shape.

Every error the gateway itself produces is a :class:`GatewayError`. Each subclass carries
the HTTP status the client sees and OpenAI's error ``type`` and ``code``. One handler in
:mod:`teamgpu.app` renders them as::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Only these types map to client-visible statuses. Any other exception is a server bug and
is rendered as a 500 ``internal_error`` (never as a 4xx).

Tree::

    GatewayError                   500 internal_error (the base)
    ├── BadRequest                 400 invalid_request_error
    │   ├── InvalidJSON            400 invalid_json
    │   ├── ContextLengthExceeded  400 context_length_exceeded
    │   └── InvalidPriority        400 invalid_priority
    ├── AuthenticationError        401 invalid_api_key
    ├── PermissionDenied           403 permission_denied
    ├── NotFound                   404 not_found
    │   └── ModelNotFound          404 model_not_found (param "model")
    ├── PayloadTooLarge            413 payload_too_large
    ├── UnsupportedMediaType       415 unsupported_media_type
    ├── TooManyRequests            429 rate_limit_exceeded (Retry-After)
    ├── BackendError               502 backend_error
    │   └── BackendTimeout         504 backend_timeout
    └── ServiceUnavailable         503 service_unavailable (Retry-After)
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """Base of every error the gateway renders for a client.

    Attributes:
        status: HTTP status the client sees.
        type: OpenAI error ``type``.
        code: OpenAI error ``code`` (machine readable).
        param: the request field at fault, if any.
        headers: extra response headers (for example ``Retry-After``).
        outcome: the audit-log outcome recorded for the request.
    """

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"
    outcome: str = "gateway_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped body, ``{"error": {...}}``."""
        return error_body(self.message, self.type, self.param, self.code)


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    outcome = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class InvalidPriority(BadRequest):
    code = "invalid_priority"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    outcome = "unauthorized"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"
    outcome = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    outcome = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    outcome = "bad_request"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"
    outcome = "bad_request"


class TooManyRequests(GatewayError):
    """429: a rate limit, quota or per-user queue bound. Always carries ``Retry-After``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    outcome = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = max(1, int(retry_after_s))
        self.headers["Retry-After"] = str(self.retry_after_s)


class ServiceUnavailable(GatewayError):
    """503: no backend can take the request now. Always carries ``Retry-After``."""

    status = 503
    type = "service_unavailable_error"
    code = "service_unavailable"
    outcome = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = max(1, int(retry_after_s))
        self.headers["Retry-After"] = str(self.retry_after_s)


class BackendError(GatewayError):
    """502: the backend failed (connection refused or reset, invalid answer)."""

    status = 502
    type = "server_error"
    code = "backend_error"
    outcome = "backend_error"

    def __init__(self, message: str, *, retry_after_s: int = 2, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers["Retry-After"] = str(max(1, retry_after_s))


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"
    outcome = "backend_timeout"


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Build OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> bytes:
    """OpenAI's error shape, serialised."""
    return orjson.dumps(error_body(message, type_, param, code))
