"""Rate limits and quotas per API key (RPM, TPM, concurrency, daily tokens) and the
failed-authentication throttle, in process or in Redis. See ``docs/limits.md``."""

from teamgpu.limits.auth_throttle import (
    AuthFailureThrottle,
    MemoryAuthFailureThrottle,
    RedisAuthFailureThrottle,
    client_key,
)
from teamgpu.limits.base import Limiter
from teamgpu.limits.errors import LimiterUnavailable, RateLimited, RequestTooLarge
from teamgpu.limits.factory import make_auth_failure_throttle, make_limiter
from teamgpu.limits.memory import MemoryLimiter
from teamgpu.limits.models import KeyLimits, LimitStatus, Reservation, format_duration
from teamgpu.limits.redis_backend import RedisLimiter

__all__ = [
    "AuthFailureThrottle",
    "KeyLimits",
    "LimitStatus",
    "Limiter",
    "LimiterUnavailable",
    "MemoryAuthFailureThrottle",
    "MemoryLimiter",
    "RateLimited",
    "RedisAuthFailureThrottle",
    "RedisLimiter",
    "RequestTooLarge",
    "Reservation",
    "client_key",
    "format_duration",
    "make_auth_failure_throttle",
    "make_limiter",
]
