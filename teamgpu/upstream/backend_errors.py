"""A backend's non-200 answer as the error the client sees (OpenAI's types and codes)."""

from __future__ import annotations

import orjson

from teamgpu.errors import (
    BackendError,
    ContextLengthExceeded,
    GatewayError,
    ServiceUnavailable,
    TooManyRequests,
)

__all__ = ["error_from_backend", "retry_after_header_s"]


def error_from_backend(status: int, raw: bytes, backend_url: str,
                          retry_after: str | None = None, *, path: str = "",
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
    wait_s = retry_after_header_s(retry_after)
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
                message = (f"the backend serving {model!r} does not offer {path} "
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


def retry_after_header_s(value: str | None) -> int | None:
    """An integer ``Retry-After`` in seconds, or None (absent, or an HTTP date)."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value.strip())
