"""The scheduler on the request path: a real gateway (uvicorn on loopback) in front of
the fake vLLM, with few slots so that queueing is easy to provoke.

Main gateway: ``max_inflight_per_backend=4``, ``reserved_slots_high=1``,
``reserved_slots_normal=1`` and aging off in practice (``aging_s=3600``), so ``low`` may
start while fewer than 2 requests are in flight, ``normal`` below 3 and ``high`` below 4.

Slots are held by :class:`Holder`: a streaming request with a slow, endless answer that
keeps its slot until the test releases it (the client closes the connection, the fake
aborts the generation, and the gateway frees the slot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, assert_openai_error, start_gateway, wait_until

MAIN_SETTINGS: dict[str, Any] = {
    "max_inflight_per_backend": 4,
    "reserved_slots_high": 1,
    "reserved_slots_normal": 1,
    "aging_s": 3600.0,
}
# Only for the bounds and the timeout: small queues and a short low timeout.
TIGHT_SETTINGS: dict[str, Any] = {
    **MAIN_SETTINGS,
    "max_queued_per_user": 2,
    "max_queued_total": 3,
    "queue_timeout_low_s": 0.5,
}
# One slot and no reserve: the order of service alone, without the headroom rules.
SINGLE_SLOT_SETTINGS: dict[str, Any] = {
    "max_inflight_per_backend": 1,
    "reserved_slots_high": 0,
    "reserved_slots_normal": 0,
    "aging_s": 3600.0,
}


@dataclass
class Setup:
    fake: FakeBackend
    h: Harness
    keys: dict[str, str]  # user -> secret

    def client(self, user: str = "alice", **kw: Any) -> httpx.Client:
        return self.h.client(self.keys[user], **kw)


def _setup(tmp: Any, settings: dict[str, Any]) -> Iterator[Setup]:
    fake = FakeBackend()
    with ServerThread(fake) as ft, start_gateway(tmp, [ft.url], **settings) as h:
        keys = {"alice": h.user_key}
        for user in ("bob", "carol", "dave", "holder"):
            keys[user], _ = h.gw.keys.create(user)
        keys["capped"], _ = h.gw.keys.create("capped", max_priority="normal")
        keys["batchy"], _ = h.gw.keys.create("batchy", default_priority="low")
        keys["eager"], _ = h.gw.keys.create("eager", default_priority="high")
        yield Setup(fake, h, keys)


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _setup(tmp_path_factory.mktemp("sched-main"), MAIN_SETTINGS)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _setup(tmp_path_factory.mktemp("sched-tight"), TIGHT_SETTINGS)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    yield from _setup(tmp_path_factory.mktemp("sched-single"), SINGLE_SLOT_SETTINGS)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as ex:
        yield ex


def body(tokens: int = 1, delay_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max(16, tokens), "fake": {"tokens": tokens, "delay_s": delay_s},
            **extra}


def sent_priority(fake: FakeBackend, rid: str) -> Any:
    """The ``priority`` field of the request the fake received with that request id."""
    got = [r["body"].get("priority", "absent") for r in fake.requests if r["request_id"] == rid]
    assert len(got) == 1, (rid, got)
    return got[0]


def fake_order(fake: FakeBackend, rids: list[str]) -> list[str]:
    """The given request ids in the order the fake received them."""
    seen = [r["request_id"] for r in fake.requests]
    return [rid for rid in seen if rid in rids]


def queue(s: Setup) -> dict[str, Any]:
    """The ``queue`` object of ``/stats``."""
    r = s.h.client("admin").get("/stats")
    assert r.status_code == 200, r.text
    return r.json()["queue"]  # type: ignore[no-any-return]


def wait_queue(s: Setup, **depth: int) -> dict[str, Any]:
    """Wait until ``/stats`` shows these queue depths (``high=1, low=2``, ...)."""
    seen: dict[str, Any] = {}

    def ok() -> bool:
        seen.update(queue(s))
        return all(seen[k] == v for k, v in depth.items())

    try:
        wait_until(ok, 5.0, f"queue depth {depth}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen}") from None
    return seen


def wait_idle(s: Setup) -> None:
    wait_until(lambda: s.fake.active == 0 and s.h.gw.pool.backends[0].in_flight == 0
               and all(a.in_flight == 0 for a in s.h.gw.admissions.admissions.values()),
               5.0, "an idle gateway and backend")
    if s.h.gw.admissions.admissions:
        wait_queue(s, total=0)


class Holder:
    """A streaming request that holds one in-flight slot until ``release``."""

    def __init__(self, s: Setup, pool: ThreadPoolExecutor, priority: str,
                 user: str = "holder") -> None:
        self._s = s
        self._release = threading.Event()
        self._started = threading.Event()
        self.request_id = ""
        self.error = ""
        self.done: Future[int] = pool.submit(self._run, user, priority)
        if not self._started.wait(5.0) or self.error:
            self._release.set()
            status = self.done.result(5.0)  # re-raises what went wrong
            raise AssertionError(f"holder ({priority}) did not start: {status} {self.error}")

    def _run(self, user: str, priority: str) -> int:
        req = body(tokens=1900, delay_s=0.05, stream=True)  # 95 s unless released
        with self._s.client(user) as c, c.stream(
                "POST", "/v1/chat/completions", json=req, headers={"X-Priority": priority}) as r:
            self.request_id = r.headers.get("x-request-id", "")
            if r.status_code == 200:
                chunks = r.iter_raw()
                next(chunks)
                self._started.set()
                self._release.wait(30.0)
            else:
                self.error = r.read().decode("utf-8", "replace")
                self._started.set()
            return r.status_code

    def release(self) -> None:
        self._release.set()
        assert self.done.result(10.0) == 200, self.error


class Holders:
    """Several holders, released together (also on a failing test)."""

    def __init__(self, s: Setup, pool: ThreadPoolExecutor) -> None:
        self._s, self._pool = s, pool
        self.held: list[Holder] = []

    def hold(self, *priorities: str) -> list[Holder]:
        new = [Holder(self._s, self._pool, p) for p in priorities]
        self.held += new
        return new

    def release_all(self) -> None:
        while self.held:
            self.held.pop(0).release()


@pytest.fixture
def holders(pool: ThreadPoolExecutor) -> Iterator[Any]:
    made: list[Holders] = []

    def make(s: Setup) -> Holders:
        hs = Holders(s, pool)
        made.append(hs)
        return hs

    yield make
    for hs in made:
        for h in hs.held:
            h._release.set()


def post(s: Setup, user: str = "alice", priority: str | None = None, *, rid: str | None = None,
         timeout_s: float = 10.0, **kw: Any) -> httpx.Response:
    headers = {}
    if priority is not None:
        headers["X-Priority"] = priority
    if rid is not None:
        headers["X-Request-Id"] = rid
    with s.client(user, timeout_s=timeout_s) as c:
        return c.post("/v1/chat/completions", json=body(**kw), headers=headers)


# ------------------------------------------------------------------ classes and header


@pytest.mark.parametrize(("header", "served", "vllm_priority"), [
    ("high", "high", 0), ("interactive", "high", 0), ("normal", "normal", 1),
    ("low", "low", 2), ("batch", "low", 2), ("Batch", "low", 2), ("HIGH", "high", 0),
])
def test_x_priority_header_is_honoured(main: Setup, header: str, served: str,
                                       vllm_priority: int) -> None:
    r = post(main, priority=header)
    assert r.status_code == 200, r.text
    assert r.headers["x-priority"] == served
    assert sent_priority(main.fake, r.headers["x-request-id"]) == vllm_priority
    assert main.h.wait_row(r.headers["x-request-id"])["priority"] == served


def test_streaming_response_carries_x_priority(main: Setup) -> None:
    with main.client() as c, c.stream("POST", "/v1/chat/completions",
                                      json=body(tokens=3, stream=True),
                                      headers={"X-Priority": "batch"}) as r:
        r.read()
    assert r.status_code == 200
    assert r.headers["x-priority"] == "low"
    assert sent_priority(main.fake, r.headers["x-request-id"]) == 2


@pytest.mark.parametrize("header", ["urgent", "0", "high,low", "critical"])
def test_invalid_x_priority_is_a_400_in_openai_shape(main: Setup, header: str) -> None:
    before = len(main.fake.requests)
    r = post(main, priority=header)
    assert_openai_error(r, 400, param="X-Priority", code="invalid_priority")
    assert header in r.json()["error"]["message"]
    assert len(main.fake.requests) == before  # never reached the backend
    row = main.h.wait_row(r.headers["x-request-id"])
    assert row["status"] == 400


@pytest.mark.parametrize(("user", "served", "vllm_priority"), [
    ("alice", "normal", 1),   # a key created with the defaults
    ("batchy", "low", 2),     # --default-priority low
    ("eager", "high", 0),     # --default-priority high
])
def test_key_default_class_applies_without_header(main: Setup, user: str, served: str,
                                                  vllm_priority: int) -> None:
    r = post(main, user)
    assert r.status_code == 200, r.text
    assert r.headers["x-priority"] == served
    assert sent_priority(main.fake, r.headers["x-request-id"]) == vllm_priority


@pytest.mark.parametrize(("header", "served", "vllm_priority"), [
    ("high", "normal", 1), ("interactive", "normal", 1), ("normal", "normal", 1),
    ("low", "low", 2),  # below the ceiling: kept
])
def test_key_ceiling_caps_the_class(main: Setup, header: str, served: str,
                                    vllm_priority: int) -> None:
    r = post(main, "capped", header)
    assert r.status_code == 200, r.text
    assert r.headers["x-priority"] == served
    assert sent_priority(main.fake, r.headers["x-request-id"]) == vllm_priority
    assert main.h.wait_row(r.headers["x-request-id"])["priority"] == served


# ------------------------------------------------------------------ order and headroom


def test_high_is_admitted_before_earlier_queued_low(main: Setup, pool: ThreadPoolExecutor,
                                                    holders: Any) -> None:
    wait_idle(main)
    hs = holders(main)
    hs.hold("high", "high", "high", "high")  # every slot taken
    lows = []
    for i in range(2):
        lows.append(pool.submit(post, main, "bob", "low", rid=f"order-low-{i}"))
        wait_queue(main, low=i + 1)
    high = pool.submit(post, main, "carol", "high", rid="order-high")
    wait_queue(main, high=1, low=2)
    hs.release_all()
    for f in [*lows, high]:
        assert f.result(10.0).status_code == 200
    order = fake_order(main.fake, ["order-low-0", "order-low-1", "order-high"])
    # the two lows may start in the same dispatch and race to the backend
    assert order[0] == "order-high" and sorted(order[1:]) == ["order-low-0", "order-low-1"]


def test_order_is_by_class_then_arrival_with_one_slot(single: Setup, pool: ThreadPoolExecutor,
                                                      holders: Any) -> None:
    """No reserve, one slot: only the class decides, not the headroom."""
    wait_idle(single)
    hs = holders(single)
    hs.hold("low")
    arrivals = [("bob", "low", "one-low-1"), ("bob", "low", "one-low-2"),
                ("bob", "normal", "one-normal"), ("bob", "high", "one-high")]
    futures = []
    for n, (user, prio, rid) in enumerate(arrivals, 1):
        futures.append(pool.submit(post, single, user, prio, rid=rid))
        wait_queue(single, total=n)
    hs.release_all()
    for f in futures:
        assert f.result(10.0).status_code == 200
    assert fake_order(single.fake, [rid for *_, rid in arrivals]) == [
        "one-high", "one-normal", "one-low-1", "one-low-2"]


def test_users_share_a_class_round_robin_not_fifo(single: Setup, pool: ThreadPoolExecutor,
                                                  holders: Any) -> None:
    """VTC through the proxy: equal requests from two users who queue at once alternate."""
    wait_idle(single)
    hs = holders(single)
    hs.hold("high")
    rids = []
    futures = []
    for user in ("carol", "dave"):  # carol's three first, then dave's three
        for i in range(3):
            rid = f"rr-{user}-{i}"
            rids.append(rid)
            futures.append(pool.submit(post, single, user, "normal", rid=rid, tokens=4))
            wait_queue(single, total=len(rids))
    hs.release_all()
    for f in futures:
        assert f.result(10.0).status_code == 200
    users = [rid.split("-")[1] for rid in fake_order(single.fake, rids)]
    assert users == ["carol", "dave", "carol", "dave", "carol", "dave"]


def test_low_never_takes_the_reserved_slots(main: Setup, pool: ThreadPoolExecutor) -> None:
    wait_idle(main)
    peak = {"active": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["active"] = max(peak["active"], main.fake.active)
            time.sleep(0.002)

    watcher = pool.submit(watch)
    try:
        lows = [pool.submit(post, main, "bob", "low", tokens=5, delay_s=0.06) for _ in range(6)]
        wait_until(lambda: main.fake.active == 2, 5.0, "two low requests running")
        wait_queue(main, low=4)
        assert main.fake.active == 2
        # the reserved slots are still there for the better classes, at once
        normal = post(main, "carol", "normal", tokens=1)
        assert normal.status_code == 200
        assert main.h.wait_row(normal.headers["x-request-id"])["queue_ms"] < 100
        for f in lows:
            assert f.result(10.0).status_code == 200
    finally:
        stop.set()
        watcher.result(5.0)
    assert peak["active"] == 2, peak  # capacity 4 - reserved high 1 - reserved normal 1


def test_normal_uses_the_normal_reserve_but_not_the_high_one(
        main: Setup, pool: ThreadPoolExecutor, holders: Any) -> None:
    wait_idle(main)
    hs = holders(main)
    hs.hold("low", "low")                     # low is full (2 of 4)
    hs.hold("normal")                         # the normal reserve: 3 of 4
    waiting = pool.submit(post, main, "bob", "normal", rid="nr-normal")
    wait_queue(main, normal=1)                # the last slot is high's
    high = post(main, "carol", "high", tokens=1)
    assert high.status_code == 200
    assert main.h.wait_row(high.headers["x-request-id"])["queue_ms"] < 100
    assert queue(main)["normal"] == 1
    hs.release_all()
    assert waiting.result(10.0).status_code == 200


# ------------------------------------------------------------------ bounds and timeouts


def test_per_user_queue_bound_is_a_429_with_retry_after(tight: Setup, pool: ThreadPoolExecutor,
                                                        holders: Any) -> None:
    wait_idle(tight)
    hs = holders(tight)
    hs.hold("high", "high", "high")           # normal may not start (limit 3)
    queued = [pool.submit(post, tight, "bob", "normal") for _ in range(2)]
    wait_queue(tight, normal=2)
    r = post(tight, "bob", "normal")
    err = assert_openai_error(r, 429, code="user_queue_full")
    assert int(r.headers["retry-after"]) >= 1
    assert "max_queued_per_user=2" in err["message"]
    assert tight.h.wait_row(r.headers["x-request-id"])["status"] == 429
    # another user still gets in line
    other = pool.submit(post, tight, "carol", "normal")
    wait_queue(tight, normal=3)
    hs.release_all()
    for f in [*queued, other]:
        assert f.result(10.0).status_code == 200


def test_total_queue_bound_is_a_503_with_retry_after(tight: Setup, pool: ThreadPoolExecutor,
                                                     holders: Any) -> None:
    wait_idle(tight)
    hs = holders(tight)
    hs.hold("high", "high", "high")
    queued = [pool.submit(post, tight, user, "normal") for user in ("bob", "bob", "carol")]
    wait_queue(tight, normal=3)
    r = post(tight, "dave", "normal")         # dave has nothing queued: the total is full
    err = assert_openai_error(r, 503, code="queue_full")
    assert int(r.headers["retry-after"]) >= 1
    assert "max_queued_total=3" in err["message"]
    hs.release_all()
    for f in queued:
        assert f.result(10.0).status_code == 200


def test_queue_timeout_is_a_503_with_retry_after(tight: Setup, holders: Any) -> None:
    wait_idle(tight)
    hs = holders(tight)
    hs.hold("high", "high")                   # low may not start (limit 2)
    before = len(tight.fake.requests)
    t0 = time.monotonic()
    r = post(tight, "bob", "low", rid="timeout-low")
    waited = time.monotonic() - t0
    err = assert_openai_error(r, 503, code="queue_timeout")
    assert int(r.headers["retry-after"]) >= 1
    assert "queue_timeout_s=0.5" in err["message"]
    assert 0.45 <= waited < 3.0, waited
    assert all(x["request_id"] != "timeout-low" for x in tight.fake.requests[before:])
    row = tight.h.wait_row("timeout-low")
    assert (row["status"], row["outcome"]) == (503, "queue_timeout")
    hs.release_all()


# ------------------------------------------------------------------ disconnect, audit, stats


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_disconnects_while_queued_leaves_the_queue_at_once(
        main: Setup, holders: Any, stream: bool) -> None:
    wait_idle(main)
    hs = holders(main)
    hs.hold("low", "low")                     # low is full
    rid = f"gone-while-queued-{stream}"
    with main.client("bob", timeout_s=httpx.Timeout(10.0, read=0.5)) as c:

        def send() -> None:
            if stream:
                with c.stream("POST", "/v1/chat/completions", json=body(stream=True),
                              headers={"X-Priority": "low", "X-Request-Id": rid}) as r:
                    r.read()
            else:
                c.post("/v1/chat/completions", json=body(),
                       headers={"X-Priority": "low", "X-Request-Id": rid})

        with pytest.raises(httpx.ReadTimeout):
            send()
        left_at = time.monotonic()
    # it was queued until the client left (the read timeout), then leaves at once
    wait_queue(main, low=0, total=0)
    assert time.monotonic() - left_at < 1.0
    row = main.h.wait_row(rid)
    assert (row["status"], row["outcome"]) == (499, "client_disconnected")
    assert main.h.gw.admissions.admissions[MODEL].stats().removed_total >= 1
    hs.release_all()
    wait_idle(main)
    assert all(x["request_id"] != rid for x in main.fake.requests)


def test_audit_row_records_the_queue_wait(main: Setup, pool: ThreadPoolExecutor,
                                          holders: Any) -> None:
    wait_idle(main)
    at_once = post(main, "bob", "low")
    assert main.h.wait_row(at_once.headers["x-request-id"])["queue_ms"] < 100
    hs = holders(main)
    hs.hold("low", "low")
    queued = pool.submit(post, main, "bob", "low", rid="audit-queued")
    wait_queue(main, low=1)
    time.sleep(0.3)
    hs.release_all()
    assert queued.result(10.0).status_code == 200
    row = main.h.wait_row("audit-queued")
    assert row["queue_ms"] >= 250, row
    assert row["total_ms"] >= row["queue_ms"]


def test_stats_show_queue_depth_per_class_while_requests_wait(
        main: Setup, pool: ThreadPoolExecutor, holders: Any) -> None:
    wait_idle(main)
    hs = holders(main)
    hs.hold("high", "high", "high", "high")
    waiting = [pool.submit(post, main, user, prio)
               for user, prio in [("bob", "low"), ("bob", "low"), ("carol", "normal"),
                                  ("dave", "high")]]
    q = wait_queue(main, high=1, normal=1, low=2, total=4)
    time.sleep(0.2)
    q = queue(main)
    assert (q["high"], q["normal"], q["low"], q["total"]) == (1, 1, 2, 4)
    assert q["oldest_wait_s"]["low"] >= 0.2
    assert q["oldest_wait_s"]["high"] > 0
    r = main.h.client("admin").get("/stats").json()
    assert r["in_flight"]["capacity"] == 4
    assert r["in_flight"]["total"] == 4
    hs.release_all()
    for f in waiting:
        assert f.result(10.0).status_code == 200
    q = wait_queue(main, total=0)
    assert (q["high"], q["normal"], q["low"]) == (0, 0, 0)
    sched = main.h.client("admin").get("/stats").json()["scheduler"]
    assert sched["admitted_total"] >= 4
    assert sched["queue_wait_p95_s"] > 0
