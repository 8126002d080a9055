"""The rolling TTFT window: quantiles over 5 minutes, per-minute history, bounded memory."""

from __future__ import annotations

import math

import pytest

from teamgpu.metrics.ttft import TtftWindow, nearest_rank

T0 = 1_800_000_000.0  # a wall-clock instant, 2027-01-15 08:00 UTC (a whole minute)


def test_nearest_rank() -> None:
    assert nearest_rank([], 0.5) is None
    assert nearest_rank([1.0], 0.95) == 1.0
    values = [float(i) for i in range(1, 101)]
    assert nearest_rank(values, 0.5) == 50.0
    assert nearest_rank(values, 0.95) == 95.0
    assert nearest_rank(values, 1.0) == 100.0
    with pytest.raises(ValueError, match=r"q=1\.5: must be in \[0, 1\]"):
        nearest_rank(values, 1.5)


def test_summary_over_the_last_five_minutes() -> None:
    w = TtftWindow()
    for i in range(1, 101):  # 100 samples, 0.01 .. 1.00 s, over 100 s
        w.add(i / 100, T0 + i)
    s = w.summary(T0 + 100)
    assert (s.window_s, s.count) == (300.0, 100)
    assert s.p50_s == pytest.approx(0.50)
    assert s.p95_s == pytest.approx(0.95)


def test_old_samples_leave_the_window() -> None:
    w = TtftWindow(window_s=300)
    w.add(5.0, T0)  # a slow one, long ago
    for i in range(10):
        w.add(0.1, T0 + 200 + i)
    assert w.summary(T0 + 250).p95_s == 5.0
    later = w.summary(T0 + 301)
    assert later.count == 10 and later.p95_s == 0.1
    assert w.summary(T0 + 1000) == type(later)(300.0, 0, None, None)


def test_per_minute_history_has_one_point_per_minute_of_the_last_hour() -> None:
    w = TtftWindow()
    # minute 0: 0.1 and 0.3; minute 2: 1.0; minute 59 (current): 0.2
    w.add(0.1, T0 + 5)
    w.add(0.3, T0 + 50)
    w.add(1.0, T0 + 120 + 1)
    w.add(0.2, T0 + 59 * 60 + 30)
    pts = w.per_minute(T0 + 59 * 60 + 40)
    assert len(pts) == 60
    assert [p.t for p in pts] == [int(T0) + 60 * i for i in range(60)]
    assert (pts[0].count, pts[0].p50_s, pts[0].p95_s) == (2, 0.1, 0.3)
    assert pts[1].count == 0 and pts[1].p50_s is None
    assert (pts[2].count, pts[2].p50_s) == (1, 1.0)
    assert (pts[59].count, pts[59].p50_s) == (1, 0.2)  # the open minute is included
    # an hour later, minute 0 has scrolled out
    pts = w.per_minute(T0 + 61 * 60)
    assert len(pts) == 60 and pts[0].t == int(T0) + 2 * 60
    assert pts[0].count == 1 and pts[0].p50_s == 1.0


def test_reading_closes_a_finished_minute_without_new_samples() -> None:
    w = TtftWindow()
    w.add(0.4, T0 + 10)
    pts = w.per_minute(T0 + 5 * 60)
    assert pts[-6].t == int(T0) and pts[-6].count == 1 and pts[-1].count == 0


def test_memory_is_bounded() -> None:
    w = TtftWindow(max_samples=100)
    for i in range(1000):
        w.add(0.1 if i < 900 else 9.0, T0 + i * 0.01)
    s = w.summary(T0 + 10)
    assert s.count == 100  # the newest 100 only
    assert s.p50_s == 9.0


def test_invalid_measurements_are_ignored() -> None:
    w = TtftWindow()
    for bad in (math.nan, -1.0, math.inf):
        w.add(bad, T0)
    assert w.summary(T0).count == 0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"window_s=0, .*all must be positive"):
        TtftWindow(window_s=0)
    with pytest.raises(ValueError, match=r"history_minutes=0, .*all must be positive"):
        TtftWindow(history_minutes=0)
