"""Headroom follows the requested class; aging only orders (issue 10, point 4).

Data-structure tests with a fake clock: ``FairQueue`` alone, time passed in, no sleeps.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections.abc import Callable

import pytest

from teamgpu.scheduler import (
    FairQueue,
    FairQueueConfig,
    PriorityClass,
    QueuedRequest,
    QueueFull,
    UserQueueFull,
)
from tests.scheduler.reference_queue import ReferenceQueue

HIGH, NORMAL, LOW = PriorityClass.HIGH, PriorityClass.NORMAL, PriorityClass.LOW
ConfigFactory = Callable[..., FairQueueConfig]
MakeRequest = Callable[..., QueuedRequest]
NO_TIMEOUTS = dict.fromkeys(PriorityClass, math.inf)


def popped_id(q: FairQueue, now: float, in_flight: int, capacity: int,
              lowest: PriorityClass = LOW) -> str | None:
    req = q.pop_next(now, in_flight, capacity, lowest_class=lowest)
    return None if req is None else req.request_id


# ---------------------------------------------------------------- the batch flood


def test_aged_low_flood_does_not_delay_a_high_request(make_req: MakeRequest) -> None:
    """Capacity 16, reserves 2 + 1: 13 low in flight, 100 low waiting for 61 s."""
    q = FairQueue(FairQueueConfig(aging_s=30.0, reserved_slots_high=2,
                                  reserved_slots_normal=1))
    for i in range(113):
        q.push(make_req(f"batch{i % 4}", LOW), 0.0)
    in_flight = 0
    while q.pop_next(0.0, in_flight, 16) is not None:
        in_flight += 1
    assert in_flight == 13  # low's limit: 16 - 2 - 1
    waiting = q.stats(61.0)
    assert waiting.queued_effective == {HIGH: 100, NORMAL: 0, LOW: 0}  # all aged to high
    assert q.pop_next(61.0, 13, 16) is None  # aged, but still low: no reserved slot

    assert q.push(make_req("dev", HIGH, request_id="ide"), 61.0) == 1
    assert popped_id(q, 61.0, 13, 16) == "ide"  # at once, past 100 aged requests
    q.push(make_req("dev", NORMAL, request_id="chat"), 61.0)
    q.push(make_req("dev2", HIGH, request_id="ide2"), 61.0)
    assert popped_id(q, 61.0, 14, 16) == "ide2"  # normal may not start at 14 any more
    assert q.pop_next(61.0, 15, 16) is None  # the normal one waits for its headroom
    assert popped_id(q, 61.0, 13, 16) == "chat"  # the normal reserve is its
    assert q.pop_next(61.0, 13, 16) is None  # and never the aged lows'
    assert len(q) == 100

    # A batch request finishes: the non-reserved slot goes to the aged lows again.
    released = q.pop_next(62.0, 12, 16)
    assert released is not None and released.priority is LOW
    assert q.pop_next(62.0, 13, 16) is None


def test_aged_requests_still_go_first_in_the_non_reserved_slots(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    """Capacity 6, reserves 2 + 1: low may start below 3, normal below 4, high below 6."""
    q = FairQueue(plain_config(aging_s=10.0, reserved_slots_high=2, reserved_slots_normal=1))
    q.push(make_req("old", LOW, request_id="old-low"), 0.0)
    q.charge("old", prompt_tokens=10_000)  # the class beats a far larger counter
    q.push(make_req("young", LOW, request_id="young-low"), 20.5)
    q.push(make_req("dev", NORMAL, request_id="native-normal"), 20.5)
    assert q.effective_priority("old-low") is HIGH
    assert (q.position("old-low"), q.position("native-normal")) == (1, 1)  # see below
    # Only normal's reserve is free: the native normal request, not the aged low one.
    assert popped_id(q, 21.0, 3, 6) == "native-normal"
    q.push(make_req("dev", NORMAL, request_id="native-normal-2"), 21.0)
    # A non-reserved slot: the aged request goes ahead of the native normal request ...
    assert popped_id(q, 21.0, 2, 6) == "old-low"
    # ... and the younger request of its own class comes last.
    assert popped_id(q, 21.0, 2, 6) == "native-normal-2"
    assert popped_id(q, 21.0, 2, 6) == "young-low"


def test_aged_normal_request_does_not_take_the_high_reserve(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(aging_s=5.0, reserved_slots_high=2, reserved_slots_normal=1))
    q.push(make_req("a", NORMAL, request_id="n"), 0.0)
    assert q.effective_priority("n") is NORMAL
    assert q.pop_next(100.0, 4, 6) is None  # high since 5 s; normal may start below 4
    assert q.effective_priority("n") is HIGH
    assert popped_id(q, 100.0, 3, 6) == "n"


def test_aged_request_skipped_at_the_head_does_not_block_the_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    """The aged low request has the smallest counter in ``high``; natives pass it."""
    q = FairQueue(plain_config(aging_s=5.0, reserved_slots_high=2, reserved_slots_normal=1))
    q.push(make_req("batch", LOW, request_id="aged"), 0.0)
    q.charge("dev", completion_tokens=500)
    q.charge("dev2", completion_tokens=900)
    for rid, user in (("h1", "dev"), ("h2", "dev2"), ("h3", "dev")):
        q.push(make_req(user, HIGH, request_id=rid, est_prompt_tokens=1000), 10.0)
    assert q.counter("batch") < q.counter("dev") < q.counter("dev2")  # 0 < 1000 < 1800
    assert [popped_id(q, 10.0, n, 6) for n in (3, 4, 5)] == ["h1", "h2", "h3"]
    assert q.pop_next(10.0, 5, 6) is None
    assert popped_id(q, 10.0, 2, 6) == "aged"


# ---------------------------------------------------------------- engine hold-back


def test_engine_hold_back_applies_to_the_requested_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    q = FairQueue(plain_config(aging_s=10.0))
    q.push(make_req("batch", LOW, request_id="aged-low"), 0.0)
    q.push(make_req("chat", NORMAL, request_id="aged-normal"), 0.0)
    assert q.stats(25.0).queued_effective == {HIGH: 2, NORMAL: 0, LOW: 0}
    assert q.pop_next(25.0, 0, 4, lowest_class=HIGH) is None  # the engine is saturated
    q.push(make_req("dev", HIGH, request_id="native-high"), 25.0)
    assert popped_id(q, 25.0, 0, 4, HIGH) == "native-high"
    assert q.pop_next(25.0, 1, 4, lowest_class=HIGH) is None
    assert popped_id(q, 25.0, 1, 4, NORMAL) == "aged-normal"
    assert q.pop_next(25.0, 2, 4, lowest_class=NORMAL) is None
    assert popped_id(q, 25.0, 2, 4, LOW) == "aged-low"


# ---------------------------------------------------------------- against the reference


@dataclasses.dataclass
class _Tally:
    pops: int = 0
    nones: int = 0
    skips: int = 0  # the best request by order alone might not start; another did


def _random_config(rng: random.Random) -> FairQueueConfig:
    return FairQueueConfig(
        input_token_weight=rng.choice([0.0, 1.0, 0.5]),
        output_token_weight=rng.choice([1.0, 2.0]),
        aging_s=rng.choice([1.0, 2.5, 7.0, math.inf]),
        reserved_slots_high=rng.randint(0, 3),
        reserved_slots_normal=rng.randint(0, 2),
        max_queued_per_user=rng.choice([3, 256]),
        max_queued_total=rng.choice([12, 4096]),
        queue_timeout_s={c: rng.choice([4.0, 15.0, math.inf]) for c in PriorityClass},
    )


def _check_sequence(seed: int, steps: int, tally: _Tally) -> None:
    rng = random.Random(seed)
    cfg = _random_config(rng)
    real, ref = FairQueue(cfg), ReferenceQueue(cfg)
    serial = itertools.count()
    users = [f"u{i}" for i in range(rng.randint(1, 6))]
    now = 0.0
    for _ in range(steps):
        now += rng.choice([0.0, 0.0, rng.random(), rng.random() * 3, 10.0])
        op = rng.random()
        if op < 0.4:
            req = QueuedRequest(f"r{next(serial)}", rng.choice(users),
                                rng.choice(list(PriorityClass)),
                                weight=rng.choice([1.0, 2.0, 0.5]),
                                est_prompt_tokens=rng.randint(0, 300))
            twin = dataclasses.replace(req)
            full = (sum(w.req.user == req.user for w in ref.waiting) >= cfg.max_queued_per_user
                    or len(ref.waiting) >= cfg.max_queued_total)
            try:
                position = real.push(req, now)
            except (UserQueueFull, QueueFull):
                assert full
                ref.advance(now)
                continue
            assert not full
            assert position == ref.push(twin, now)
        elif op < 0.5 and ref.waiting:
            rid = rng.choice(ref.waiting).req.request_id
            assert real.remove(rid) and ref.remove(rid)
        elif op < 0.6:
            assert [r.request_id for r in real.expire(now)] == ref.expire(now)
        elif op < 0.7:
            user = rng.choice(users)
            tokens = rng.randint(0, 100), rng.randint(0, 100)
            real.charge(user, *tokens)
            ref.charge(user, *tokens)
        else:
            capacity = cfg.reserved_slots_total + rng.randint(1, 4)
            in_flight = rng.randint(0, capacity)
            lowest = rng.choice(list(PriorityClass))
            ref.advance(now)
            real.stats(now)  # applies aging at `now`, like the reference
            positions = {w.req.request_id: real.position(w.req.request_id)
                         for w in ref.waiting}
            assert positions == {rid: ref.position(rid) for rid in positions}
            startable = ref.startable(in_flight, capacity, lowest)
            by_order = min(ref.waiting, key=lambda w: (ref.eff(w), *ref.vtc_key(w)),
                           default=None)
            got = real.pop_next(now, in_flight, capacity, lowest_class=lowest)
            want = ref.pop_next(now, in_flight, capacity, lowest)
            assert (got and got.request_id) == (want and want.request_id)
            if got is None:
                assert not startable  # work-conserving: None only when nothing may start
                tally.nones += 1
            else:
                assert positions[got.request_id] == 1  # only position 1 is ever popped
                tally.pops += 1
                if by_order is not None and by_order.req.request_id != got.request_id:
                    tally.skips += 1
        stats = real.stats(now)
        ref.advance(now)
        requested, effective = ref.queued()
        assert (stats.queued, stats.queued_effective) == (requested, effective)
        assert dict(stats.user_counters) == ref.counters
        assert real.next_event_at() == ref.next_event_at()
        assert len(real) == len(ref.waiting)


def test_pop_next_matches_a_brute_force_reference_on_random_sequences() -> None:
    """Order, work conservation, positions, counters, expiry and events, 200 sequences.

    The reference enumerates the waiting requests and applies the documented rules
    directly; any difference in the request popped (or None), a position, a counter, a
    depth, an expiry or the next event fails.
    """
    tally = _Tally()
    for seed in range(200):
        _check_sequence(seed, 100, tally)
    # Every branch was exercised, including popping past an unstartable better class.
    assert min(tally.pops, tally.nones, tally.skips) > 200, tally


# ---------------------------------------------------------------- the starvation bound


def _late_low_wait(interactive: int, *, aging_s: float = 10.0, horizon_s: float = 400.0,
                   seed: int = 1) -> float | None:
    """Event simulation: capacity 16, reserves 2 + 1, a backlogged batch user.

    ``interactive`` developers each keep one ``high`` request outstanding and send the
    next as soon as the last one finished (0.5-1.5 s each); the batch user keeps 100
    ``low`` requests (5-6 s each) waiting. Every release and push is followed by a
    decision, as in ``Admission``. At 30 s a second batch user sends one ``low``
    request; returns how long it waited, or None if it did not start within the horizon.
    """
    q = FairQueue(FairQueueConfig(aging_s=aging_s, reserved_slots_high=2,
                                  reserved_slots_normal=1, queue_timeout_s=NO_TIMEOUTS))
    rng = random.Random(seed)
    serial = itertools.count()
    events: list[tuple[float, int, str]] = []  # (time, serial, user) of releases
    running = 0
    late_at = 30.0
    started: dict[str, float] = {}

    def push(user: str, cls: PriorityClass, now: float, rid: str | None = None) -> None:
        q.push(QueuedRequest(rid or f"{user}-{next(serial)}", user, cls,
                             est_prompt_tokens=100 if cls is LOW else 20), now)

    def decide(now: float) -> None:
        nonlocal running
        while (req := q.pop_next(now, running, 16)) is not None:
            running += 1
            started[req.request_id] = now
            duration = 0.5 + rng.random() if req.priority is HIGH else 5.0 + rng.random()
            heapq.heappush(events, (now + duration, next(serial), req.user))
            if req.user == "flood":
                push("flood", LOW, now)
                decide(now)

    for _ in range(100):
        push("flood", LOW, 0.0)
    decide(0.0)
    for i in range(interactive):
        push(f"dev{i}", HIGH, rng.random())
    decide(1.0)
    late_pushed = False
    while events:
        now, _, user = heapq.heappop(events)
        if now > horizon_s:
            break
        if not late_pushed and now >= late_at:
            push("late", LOW, late_at, rid="late")
            late_pushed = True
            decide(late_at)
        running -= 1  # a release, then a decision
        q.charge(user, completion_tokens=50 if user.startswith("dev") else 200)
        decide(now)
        if user.startswith("dev"):
            push(user, HIGH, now)
            decide(now)
        if "late" in started:
            return started["late"] - late_at
    return None


@pytest.mark.parametrize("interactive", [0, 6, 12, 13])
def test_starvation_bound_holds_while_interactive_load_leaves_a_non_reserved_slot(
    interactive: int,
) -> None:
    """While some release leaves fewer than 16 - 2 - 1 = 13 requests in flight (up to 13
    closed-loop interactive clients: a release leaves 12), a low request starts within
    2 * aging_s, after which it is in the top class with the smallest counter there,
    plus the longest running request (6 s): by then a release has left a non-reserved
    slot free."""
    wait = _late_low_wait(interactive)
    assert wait is not None
    assert 2 * 10.0 <= wait <= 2 * 10.0 + 6.0, wait


@pytest.mark.parametrize("interactive", [14, 16])
def test_low_requests_starve_while_interactive_load_fills_the_non_reserved_slots(
    interactive: int,
) -> None:
    """The condition is needed: when every release still leaves 13 or more interactive
    requests in flight, no low request starts at all, aged or not. The reserve stays free
    for interactive work, and the non-reserved slots are interactive work's too."""
    assert _late_low_wait(interactive) is None
