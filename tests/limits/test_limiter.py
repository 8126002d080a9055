"""One suite, run against both limiters (in process and real Redis): every limit at its
exact boundary, Retry-After against a controllable clock, settle, disconnects,
concurrency (F6 and 50 requests at once) and the headers (F7)."""

from __future__ import annotations

import asyncio

import pytest

from teamgpu.limits import KeyLimits, Limiter, RateLimited, RequestTooLarge, Reservation

from .conftest import MIDNIGHT, T0


async def refused(
    lim: Limiter, limits: KeyLimits, est: int, now: float, key: str = "k"
) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await lim.reserve(key, limits, est, now=now)
    return info.value


# --- requests per minute ----------------------------------------------------------------


async def test_rpm_admits_exactly_n_then_refuses_with_exact_retry_after(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=5)
    for i in range(5):
        await limiter.reserve("k", limits, 0, now=T0 + i)
    exc = await refused(limiter, limits, 0, T0 + 10.5)
    assert exc.limit == "requests"
    # the oldest admission (T0) leaves the window at T0 + 60: 49.5 s, rounded up
    assert exc.retry_after_s == 50
    assert exc.headers["Retry-After"] == "50"
    assert "Limit 5, Used 5" in exc.message
    # one second before the Retry-After is still too early, the Retry-After is right
    await refused(limiter, limits, 0, T0 + 10.5 + 49)
    await limiter.reserve("k", limits, 0, now=T0 + 10.5 + 50)


async def test_rpm_window_is_exactly_60_seconds(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=1)
    await limiter.reserve("k", limits, 0, now=T0)
    exc = await refused(limiter, limits, 0, T0 + 59.999)
    assert exc.retry_after_s == 1
    await limiter.reserve("k", limits, 0, now=T0 + 60)


async def test_refused_request_takes_nothing(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=10, tpm=100)
    await limiter.reserve("k", limits, 100, now=T0)
    exc = await refused(limiter, limits, 1, T0 + 1)
    assert exc.limit == "tokens"
    status = await limiter.status("k", limits, now=T0 + 2)
    assert status.remaining_requests == 9  # the refused request was not counted
    assert status.remaining_tokens == 0


# --- tokens per minute ------------------------------------------------------------------


async def test_tpm_boundary_and_retry_after_from_leaving_entries(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=100)
    await limiter.reserve("k", limits, 60, now=T0)
    await limiter.reserve("k", limits, 40, now=T0 + 5)  # exactly 100: admitted
    exc = await refused(limiter, limits, 1, T0 + 10)
    assert exc.limit == "tokens"
    assert exc.retry_after_s == 50  # the 60-token entry leaves at T0 + 60
    assert "Limit 100, Used 100, Requested 1" in exc.message
    # 70 tokens need both entries gone: the second leaves at T0 + 65
    assert (await refused(limiter, limits, 70, T0 + 10)).retry_after_s == 55
    await refused(limiter, limits, 70, T0 + 64)
    await limiter.reserve("k", limits, 70, now=T0 + 65)


async def test_estimate_equal_to_tpm_is_admitted_on_an_empty_window(limiter: Limiter) -> None:
    await limiter.reserve("k", KeyLimits(tpm=100), 100, now=T0)


async def test_estimate_above_tpm_is_a_400_and_takes_nothing(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=5, tpm=100)
    with pytest.raises(RequestTooLarge) as info:
        await limiter.reserve("k", limits, 101, now=T0)
    assert info.value.status == 400
    assert info.value.limit == "tokens"
    status = await limiter.status("k", limits, now=T0)
    assert (status.remaining_requests, status.remaining_tokens) == (5, 100)


async def test_negative_estimate_is_a_server_bug(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="est_tokens must be >= 0"):
        await limiter.reserve("k", KeyLimits(), -1, now=T0)


async def test_longest_wait_is_the_binding_limit(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=2, tpm=100)
    await limiter.reserve("k", limits, 90, now=T0)  # tokens free at T0 + 60
    await limiter.reserve("k", limits, 0, now=T0 + 20)  # requests free at T0 + 60 (oldest)
    exc = await refused(limiter, limits, 20, T0 + 30)
    assert exc.retry_after_s == 30
    assert exc.limit == "requests"  # tie: requests first
    limits2 = KeyLimits(rpm=2, tpm=100)
    await limiter.reserve("k2", limits2, 0, now=T0)
    await limiter.reserve("k2", limits2, 90, now=T0 + 20)
    exc = await refused(limiter, limits2, 20, T0 + 30, key="k2")
    assert (exc.limit, exc.retry_after_s) == ("tokens", 50)


# --- settle -----------------------------------------------------------------------------


async def test_settle_smaller_refunds_the_unused_estimate(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=100, daily_tokens=1000)
    res, status = await limiter.reserve("k", limits, 80, now=T0)
    assert status.remaining_tokens == 20
    await limiter.settle(res, 30, now=T0 + 2)
    status = await limiter.status("k", limits, now=T0 + 3)
    assert status.remaining_tokens == 70
    assert status.remaining_daily_tokens == 970
    await limiter.reserve("k", limits, 70, now=T0 + 3)
    await refused(limiter, limits, 1, T0 + 4)


