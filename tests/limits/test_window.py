"""The algorithm as a plain data structure: window boundaries, and randomized checks that
limits hold exactly (never more than the limit in any 60 s, never a needless refusal,
Retry-After exactly when admission becomes possible)."""

from __future__ import annotations

import random

from teamgpu.limits.models import DAY_US, WINDOW_US, KeyLimits
from teamgpu.limits.window import KeyState, WindowLog

T0 = 1_750_000_000_000_000  # microseconds


def test_entry_counts_until_exactly_60_s_later() -> None:
    log = WindowLog()
    log.add(T0, 5)
    log.prune(T0 + WINDOW_US - 1)
    assert log.total == 5
    log.prune(T0 + WINDOW_US)
    assert log.total == 0
    assert len(log) == 0


def test_out_of_order_insert_keeps_time_order() -> None:
    log = WindowLog()
    log.add(T0 + 10, 1)
    log.add(T0 + 30, 2)
    log.add(T0 + 20, 3)
    log.add(T0 + 5, 4)
    assert log.newest_us() == T0 + 30
    log.prune(T0 + 20 + WINDOW_US)  # drops T0+5, T0+10, T0+20
    assert log.total == 2


def test_wait_to_free() -> None:
    log = WindowLog()
    log.add(T0, 60)
    log.add(T0 + 5_000_000, 40)
    now = T0 + 10_000_000
    assert log.wait_to_free_us(now, 0) == 0
    assert log.wait_to_free_us(now, 50) == 50_000_000
    assert log.wait_to_free_us(now, 61) == 55_000_000


def test_set_amount_to_zero_removes_entry() -> None:
    log = WindowLog()
    log.add(T0, 10, "a")
    log.add(T0 + 1, 10, "b")
    assert log.set_amount("b", 0) == T0 + 1
    assert log.newest_us() == T0
    assert log.total == 10
    assert log.set_amount("missing", 3) is None


def test_day_rolls_at_utc_midnight() -> None:
    s = KeyState()
    midnight = (T0 // DAY_US + 1) * DAY_US
    s.prune(midnight - 1)
    s.admit(midnight - 1, "r", 700)
    assert s.day_used == 700
    s.prune(midnight)
    assert s.day_used == 0


def _max_in_any_window(times: list[int], amounts: list[int]) -> int:
    """Largest sum of amounts admitted within any half-open 60 s interval (brute force)."""
    best = 0
    for start in times:
        total = sum(
            a for t, a in zip(times, amounts, strict=True) if start <= t < start + WINDOW_US
        )
        best = max(best, total)
    return best


def test_randomized_rpm_and_tpm_hold_exactly() -> None:
    rng = random.Random(20250615)
    for _ in range(30):
        limits = KeyLimits(rpm=rng.randint(1, 12), tpm=rng.randint(50, 400))
        s = KeyState()
        now = T0
        req_times: list[int] = []
        tok_times: list[int] = []
        tok_amounts: list[int] = []
        for _ in range(300):
            now += rng.randint(0, 4_000_000)
            est = rng.randint(0, limits.tpm)
            s.prune(now)
            waits = s.waits(now, limits, est)
            in_window_req = sum(1 for t in req_times if t > now - WINDOW_US)
            in_window_tok = sum(
                a for t, a in zip(tok_times, tok_amounts, strict=True) if t > now - WINDOW_US
            )
            # never a needless refusal, never a wrong admission
            assert (waits.requests is None) == (in_window_req + 1 <= limits.rpm)
            assert (waits.tokens is None) == (in_window_tok + est <= limits.tpm)
            if waits.admitted:
                rid = f"r{len(req_times)}"
                s.admit(now, rid, est)
                req_times.append(now)
                tok_times.append(now)
                tok_amounts.append(est)
                s.settle(now, rid, est, est, s.day)
            else:
                # the wait is exact: one microsecond earlier still refused, then admitted
                wait = max(w for w in (waits.requests, waits.tokens) if w is not None)
                probe = KeyState()
                for t, a in zip(tok_times, tok_amounts, strict=True):
                    probe.requests.add(t, 1)
                    if a:
                        probe.tokens.add(t, a)
                probe.prune(now + wait - 1)
                assert not probe.waits(now + wait - 1, limits, est).admitted
                probe.prune(now + wait)
                assert probe.waits(now + wait, limits, est).admitted
        assert _max_in_any_window(req_times, [1] * len(req_times)) <= limits.rpm
        assert _max_in_any_window(tok_times, tok_amounts) <= limits.tpm
