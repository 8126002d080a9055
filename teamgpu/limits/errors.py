"""Errors of the limits layer, each a node of the gateway's tree in :mod:`teamgpu.errors`.

Tree (status the client sees, OpenAI ``code``)::

    GatewayError
    ├── BadRequest                    400
    │   └── RequestTooLarge           400 request_too_large (param "max_tokens")
    ├── TooManyRequests               429 rate_limit_exceeded (Retry-After)
    │   └── RateLimited               429 rate_limit_exceeded (Retry-After, x-ratelimit-*)
    └── ServiceUnavailable            503 (Retry-After)
        └── LimiterUnavailable        503 rate_limiter_unavailable (Retry-After)

Redis errors are converted to :class:`LimiterUnavailable` once, in the Redis backends,
and only when they are configured to fail closed.
"""

from __future__ import annotations

from teamgpu.errors import BadRequest, ServiceUnavailable, TooManyRequests
from teamgpu.limits.models import LimitName, LimitStatus


class RateLimited(TooManyRequests):
    """A limit refused the request; the client sees 429 with ``Retry-After``.

    Attributes:
        limit: which limit refused: ``"requests"`` (RPM), ``"tokens"`` (TPM),
            ``"concurrent"``, ``"daily_tokens"`` or ``"auth_failures"``.
        retry_after_s: whole seconds (>= 1) until the request would be admitted if nothing
            else happened meanwhile; also sent as ``Retry-After``.
        message: the human-readable reason, with the limit, the use and the wait.
        limit_status: the key's standing, whose :meth:`LimitStatus.headers` are already in
            :attr:`headers` (None for the auth-failure throttle).
        headers: ``Retry-After`` plus OpenAI's ``x-ratelimit-*`` headers.
    """

    def __init__(
        self,
        limit: LimitName,
        retry_after_s: int,
        message: str,
        *,
        limit_status: LimitStatus | None = None,
    ) -> None:
        headers = limit_status.headers() if limit_status is not None else {}
        super().__init__(message, retry_after_s=retry_after_s, headers=headers)
        self.limit: LimitName = limit
        self.limit_status = limit_status


class RequestTooLarge(BadRequest):
    """The request's token estimate alone exceeds a limit, so no wait can ever admit it.

    The client sees 400 (not 429, unlike OpenAI): a 429 invites SDKs to retry, and
    retrying cannot succeed. The message says what to reduce.

    Attributes:
        limit: ``"tokens"`` (TPM) or ``"daily_tokens"``.
        requested_tokens: the estimate (prompt tokens + max_tokens).
        limit_tokens: the limit it exceeds.
    """

    code = "request_too_large"

    def __init__(self, limit: LimitName, requested_tokens: int, limit_tokens: int) -> None:
        what = "tokens per min (TPM)" if limit == "tokens" else "tokens per day (UTC)"
        message = (
            f"Request too large for this key's {what}: Limit {limit_tokens}, "
            f"Requested {requested_tokens} (prompt tokens + max_tokens). "
            "Reduce the prompt or max_tokens; waiting will not help."
        )
        super().__init__(message, param="max_tokens")
        self.limit: LimitName = limit
        self.requested_tokens = requested_tokens
        self.limit_tokens = limit_tokens


class LimiterUnavailable(ServiceUnavailable):
    """The limit state (Redis) is unreachable and the limiter is set to fail closed.

    The client sees 503 with ``Retry-After``.
    """

    code = "rate_limiter_unavailable"