async def test_settle_larger_records_the_actual_count(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=100, daily_tokens=1000)
    res, _ = await limiter.reserve("k", limits, 20, now=T0)
    await limiter.settle(res, 90, now=T0 + 1)  # the 70 beyond the estimate are charged at T0+1
    status = await limiter.status("k", limits, now=T0 + 2)
    assert status.remaining_tokens == 10
    assert status.remaining_daily_tokens == 910
    exc = await refused(limiter, limits, 20, T0 + 2)
    assert exc.retry_after_s == 58  # the 20 at T0 leave at T0 + 60: 20 + 70 + 20 - 100 <= 20
    exc = await refused(limiter, limits, 40, T0 + 2)
    assert exc.retry_after_s == 59  # needs the 70 at T0 + 1 gone too


async def test_settle_after_the_window_moved_on_still_charges_the_excess(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=100)
    res, _ = await limiter.reserve("k", limits, 50, now=T0)
    await limiter.settle(res, 80, now=T0 + 90)  # a long request: its reservation left the window
    status = await limiter.status("k", limits, now=T0 + 90)
    assert status.remaining_tokens == 70  # the 30 beyond the estimate count from T0 + 90


async def test_disconnect_settles_to_the_tokens_produced(limiter: Limiter) -> None:
    """F4/F6: a streaming client left after 5 completion tokens of max_tokens 80."""
    limits = KeyLimits(tpm=100, max_concurrent=1)
    res, _ = await limiter.reserve("k", limits, 20 + 80, now=T0)
    await refused(limiter, limits, 0, T0 + 1)  # slot and tokens held while streaming
    await limiter.settle(res, 20 + 5, now=T0 + 1.5)
    status = await limiter.status("k", limits, now=T0 + 2)
    assert status.remaining_tokens == 75
    assert status.in_flight == 0
    await limiter.reserve("k", limits, 75, now=T0 + 2)


async def test_non_streaming_and_streaming_settle_the_same_way(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=1000)
    a, _ = await limiter.reserve("k", limits, 300, now=T0)  # non-streaming: usage in the body
    b, _ = await limiter.reserve("k", limits, 300, now=T0)  # streaming: usage from the last chunk
    await limiter.settle(a, 123, now=T0 + 1)
    await limiter.settle(b, 123, now=T0 + 1)
    assert (await limiter.status("k", limits, now=T0 + 1)).remaining_tokens == 1000 - 246


async def test_settle_is_idempotent(limiter: Limiter) -> None:
    limits = KeyLimits(tpm=100, max_concurrent=2)
    a, _ = await limiter.reserve("k", limits, 50, now=T0)
    await limiter.reserve("k", limits, 10, now=T0)
    await asyncio.gather(limiter.settle(a, 20, now=T0 + 1), limiter.settle(a, 5, now=T0 + 1))
    await limiter.settle(a, 99, now=T0 + 1)
    status = await limiter.status("k", limits, now=T0 + 1)
    assert status.remaining_tokens == 70  # only the first settle counted
    assert status.in_flight == 1  # the slot was freed once, not twice
    await limiter.reserve("k", limits, 0, now=T0 + 2)
    assert (await refused(limiter, limits, 0, T0 + 2)).limit == "concurrent"


# --- concurrency ------------------------------------------------------------------------


async def test_concurrency_limit(limiter: Limiter) -> None:
    limits = KeyLimits(max_concurrent=2)
    a, _ = await limiter.reserve("k", limits, 0, now=T0)
    await limiter.reserve("k", limits, 0, now=T0)
    exc = await refused(limiter, limits, 0, T0)
    assert exc.limit == "concurrent"
    assert exc.retry_after_s == 1  # a slot frees when a request ends: unknown, retry soon
    await limiter.settle(a, 0, now=T0 + 0.5)
    await limiter.reserve("k", limits, 0, now=T0 + 0.5)


# --- daily quota ------------------------------------------------------------------------


async def test_daily_quota_rolls_over_at_utc_midnight(limiter: Limiter) -> None:
    limits = KeyLimits(daily_tokens=1000)
    a, _ = await limiter.reserve("k", limits, 600, now=MIDNIGHT - 3600)
    await limiter.settle(a, 600, now=MIDNIGHT - 3500)
    await limiter.reserve("k", limits, 400, now=MIDNIGHT - 30)  # exactly the quota
    exc = await refused(limiter, limits, 1, MIDNIGHT - 29.5)
    assert exc.limit == "daily_tokens"
    assert exc.retry_after_s == 30  # 29.5 s to 00:00 UTC, rounded up
    assert "resets at 00:00 UTC" in exc.message
    await refused(limiter, limits, 1, MIDNIGHT - 0.001)
    _, status = await limiter.reserve("k", limits, 1000, now=MIDNIGHT)
    assert status.remaining_daily_tokens == 0
    assert status.reset_daily_tokens_s == 86400.0


