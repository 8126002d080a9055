"""Admission, the async shell: waking waiters, cancellation, timeouts, engine load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from teamgpu.scheduler import (
    Admission,
    EngineLoad,
    FairQueueConfig,
    Lease,
    PriorityClass,
    QueuedRequest,
    QueueTimeout,
    SchedulerConfigError,
    UserQueueFull,
)

HIGH, NORMAL, LOW = PriorityClass.HIGH, PriorityClass.NORMAL, PriorityClass.LOW
ConfigFactory = Callable[..., FairQueueConfig]
MakeRequest = Callable[..., QueuedRequest]


async def settle() -> None:
    """Let every ready task run (no timer advances)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_admits_at_once_when_a_slot_is_free(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=2)
    calls: list[int] = []

    async def on_position(pos: int) -> None:
        calls.append(pos)

    lease = await adm.acquire(make_req("a", LOW), on_position=on_position)
    assert isinstance(lease, Lease)
    assert lease.wait_s < 0.05
    assert lease.priority is LOW and lease.requested_priority is LOW
    assert adm.in_flight == 1
    assert calls == []  # never queued, nothing to report


async def test_release_admits_the_next_waiter_at_once(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    first = await adm.acquire(make_req("a"))
    waiter = asyncio.create_task(adm.acquire(make_req("b")))
    await settle()
    assert not waiter.done()
    assert adm.stats().queued_total == 1
    first.release()
    # Decided inside release(): no timer, no poll.
    assert adm.stats().queued_total == 0
    assert adm.in_flight == 1
    await settle()
    assert waiter.done()
    second = waiter.result()
    assert second.user == "b"
    assert second.wait_s > 0


async def test_release_is_idempotent(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    adm = Admission(plain_config(), capacity=1)
    first = await adm.acquire(make_req("a"))
    waiters = [asyncio.create_task(adm.acquire(make_req(u))) for u in ("b", "c")]
    await settle()
    first.release()
    first.release()
    await settle()
    assert [w.done() for w in waiters] == [True, False]
    assert adm.in_flight == 1
    with first:  # also a context manager; exiting releases (again: no effect)
        pass
    assert first.released
    assert adm.in_flight == 1
    waiters[0].result().release()
    (await asyncio.wait_for(waiters[1], 1.0)).release()
    assert adm.in_flight == 0


async def test_higher_class_waiter_goes_first(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    hold = await adm.acquire(make_req("x"))
    low = asyncio.create_task(adm.acquire(make_req("batch", LOW)))
    await settle()
    high = asyncio.create_task(adm.acquire(make_req("dev", HIGH)))
    await settle()
    hold.release()
    await settle()
    assert high.done() and not low.done()
    high.result().release()
    await settle()
    assert low.done()


async def test_cancelled_waiter_leaves_the_queue_at_once(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    hold = await adm.acquire(make_req("a"))
    waiter = asyncio.create_task(adm.acquire(make_req("b")))
    await settle()
    assert adm.stats().queued_by_user == {"b": 1}
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    stats = adm.stats()
    assert stats.queued_total == 0 and stats.removed_total == 1
    hold.release()
    assert adm.in_flight == 0  # the cancelled request never took the slot


async def test_cancel_racing_admission_gives_the_slot_back(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    hold = await adm.acquire(make_req("a"))
    b = asyncio.create_task(adm.acquire(make_req("b")))
    c = asyncio.create_task(adm.acquire(make_req("c")))
    await settle()
    hold.release()  # b is admitted, but its task has not resumed yet ...
    b.cancel()  # ... when its client disconnects
    with pytest.raises(asyncio.CancelledError):
        await b
    lease_c = await asyncio.wait_for(c, 1.0)
    assert lease_c.user == "c"
    assert adm.in_flight == 1


async def test_queue_timeout_is_a_503_with_retry_after(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    cfg = plain_config(queue_timeout_s={HIGH: 0.05, NORMAL: 60.0, LOW: 60.0})
    adm = Admission(cfg, capacity=1)
    hold = await adm.acquire(make_req("a"))
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as info:  # not asyncio's TimeoutError: the timer fired
        await asyncio.wait_for(adm.acquire(make_req("b", HIGH)), 2.0)
    elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < 1.0
    assert info.value.status == 503
    assert info.value.retry_after_s >= 1
    stats = adm.stats()
    assert stats.expired_total == 1 and stats.queued_total == 0
    hold.release()
    assert adm.in_flight == 0


async def test_queue_bounds_raise_at_once(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(max_queued_per_user=1), capacity=1)
    hold = await adm.acquire(make_req("a"))
    waiting = asyncio.create_task(adm.acquire(make_req("b")))
    await settle()
    with pytest.raises(UserQueueFull) as info:
        await adm.acquire(make_req("b"))
    assert info.value.status == 429
    hold.release()
    (await asyncio.wait_for(waiting, 1.0)).release()


@pytest.mark.parametrize(
    ("load", "held"),
    [
        (EngineLoad(num_requests_waiting=1, kv_cache_usage_perc=0.1), True),
        (EngineLoad(num_requests_waiting=0, kv_cache_usage_perc=0.95), True),
        (EngineLoad(num_requests_waiting=0, kv_cache_usage_perc=0.94), False),
        (None, False),
    ],
)
async def test_engine_load_holds_back_the_lower_classes(
    plain_config: ConfigFactory, make_req: MakeRequest, load: EngineLoad | None, held: bool
) -> None:
    current = {"load": load}
    adm = Admission(plain_config(engine_load_recheck_ms=10), capacity=4,
                    engine_load=lambda: current["load"])
    low = asyncio.create_task(adm.acquire(make_req("batch", LOW)))
    await asyncio.sleep(0.05)
    assert low.done() is not held
    assert adm.stats().engine_held is held
    # high is still admitted while a slot is free
    high = await asyncio.wait_for(adm.acquire(make_req("dev", HIGH)), 0.5)
    assert high.priority is HIGH
    # the load clears without any release: the re-check timer admits the held request
    current["load"] = EngineLoad(num_requests_waiting=0, kv_cache_usage_perc=0.2)
    lease = await asyncio.wait_for(low, 0.5)
    if held:
        assert lease.wait_s >= 0.04
    assert not adm.stats().engine_held


async def test_position_reports_when_it_changes(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(position_report_interval_s=0.05), capacity=1)
    hold = await adm.acquire(make_req("x"))
    reports: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}

    def recorder(user: str) -> Callable[[int], Awaitable[None]]:
        async def on_position(pos: int) -> None:
            reports[user].append((time.monotonic(), pos))

        return on_position

    a = asyncio.create_task(adm.acquire(make_req("a"), on_position=recorder("a")))
    await settle()
    b = asyncio.create_task(adm.acquire(make_req("b"), on_position=recorder("b")))
    await settle()
    await asyncio.sleep(0.12)  # unchanged positions are not reported again
    assert [p for _, p in reports["a"]] == [1]
    assert [p for _, p in reports["b"]] == [2]
    hold.release()  # a starts; b moves up
    await asyncio.sleep(0.12)
    assert [p for _, p in reports["b"]] == [2, 1]
    assert reports["b"][1][0] - reports["b"][0][0] >= 0.05
    (await asyncio.wait_for(a, 1.0)).release()
    (await asyncio.wait_for(b, 1.0)).release()


async def test_failing_position_callback_leaves_the_queue(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    hold = await adm.acquire(make_req("x"))

    async def broken(pos: int) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await adm.acquire(make_req("a"), on_position=broken)
    assert adm.stats().queued_total == 0
    hold.release()


async def test_capacity_growth_admits_waiters(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    await adm.acquire(make_req("x"))
    waiter = asyncio.create_task(adm.acquire(make_req("a")))
    await settle()
    assert not waiter.done()
    adm.capacity = 2
    await settle()
    assert waiter.done() and adm.in_flight == 2
    with pytest.raises(SchedulerConfigError):
        adm.capacity = 0


def test_capacity_must_leave_low_a_slot() -> None:
    cfg = FairQueueConfig(reserved_slots_high=2, reserved_slots_normal=1)
    with pytest.raises(SchedulerConfigError):
        Admission(cfg, capacity=3)
    adm = Admission(cfg, capacity=4)
    with pytest.raises(SchedulerConfigError):
        adm.capacity = 3
    assert adm.capacity == 4


async def test_aging_orders_but_does_not_admit_into_a_better_class_headroom(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    # capacity 3: low only while in_flight < 1, normal < 2, high < 3
    cfg = plain_config(reserved_slots_high=1, reserved_slots_normal=1, aging_s=30.0)
    clock = {"now": 0.0}
    adm = Admission(cfg, capacity=3, clock=lambda: clock["now"])
    dev = await adm.acquire(make_req("dev", HIGH))
    low = asyncio.create_task(adm.acquire(make_req("batch", LOW)))
    await settle()
    clock["now"] = 61.0  # competes as high now
    adm.capacity = 3  # runs a decision, as a promotion timer would
    await settle()
    assert not low.done()  # the reserved slots stay the interactive requests'
    assert adm.stats().queued_effective[HIGH] == 1
    dev.release()  # a non-reserved slot: admitted at once, in the class it earned
    await settle()
    lease = low.result()
    assert lease.wait_s == 61.0
    assert lease.requested_priority is LOW
    assert lease.priority is HIGH  # send 0 as vLLM's priority
    assert adm.in_flight == 1


async def test_engine_load_holds_back_an_aged_request_by_its_requested_class(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    clock = {"now": 0.0}
    load = {"now": EngineLoad(num_requests_waiting=3, kv_cache_usage_perc=0.5)}
    adm = Admission(plain_config(aging_s=10.0), capacity=4, clock=lambda: clock["now"],
                    engine_load=lambda: load["now"])
    low = asyncio.create_task(adm.acquire(make_req("batch", LOW)))
    await settle()
    clock["now"] = 25.0  # competes as high now
    high = await adm.acquire(make_req("dev", HIGH))  # a native high one is let in
    assert high.priority is HIGH
    assert not low.done() and adm.stats().engine_held
    load["now"] = EngineLoad(num_requests_waiting=0, kv_cache_usage_perc=0.5)
    adm.capacity = 4  # runs a decision, as the engine-load re-check timer would
    await settle()
    assert low.result().priority is HIGH
    assert adm.in_flight == 2


async def test_lease_charges_tokens_incrementally(
    plain_config: ConfigFactory, make_req: MakeRequest
) -> None:
    adm = Admission(plain_config(), capacity=1)
    lease = await adm.acquire(make_req("a", est_prompt_tokens=100))

    def counter() -> float:
        return adm.stats().user_counters["a"]

    assert counter() == 100  # the estimate, at admission
    lease.charge(prompt_tokens=80)
    assert counter() == 100  # still within the estimate: not charged twice
    lease.charge(prompt_tokens=40)
    assert counter() == 120  # the actual prompt (120) exceeded it by 20
    lease.charge(completion_tokens=5)
    assert counter() == 130
    lease.release()
    lease.charge(completion_tokens=1)  # usage that arrives with the last chunk
    assert counter() == 132
    with pytest.raises(ValueError, match="completion_tokens=-1: must be >= 0"):
        lease.charge(completion_tokens=-1)


async def test_stats_include_slots(plain_config: ConfigFactory, make_req: MakeRequest) -> None:
    adm = Admission(plain_config(), capacity=3)
    await adm.acquire(make_req("a"))
    stats = adm.stats()
    assert (stats.in_flight, stats.capacity, stats.admitted_total) == (1, 3, 1)
