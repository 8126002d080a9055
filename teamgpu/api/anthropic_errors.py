"""Anthropic's error shape, ``{"type": "error", "error": {"type": ..., "message": ...}}``,
and which paths answer in it: ``/v1/messages`` and everything under it (the Messages API
and its ``count_tokens``; a wrong method or an Anthropic endpoint the gateway does not
serve, such as ``/v1/messages/batches``, answers in Anthropic's shape too, so that
Anthropic's clients can read every error there). Types by status follow Anthropic's
errors reference; the table is in :mod:`teamgpu.api.adapters.anthropic`.
"""

from __future__ import annotations

import orjson

__all__ = ["ANTHROPIC_PATH", "anthropic_error_body", "anthropic_error_type",
           "is_anthropic_path"]

ANTHROPIC_PATH = "/v1/messages"

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``api_error`` for other 5xx)."""
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str) -> bytes:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``, serialised."""
    return orjson.dumps({"type": "error",
                         "error": {"type": anthropic_error_type(status), "message": message}})


def is_anthropic_path(path: str) -> bool:
    """Whether errors on ``path`` are in Anthropic's shape."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")
