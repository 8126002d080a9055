"""Value types, the header format, the error tree and the exported names."""

from __future__ import annotations

import pytest

import teamgpu.limits
from teamgpu.errors import BadRequest, ServiceUnavailable, TooManyRequests
from teamgpu.limits import (
    KeyLimits,
    LimiterUnavailable,
    LimitStatus,
    RateLimited,
    RequestTooLarge,
    format_duration,
)


def test_exported_members() -> None:
    assert sorted(teamgpu.limits.__all__) == [
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
    for name in teamgpu.limits.__all__:
        assert getattr(teamgpu.limits, name) is not None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-1.0, "0s"),
        (0.0, "0s"),
        (0.0001, "1ms"),
        (0.017, "17ms"),
        (0.25, "250ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (60.0, "1m0s"),
        (90.0, "1m30s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (3725.5, "1h2m5.5s"),
        (86399.0, "23h59m59s"),
    ],
)
def test_format_duration_is_openai_go_style(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_headers_both_families() -> None:
    s = LimitStatus(
        limit_requests=60,
        remaining_requests=59,
        reset_requests_s=1.0,
        limit_tokens=150_000,
        remaining_tokens=149_984,
        reset_tokens_s=360.0,
    )
    assert s.headers() == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149984",
        "x-ratelimit-reset-tokens": "6m0s",
    }


def test_headers_omit_unlimited_family_and_clamp_remaining() -> None:
    s = LimitStatus(limit_requests=0, limit_tokens=100, remaining_tokens=-20, reset_tokens_s=0.5)
    assert s.headers() == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "500ms",
    }
    assert LimitStatus().headers() == {}


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrent", "daily_tokens"])
def test_key_limits_reject_negative(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KeyLimits(**{field: -1})


def test_key_limits_reject_non_int() -> None:
    with pytest.raises(ValueError, match=r"KeyLimits\.rpm must be an int"):
        KeyLimits(rpm=True)
    with pytest.raises(ValueError, match=r"KeyLimits\.tpm must be an int"):
        KeyLimits(tpm=1.5)  # type: ignore[arg-type]


def test_rate_limited_is_a_429_with_retry_after_and_ratelimit_headers() -> None:
    status = LimitStatus(limit_requests=3, remaining_requests=0, reset_requests_s=60.0)
    exc = RateLimited("requests", 7, "slow down", limit_status=status)
    assert isinstance(exc, TooManyRequests)
    assert exc.status == 429
    assert exc.code == "rate_limit_exceeded"
    assert exc.limit == "requests"
    assert exc.retry_after_s == 7
    assert exc.headers["Retry-After"] == "7"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.body()["error"]["message"] == "slow down"


def test_request_too_large_is_a_400_naming_the_limit() -> None:
    exc = RequestTooLarge("tokens", 150, 100)
    assert isinstance(exc, BadRequest)
    assert exc.status == 400
    assert exc.code == "request_too_large"
    assert exc.param == "max_tokens"
    assert "Limit 100" in exc.message and "Requested 150" in exc.message
    assert "Retry-After" not in exc.headers


def test_limiter_unavailable_is_a_503_with_retry_after() -> None:
    exc = LimiterUnavailable("down", retry_after_s=5)
    assert isinstance(exc, ServiceUnavailable)
    assert exc.status == 503
    assert exc.headers["Retry-After"] == "5"
