"""Errors raised by the scheduler.

Each error that can reach a client carries the HTTP status it maps to, the OpenAI error
``type`` and ``code``, and (for the queue errors) a ``Retry-After`` hint in whole seconds.
The gateway's error handler renders them; nothing here imports HTTP code.

Tree::

    SchedulerError                      (base; never raised itself)
    ├── InvalidPriority (ValueError)    400  bad X-Priority value / key default
    └── QueueRejected                   (base of the "try again later" errors)
        ├── UserQueueFull               429  this user already has max_queued_per_user queued
        ├── QueueFull                   503  the whole queue holds max_queued_total requests
        └── QueueTimeout                503  waited longer than the class's queue timeout

    SchedulerConfigError (ValueError)   a bad FairQueueConfig or capacity; a start-up
                                        error, not a client error (never a 4xx)
"""

from __future__ import annotations

__all__ = [
    "InvalidPriority",
    "QueueFull",
    "QueueRejected",
    "QueueTimeout",
    "SchedulerConfigError",
    "SchedulerError",
    "UserQueueFull",
]


class SchedulerError(Exception):
    """Base of the scheduler's client-facing errors.

    Attributes:
        status_code: HTTP status the client sees.
        error_type: OpenAI error ``type``.
        code: OpenAI error ``code``.
        retry_after_s: Value for the ``Retry-After`` header in whole seconds, or None
            when retrying the same request cannot help.
    """

    status_code: int = 500
    error_type: str = "server_error"
    code: str = "scheduler_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidPriority(SchedulerError, ValueError):
    """A priority name that is not one of high, normal, low, interactive, batch (400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_priority"
    param = "X-Priority"


class QueueRejected(SchedulerError):
    """A request the queue could not take or keep; the client may retry later.

    ``retry_after_s`` is always set (at least 1).
    """

    retry_after_s: int

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=max(1, int(retry_after_s)))


class UserQueueFull(QueueRejected):
    """The user already has ``max_queued_per_user`` requests waiting (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "user_queue_full"


class QueueFull(QueueRejected):
    """The queue already holds ``max_queued_total`` requests (503)."""

    status_code = 503
    error_type = "server_error"
    code = "queue_full"


class QueueTimeout(QueueRejected):
    """The request waited longer than its class's ``queue_timeout_s`` (503)."""

    status_code = 503
    error_type = "server_error"
    code = "queue_timeout"


class SchedulerConfigError(ValueError):
    """An invalid scheduler setting or capacity (raised at start-up or when capacity is set)."""
