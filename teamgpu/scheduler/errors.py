"""Errors of the scheduler, each a node of the gateway's tree in :mod:`teamgpu.errors`.

The one error handler of the app renders them (OpenAI's error shape, ``Retry-After``).

Tree (status the client sees, OpenAI ``code``)::

    GatewayError
    ├── BadRequest                        400
    │   └── InvalidPriority               400 invalid_priority (param "X-Priority")
    │       └── scheduler.InvalidPriority 400 (also a ValueError)
    ├── TooManyRequests                   429 (Retry-After)
    │   └── UserQueueFull                 429 user_queue_full (Retry-After)
    └── ServiceUnavailable                503 (Retry-After)
        ├── QueueFull                     503 queue_full (Retry-After)
        └── QueueTimeout                  503 queue_timeout (Retry-After)

    SchedulerError  (a mixin base of the four scheduler errors above)

    SchedulerConfigError (ValueError)     a bad FairQueueConfig or capacity; a start-up
                                          error, never rendered as a 4xx
"""

from __future__ import annotations

from teamgpu import errors as gateway_errors

__all__ = [
    "InvalidPriority",
    "QueueFull",
    "QueueTimeout",
    "SchedulerConfigError",
    "SchedulerError",
    "UserQueueFull",
]


class SchedulerError(gateway_errors.GatewayError):
    """Base of the scheduler's client-facing errors.

    Status, ``type`` and ``code`` come from the concrete class. The queue errors carry
    ``retry_after_s`` (whole seconds, >= 1), also sent as ``Retry-After``.
    """


class InvalidPriority(SchedulerError, gateway_errors.InvalidPriority, ValueError):
    """A priority name that is not high, normal, low, interactive or batch (400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="X-Priority")


class UserQueueFull(SchedulerError, gateway_errors.TooManyRequests):
    """The user already has ``max_queued_per_user`` requests waiting (429, Retry-After)."""

    code = "user_queue_full"
    outcome = "queue_full"


class QueueFull(SchedulerError, gateway_errors.ServiceUnavailable):
    """The queue already holds ``max_queued_total`` requests (503, Retry-After)."""

    code = "queue_full"
    outcome = "queue_full"


class QueueTimeout(SchedulerError, gateway_errors.ServiceUnavailable):
    """The request waited longer than its class's ``queue_timeout_s`` (503, Retry-After)."""

    code = "queue_timeout"
    outcome = "queue_timeout"


class SchedulerConfigError(ValueError):
    """An invalid scheduler setting or capacity (raised at start-up or when capacity is set)."""
