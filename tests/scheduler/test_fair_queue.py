"""The fair queue as a plain data structure: no I/O, time passed in."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from teamgpu import errors as gateway_errors
from teamgpu.scheduler import (
    FairQueue,
    FairQueueConfig,
    InvalidPriority,
    PriorityClass,
    QueuedRequest,
    QueueFull,
    SchedulerConfigError,
    SchedulerError,
    UserQueueFull,
)

HIGH, NORMAL, LOW = PriorityClass.HIGH, PriorityClass.NORMAL, PriorityClass.LOW
ConfigFactory = Callable[..., FairQueueConfig]
MakeRequest = Callable[..., QueuedRequest]


def drain(q: FairQueue, now: float = 0.0) -> list[str]:
    """Pop everything, one at a time, as if each finished before the next decision."""
    out = []
    while (req := q.pop_next(now, 0, 10)) is not None:
        out.append(req.request_id)
    return out


# ---------------------------------------------------------------- PriorityClass


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("high", HIGH),
        ("HIGH", HIGH),
        (" Interactive ", HIGH),
        ("normal", NORMAL),
        ("Normal", NORMAL),
        ("low", LOW),
        ("BATCH", LOW),
    ],
)
def test_parse_accepts_names_and_aliases(text: str, expected: PriorityClass) -> None:
    assert PriorityClass.parse(text) is expected


@pytest.mark.parametrize("text", ["", "urgent", "0", "hi", "low-ish"])
def test_parse_rejects_anything_else_as_a_400(text: str) -> None:
    with pytest.raises(InvalidPriority) as info:
        PriorityClass.parse(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, gateway_errors.InvalidPriority)
    assert isinstance(err, SchedulerError)
    assert err.status == 400
    assert err.param == "X-Priority"
    assert repr(text) in err.message


def test_class_values_are_vllm_priorities_lower_first() -> None:
    assert [int(c) for c in (HIGH, NORMAL, LOW)] == [0, 1, 2]
    assert LOW.capped(NORMAL) is LOW  # below the key's ceiling: as asked
    assert HIGH.capped(NORMAL) is NORMAL  # above the ceiling: served at the ceiling
    assert LOW.promoted(5) is HIGH


# ---------------------------------------------------------------- config


def test_config_defaults() -> None:
    cfg = FairQueueConfig()
    assert (cfg.input_token_weight, cfg.output_token_weight) == (1.0, 2.0)
    assert cfg.kv_cache_high_watermark == 0.95
    assert set(cfg.queue_timeout_s) == set(PriorityClass)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_token_weight", -1.0),
        ("aging_s", 0.0),
        ("max_queued_per_user", 0),
        ("max_queued_total", 0),
        ("reserved_slots_high", -1),
        ("kv_cache_high_watermark", 1.5),
        ("engine_load_recheck_ms", 0),
        ("queue_timeout_s", {HIGH: 1.0, NORMAL: 1.0}),
        ("queue_timeout_s", {HIGH: 1.0, NORMAL: 1.0, LOW: 0.0}),
    ],
)
def test_config_rejects_bad_values_naming_them(field: str, value: object) -> None:
    with pytest.raises(SchedulerConfigError) as info:
        FairQueueConfig(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)


def test_config_rejects_two_zero_token_weights() -> None:
    with pytest.raises(SchedulerConfigError):
        FairQueueConfig(input_token_weight=0, output_token_weight=0)


def test_reserve_must_leave_low_a_slot() -> None:
    cfg = FairQueueConfig(reserved_slots_high=2, reserved_slots_normal=1)
    cfg.check_capacity(4)
    with pytest.raises(SchedulerConfigError, match=r"capacity=3 .*reserved_slots_high=2"):
        cfg.check_capacity(3)
    with pytest.raises(SchedulerConfigError):
        cfg.check_capacity(0)
    with pytest.raises(SchedulerConfigError):
        FairQueue(cfg).pop_next(0.0, 0, 3)


# ---------------------------------------------------------------- QueuedRequest


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="weight"):
        QueuedRequest("r", "u", NORMAL, weight=0)
    with pytest.raises(ValueError, match="est_prompt_tokens"):
        QueuedRequest("r", "u", NORMAL, est_prompt_tokens=-1)
    assert QueuedRequest("r", "u", "batch").priority is LOW  # type: ignore[arg-type]
    with pytest.raises(InvalidPriority):
        QueuedRequest("r", "u", "urgent")  # type: ignore[arg-type]


# ---------------------------------------------------------------- ordering


def test_strict_priority_between_classes(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", LOW, request_id="low"), 0.0)
    q.push(make_req("b", NORMAL, request_id="normal"), 0.0)
    q.push(make_req("c", HIGH, request_id="high"), 0.0)
    assert drain(q) == ["high", "normal", "low"]


def test_class_beats_counter(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    q.charge("heavy", prompt_tokens=1_000_000)
    q.push(make_req("light", LOW, request_id="light-low"), 0.0)
    q.push(make_req("heavy", HIGH, request_id="heavy-high"), 0.0)
    assert drain(q) == ["heavy-high", "light-low"]


def test_fifo_within_a_user(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    ids = []
    for tokens in (500, 1, 90, 7):
        req = make_req("a", est_prompt_tokens=tokens)
        q.push(req, 0.0)
        ids.append(req.request_id)
    assert drain(q) == ids


def test_vtc_alternates_between_equal_users(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    for _ in range(3):
        q.push(make_req("a", est_prompt_tokens=10), 0.0)
    for _ in range(3):
        q.push(make_req("b", est_prompt_tokens=10), 0.0)
    assert drain(q) == ["a-1", "b-4", "a-2", "b-5", "a-3", "b-6"]


def test_vtc_picks_smallest_counter(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", request_id="a1"), 0.0)
    q.push(make_req("b", request_id="b1"), 0.0)
    q.charge("a", completion_tokens=1)  # a: 2.0 > b: 0.0
    assert q.pop_next(0.0, 0, 1).request_id == "b1"  # type: ignore[union-attr]


def test_prompt_is_charged_at_dispatch_divided_by_weight(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(input_token_weight=1.0, output_token_weight=2.0))
    q.push(make_req("a", weight=2.0, est_prompt_tokens=10), 0.0)
    assert q.counter("a") == 0.0  # not charged while waiting
    q.pop_next(0.0, 0, 1)
    assert q.counter("a") == 5.0
    q.charge("a", prompt_tokens=4, completion_tokens=3)
    assert q.counter("a") == 5.0 + (4 + 2 * 3) / 2
    with pytest.raises(ValueError, match="completion_tokens=-1: must be >= 0"):
        q.charge("a", completion_tokens=-1)


def test_weights_share_service_in_proportion(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    served = {"a": 0, "b": 0}
    for _ in range(2):
        q.push(make_req("a", weight=2.0, est_prompt_tokens=100), 0.0)
        q.push(make_req("b", weight=1.0, est_prompt_tokens=100), 0.0)
    for _ in range(300):
        req = q.pop_next(0.0, 0, 1)
        assert req is not None
        served[req.user] += 1
        q.push(make_req(req.user, weight=req.weight, est_prompt_tokens=100), 0.0)
    assert served == {"a": 200, "b": 100}


# ---------------------------------------------------------------- VTC counter lift


def test_newly_backlogged_user_is_lifted_to_min_waiting_counter(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    for i in range(1, 6):
        q.push(make_req("a", request_id=f"a{i}", est_prompt_tokens=100), 0.0)
    assert drain_n(q, 3) == ["a1", "a2", "a3"]
    assert q.counter("a") == 300
    # b was idle all along: it may not bank the 300 it did not use.
    for i in range(1, 4):
        q.push(make_req("b", request_id=f"b{i}", est_prompt_tokens=100), 0.0)
    assert q.counter("b") == 300
    assert drain(q) == ["a4", "b1", "a5", "b2", "b3"]


def drain_n(q: FairQueue, n: int) -> list[str]:
    out = []
    for _ in range(n):
        req = q.pop_next(0.0, 0, 1)
        assert req is not None
        out.append(req.request_id)
    return out


def test_lift_to_last_served_when_nobody_waits(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", est_prompt_tokens=100), 0.0)
    q.pop_next(0.0, 0, 1)
    q.charge("a", completion_tokens=50)  # a keeps streaming: 200
    assert len(q) == 0
    q.push(make_req("b"), 1.0)
    assert q.counter("b") == 200


def test_lift_never_lowers_a_counter(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    q.charge("b", prompt_tokens=1000)
    q.push(make_req("a", est_prompt_tokens=100), 0.0)
    q.push(make_req("b"), 0.0)
    assert q.counter("b") == 1000


def test_no_lift_while_the_user_already_waits_in_the_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", est_prompt_tokens=100), 0.0)
    q.push(make_req("a", est_prompt_tokens=100), 0.0)
    q.push(make_req("b"), 0.0)
    q.pop_next(0.0, 0, 1)  # a: 100
    q.charge("a", completion_tokens=1000)  # a: 2100, b still 0 and waiting
    q.push(make_req("b"), 0.0)
    assert q.counter("b") == 0.0


def test_lift_is_against_the_users_of_the_same_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("batch", LOW), 0.0)  # waiting, counter 0
    q.charge("dev", completion_tokens=250)
    q.push(make_req("dev", HIGH), 0.0)  # dev: 500, waiting in high
    q.push(make_req("batch", HIGH), 0.0)  # batch joins high: competes with dev
    assert q.counter("batch") == 500


def test_lift_with_an_empty_class_uses_the_last_user_served_from_that_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("dev", HIGH, est_prompt_tokens=300), 0.0)
    q.pop_next(0.0, 0, 1)
    q.push(make_req("batch", LOW, est_prompt_tokens=50), 0.0)
    q.pop_next(0.0, 0, 1)  # the last served overall is batch (50)
    q.push(make_req("newcomer", HIGH), 0.0)
    assert q.counter("newcomer") == 300


# ---------------------------------------------------------------- aging


def test_aging_promotes_one_class_per_aging_s(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(aging_s=10.0))
    q.push(make_req("a", LOW, request_id="r"), 0.0)
    assert q.position("r", now=9.99) == 1
    assert q.effective_priority("r") is LOW
    q.position("r", now=10.0)
    assert q.effective_priority("r") is NORMAL
    q.position("r", now=19.99)
    assert q.effective_priority("r") is NORMAL
    q.position("r", now=20.0)
    assert q.effective_priority("r") is HIGH
    assert q.stats(20.0).queued_effective == {HIGH: 1, NORMAL: 0, LOW: 0}
    assert q.stats(20.0).queued == {HIGH: 0, NORMAL: 0, LOW: 1}


def test_aged_low_request_is_served_before_a_new_high_one(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(aging_s=10.0))
    q.push(make_req("batch", LOW, request_id="old-low"), 0.0)
    q.push(make_req("dev", HIGH, request_id="new-high"), 15.0)  # low is only normal yet
    assert q.pop_next(15.0, 0, 1).request_id == "new-high"  # type: ignore[union-attr]
    q.push(make_req("dev", HIGH, request_id="newer-high"), 20.0)  # low is high now
    assert drain(q, 20.0) == ["old-low", "newer-high"]


def _wait_of_low_request_under_high_flood(aging_s: float, horizon_s: int) -> float | None:
    """One slot; three developers keep high requests waiting, each holds the slot 1 s.

    Returns when the batch user's single low request was dispatched, or None.
    """
    q = FairQueue(
        FairQueueConfig(
            aging_s=aging_s,
            reserved_slots_high=0,
            reserved_slots_normal=0,
            queue_timeout_s=dict.fromkeys(PriorityClass, math.inf),
        )
    )
    serial = 0

    def push(user: str, cls: PriorityClass, now: float) -> None:
        nonlocal serial
        serial += 1
        q.push(QueuedRequest(f"{user}{serial}", user, cls, est_prompt_tokens=50), now)

    push("batch", LOW, 0.0)
    for t in range(horizon_s):
        now = float(t)
        for dev in ("d1", "d2", "d3"):
            while q.stats(now).queued_by_user.get(dev, 0) < 2:
                push(dev, HIGH, now)
        req = q.pop_next(now, 0, 1)  # the previous request finished: one slot is free
        assert req is not None
        if req.user == "batch":
            return now
        q.charge(req.user, completion_tokens=10)
    return None


def test_starvation_bound_low_request_served_within_two_aging_periods() -> None:
    started = _wait_of_low_request_under_high_flood(aging_s=10.0, horizon_s=200)
    assert started is not None
    assert 2 * 10.0 <= started <= 2 * 10.0 + 1.0  # one request's service time


def test_without_aging_the_same_low_request_starves() -> None:
    assert _wait_of_low_request_under_high_flood(aging_s=math.inf, horizon_s=200) is None


# ---------------------------------------------------------------- reserve / headroom


@pytest.mark.parametrize(
    ("cls", "in_flight", "admitted"),
    [
        (LOW, 2, True),
        (LOW, 3, False),
        (NORMAL, 3, True),
        (NORMAL, 4, False),
        (HIGH, 5, True),
        (HIGH, 6, False),
    ],
)
def test_reserve_limits_per_class(
    plain_config: ConfigFactory,
    make_req: MakeRequest,
    cls: PriorityClass,
    in_flight: int,
    admitted: bool,
) -> None:
    # capacity 6: low below 6-2-1 = 3, normal below 6-2 = 4, high below 6
    q = FairQueue(plain_config(reserved_slots_high=2, reserved_slots_normal=1))
    q.push(make_req("a", cls), 0.0)
    assert (q.pop_next(0.0, in_flight, 6) is not None) is admitted


def test_low_never_fills_every_slot_and_high_finds_one(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(reserved_slots_high=2, reserved_slots_normal=1))
    for _ in range(10):
        q.push(make_req("batch", LOW), 0.0)
    in_flight = 0
    while q.pop_next(0.0, in_flight, 6) is not None:
        in_flight += 1
    assert in_flight == 3
    q.push(make_req("dev", HIGH, request_id="ide"), 0.0)
    assert q.pop_next(0.0, in_flight, 6).request_id == "ide"  # type: ignore[union-attr]


def test_aged_request_keeps_its_requested_class_headroom(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(reserved_slots_high=2, reserved_slots_normal=1, aging_s=5.0))
    q.push(make_req("batch", LOW, request_id="r"), 0.0)
    assert q.pop_next(4.9, 3, 6) is None  # low: only below 3
    assert q.pop_next(5.0, 3, 6) is None  # competes as normal now, but is still low
    assert q.pop_next(10.0, 5, 6) is None  # nor as high
    assert q.effective_priority("r") is HIGH
    assert q.pop_next(10.0, 2, 6).request_id == "r"  # type: ignore[union-attr]


def test_lowest_class_holds_back_lower_classes(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", NORMAL), 0.0)
    assert q.pop_next(0.0, 0, 4, lowest_class=HIGH) is None
    q.push(make_req("b", HIGH, request_id="h"), 0.0)
    assert q.pop_next(0.0, 0, 4, lowest_class=HIGH).request_id == "h"  # type: ignore[union-attr]


def test_work_conserving_and_strict_on_random_states(make_req: MakeRequest) -> None:
    """pop_next returns None only when no waiting request may start (by its requested
    class); else one that may, from the best effective class among those that may."""
    cfg = FairQueueConfig(aging_s=7.0, reserved_slots_high=2, reserved_slots_normal=1)
    q = FairQueue(cfg)
    rng = random.Random(3)
    waiting: set[str] = set()
    requested: dict[str, PriorityClass] = {}
    outcomes = {"popped": 0, "none": 0}
    now = 0.0
    for _ in range(3000):
        now += rng.random()
        op = rng.random()
        if op < 0.45 and len(waiting) < 200:
            req = make_req(rng.choice("abcdefg"), rng.choice(list(PriorityClass)),
                           est_prompt_tokens=rng.randint(0, 500))
            q.push(req, now)
            waiting.add(req.request_id)
            requested[req.request_id] = req.priority
        elif op < 0.55 and waiting:
            rid = rng.choice(sorted(waiting))
            assert q.remove(rid)
            waiting.discard(rid)
            del requested[rid]
        else:
            for rid in waiting:
                q.position(rid, now)  # applies aging at `now`
            eff = {rid: q.effective_priority(rid) or HIGH for rid in waiting}
            capacity = rng.randint(4, 8)
            in_flight = rng.randint(0, capacity)
            lowest = rng.choice(list(PriorityClass))
            first = {rid for rid in waiting if q.position(rid) == 1}
            popped = q.pop_next(now, in_flight, capacity, lowest_class=lowest)
            admissible = [
                rid for rid, c in requested.items()
                if c <= lowest and in_flight < cfg.admission_limit(c, capacity)
            ]
            outcomes["none" if popped is None else "popped"] += 1
            if popped is None:
                assert not admissible
            else:
                assert popped.request_id in admissible
                assert eff[popped.request_id] == min(eff[rid] for rid in admissible)
                assert popped.request_id in first  # only position 1 is ever popped
                waiting.discard(popped.request_id)
                del requested[popped.request_id]
            q.charge(rng.choice("abcdefg"), completion_tokens=rng.randint(0, 50))
    assert len(q) == len(waiting)
    assert min(outcomes.values()) > 100, outcomes  # both branches were exercised


# ---------------------------------------------------------------- bounds


def test_per_user_bound_is_429_and_total_bound_is_503(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(max_queued_per_user=2, max_queued_total=3))
    q.push(make_req("a"), 0.0)
    q.push(make_req("a"), 0.0)
    with pytest.raises(UserQueueFull) as user_full:
        q.push(make_req("a"), 0.0)
    q.push(make_req("b"), 0.0)  # other users are still welcome
    with pytest.raises(QueueFull) as full:
        q.push(make_req("c"), 0.0)
    with pytest.raises(UserQueueFull):  # both bounds hit: the user's own is reported
        q.push(make_req("a"), 0.0)
    for err, status in ((user_full.value, 429), (full.value, 503)):
        assert isinstance(err, SchedulerError)
        assert err.status == status
        assert err.retry_after_s >= 1
        assert err.headers["Retry-After"] == str(err.retry_after_s)
    stats = q.stats(0.0)
    assert (stats.rejected_user_queue_full_total, stats.rejected_queue_full_total) == (2, 1)
    assert len(q) == 3
    q.pop_next(0.0, 0, 1)
    q.push(make_req("c"), 0.0)  # room again


def test_retry_after_follows_recent_waits(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(max_queued_per_user=1, retry_after_max_s=60))
    q.push(make_req("a"), 0.0)
    q.pop_next(7.2, 0, 1)  # waited 7.2 s
    q.push(make_req("a"), 8.0)
    with pytest.raises(UserQueueFull) as info:
        q.push(make_req("a"), 8.0)
    assert info.value.retry_after_s == 8
    q2 = FairQueue(plain_config(max_queued_per_user=1, retry_after_max_s=5))
    q2.push(make_req("a"), 0.0)
    q2.pop_next(100.0, 0, 1)
    q2.push(make_req("a"), 100.0)
    with pytest.raises(UserQueueFull) as capped:
        q2.push(make_req("a"), 100.0)
    assert capped.value.retry_after_s == 5


def test_duplicate_request_id_is_a_caller_bug(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", request_id="x"), 0.0)
    with pytest.raises(ValueError, match="request_id='x' is already queued") as info:
        q.push(make_req("b", request_id="x"), 0.0)
    assert not isinstance(info.value, SchedulerError)


# ---------------------------------------------------------------- removal and expiry


def test_remove_takes_a_request_out_at_once(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", request_id="a1", est_prompt_tokens=1), 0.0)
    q.push(make_req("a", request_id="a2", est_prompt_tokens=1), 0.0)
    q.push(make_req("b", request_id="b1", est_prompt_tokens=1), 0.0)
    assert q.position("b1") == 2
    assert q.remove("a1") is True
    assert q.remove("a1") is False
    assert q.remove("nope") is False
    assert "a1" not in q
    assert q.position("a1") is None
    assert q.stats(0.0).queued_by_user == {"a": 1, "b": 1}
    assert drain(q) == ["a2", "b1"]
    assert q.stats(0.0).removed_total == 1


def test_expire_uses_the_requested_class_timeout(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(queue_timeout_s={HIGH: 1.0, NORMAL: 5.0, LOW: 10.0}, aging_s=2.0))
    q.push(make_req("a", HIGH, request_id="h"), 0.0)
    q.push(make_req("a", NORMAL, request_id="n"), 0.0)
    q.push(make_req("a", LOW, request_id="l"), 0.0)
    q.push(make_req("b", HIGH, request_id="h2"), 0.5)
    assert q.expire(0.99) == []
    assert [r.request_id for r in q.expire(1.0)] == ["h"]
    assert [r.request_id for r in q.expire(1.5)] == ["h2"]
    assert q.expire(4.0) == []
    assert q.effective_priority("l") is HIGH  # aged to high at 4 s, but keeps low's timeout
    assert q.effective_priority("n") is HIGH
    assert [r.request_id for r in q.expire(5.0)] == ["n"]
    assert q.expire(9.99) == []
    assert [r.request_id for r in q.expire(10.0)] == ["l"]
    assert len(q) == 0
    assert q.pop_next(10.0, 0, 1) is None
    assert q.stats(10.0).expired_total == 4


# ---------------------------------------------------------------- position, events, stats


def test_positions_follow_class_then_fair_interleaving(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config())
    assert [q.push(make_req("a", est_prompt_tokens=10), 0.0) for _ in range(3)] == [1, 2, 3]
    assert q.push(make_req("b", est_prompt_tokens=10), 0.0) == 2
    q.push(make_req("b", est_prompt_tokens=10), 0.0)
    q.push(make_req("b", est_prompt_tokens=10), 0.0)
    expected = {"a-1": 1, "b-4": 2, "a-2": 3, "b-5": 4, "a-3": 5, "b-6": 6}
    assert {rid: q.position(rid) for rid in expected} == expected
    assert drain(q) == sorted(expected, key=expected.__getitem__)
    q.push(make_req("c", LOW, request_id="low"), 0.0)
    q.push(make_req("d", HIGH, request_id="high"), 0.0)
    assert (q.position("high"), q.position("low")) == (1, 2)


def test_next_event_at_is_the_next_promotion_or_expiry(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(aging_s=10.0, queue_timeout_s={HIGH: 3.0, NORMAL: 100.0,
                                                              LOW: 100.0}))
    assert q.next_event_at() is None
    q.push(make_req("a", LOW), 1.0)
    assert q.next_event_at() == 11.0
    q.push(make_req("b", HIGH), 2.0)
    assert q.next_event_at() == 5.0
    assert len(q.expire(5.0)) == 1
    assert q.next_event_at() == 11.0
    q.stats(11.0)  # now low has become normal
    assert q.next_event_at() == 21.0


def test_stats_snapshot(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    q.push(make_req("a", HIGH, est_prompt_tokens=10), 0.0)
    q.push(make_req("b", LOW), 1.0)
    q.push(make_req("b", LOW), 2.0)
    q.pop_next(4.0, 0, 1)  # a's, after 4 s
    s = q.stats(5.0)
    assert s.queued == {HIGH: 0, NORMAL: 0, LOW: 2}
    assert s.queued_total == 2
    assert s.oldest_wait_s == {HIGH: 0.0, NORMAL: 0.0, LOW: 4.0}
    assert s.queued_by_user == {"b": 2}
    assert s.user_counters == {"a": 10.0, "b": 0.0}
    assert s.recent_waits_s[HIGH] == (4.0,)
    assert s.admitted_total == 1
    assert s.wait_quantile_s(0.5) == 4.0
    assert s.wait_quantile_s(0.95, LOW) is None


def test_time_never_goes_backwards(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    q = FairQueue(plain_config())
    first = make_req("a")
    second = make_req("a")
    q.push(first, 10.0)
    q.push(second, 5.0)
    assert (first.enqueued_at, second.enqueued_at) == (10.0, 10.0)


def test_stale_entries_are_compacted(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    """Cancelled requests behind a long-waiting one do not pile up in memory."""
    q = FairQueue(plain_config(aging_s=1e9))
    q.push(make_req("z", LOW), 0.0)  # waits all along, at the head of every structure
    for i in range(20_000):
        req = make_req("y", LOW)
        q.push(req, float(i))
        assert q.remove(req.request_id)
    internal = (
        sum(len(d) for d in q._arrivals)
        + sum(len(d) for d in q._promo.values())
        + sum(len(h) for u in q._users.values() for h in u.heaps)
    )
    assert internal < 5_000
    assert [r.user for r in [q.pop_next(1.0, 0, 1)] if r] == ["z"]