async def test_daily_refund_of_yesterday_does_not_touch_today(limiter: Limiter) -> None:
    limits = KeyLimits(daily_tokens=1000)
    res, _ = await limiter.reserve("k", limits, 500, now=MIDNIGHT - 10)
    await limiter.reserve("k", limits, 300, now=MIDNIGHT + 1)
    await limiter.settle(res, 100, now=MIDNIGHT + 2)  # refund belongs to yesterday
    status = await limiter.status("k", limits, now=MIDNIGHT + 3)
    assert status.remaining_daily_tokens == 700


async def test_daily_estimate_above_quota_is_a_400(limiter: Limiter) -> None:
    with pytest.raises(RequestTooLarge) as info:
        await limiter.reserve("k", KeyLimits(daily_tokens=100), 101, now=T0)
    assert info.value.limit == "daily_tokens"


# --- many at once -----------------------------------------------------------------------


async def _fire(
    lim: Limiter, limits: KeyLimits, est: int, n: int, now: float | None
) -> tuple[list[Reservation], list[BaseException]]:
    results = await asyncio.gather(
        *(lim.reserve("k", limits, est, now=now) for _ in range(n)), return_exceptions=True
    )
    ok = [r[0] for r in results if isinstance(r, tuple)]
    errors = [r for r in results if isinstance(r, BaseException)]
    return ok, errors


@pytest.mark.parametrize(
    ("limits", "est", "admitted", "limit"),
    [
        (KeyLimits(rpm=10), 0, 10, "requests"),
        (KeyLimits(tpm=1000), 30, 33, "tokens"),
        (KeyLimits(max_concurrent=7), 5, 7, "concurrent"),
        (KeyLimits(daily_tokens=500), 40, 12, "daily_tokens"),
        (KeyLimits(rpm=20, tpm=300, max_concurrent=15), 25, 12, "tokens"),
    ],
)
async def test_fifty_at_once_admit_exactly_the_limit(
    limiter: Limiter, limits: KeyLimits, est: int, admitted: int, limit: str
) -> None:
    ok, errors = await _fire(limiter, limits, est, 50, T0)
    assert len(ok) == admitted
    assert len(errors) == 50 - admitted
    assert all(isinstance(e, RateLimited) and e.limit == limit for e in errors)


async def test_fifty_at_once_on_the_limiters_own_clock(limiter: Limiter) -> None:
    ok, errors = await _fire(limiter, KeyLimits(rpm=17, tpm=10_000), 100, 50, None)
    assert len(ok) == 17
    assert all(isinstance(e, RateLimited) and e.limit == "requests" for e in errors)


async def test_f6_five_concurrent_requests_against_100_tokens_per_minute(limiter: Limiter) -> None:
    """F6: five concurrent chats, each able to use 100 tokens (prompt 30 + max_tokens 70),
    on a 100-token/min key: one is admitted, four get 429; a sixth after settling to its
    real use fits only in what is left."""
    limits = KeyLimits(tpm=100)
    ok, errors = await _fire(limiter, limits, 30 + 70, 5, T0)
    assert len(ok) == 1
    assert len(errors) == 4
    assert all(isinstance(e, RateLimited) and e.status == 429 for e in errors)
    assert all(e.retry_after_s == 60 for e in errors if isinstance(e, RateLimited))
    await limiter.settle(ok[0], 30 + 12, now=T0 + 3)
    await limiter.reserve("k", limits, 58, now=T0 + 4)
    await refused(limiter, limits, 1, T0 + 4)


async def test_f6_estimates_above_the_limit_are_never_admitted(limiter: Limiter) -> None:
    ok, errors = await _fire(limiter, KeyLimits(tpm=100), 30 + 120, 5, T0)
    assert ok == []
    assert all(isinstance(e, RequestTooLarge) for e in errors)


# --- headers (F7) -----------------------------------------------------------------------


async def test_status_headers_on_admission_and_refusal(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=3, tpm=100)
    _, status = await limiter.reserve("k", limits, 40, now=T0)
    assert status.headers() == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "60",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    await limiter.reserve("k", limits, 40, now=T0 + 10)
    exc = await refused(limiter, limits, 40, T0 + 20.25)
    assert exc.headers == {
        "Retry-After": "40",  # 39.75 s until the T0 entry leaves
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "49.75s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "49.75s",
    }


async def test_unlimited_key_is_never_refused_and_has_no_headers(limiter: Limiter) -> None:
    for _ in range(200):
        res, status = await limiter.reserve("k", KeyLimits(), 10_000, now=T0)
        assert status.headers() == {}
        await limiter.settle(res, 20_000, now=T0)


async def test_keys_are_independent(limiter: Limiter) -> None:
    limits = KeyLimits(rpm=1)
    await limiter.reserve("alice", limits, 0, now=T0)
    await limiter.reserve("bob", limits, 0, now=T0)
    await refused(limiter, limits, 0, T0, key="alice")
