"""/metrics and /stats served by a real gateway on loopback, after real requests."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from teamgpu.scheduler import Admission, FairQueueConfig, PriorityClass, QueuedRequest
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, assert_openai_error, wait_until

from .conftest import observed_gateway
from .exposition import samples, value

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def scrape(h: Harness, key: str | None = None) -> str:
    r = h.client(key).get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def test_metrics_needs_no_key_by_default(obs: Harness, fake_server: ServerThread) -> None:
    t = scrape(obs, None)
    assert value(t, "teamgpu_backend_up", backend=fake_server.url) == 1
    assert value(t, "teamgpu_inflight_requests", backend=fake_server.url) == 0
    for p in ("high", "normal", "low"):
        assert value(t, "teamgpu_queue_depth", priority=p) == 0
    assert not [n for n, _ in samples(t) if n.startswith("teamgpu_gpu_")]  # no GPU here


def test_metrics_can_require_an_admin_key(fake_server: ServerThread, tmp_path: Path) -> None:
    with observed_gateway(tmp_path, [fake_server.url], metrics_require_key=True) as h:
        assert_openai_error(h.client(None).get("/metrics"), 401)
        assert_openai_error(h.client("user").get("/metrics"), 403, code="permission_denied")
        assert "teamgpu_backend_up" in scrape(h, "admin")


def test_backend_up_follows_health(tmp_path: Path, closed_port_url: str) -> None:
    with observed_gateway(tmp_path, [closed_port_url]) as h:
        assert value(scrape(h), "teamgpu_backend_up", backend=closed_port_url) == 0


def test_inflight_moves_while_a_stream_is_open(obs: Harness, fake_server: ServerThread) -> None:
    body = {**CHAT, "stream": True, "fake": {"tokens": 6, "delay_s": 0.1}}
    done = threading.Event()

    def stream() -> None:
        with obs.client("user").stream("POST", "/v1/chat/completions", json=body) as r:
            r.read()
        done.set()

    threading.Thread(target=stream, daemon=True).start()
    wait_until(lambda: value(scrape(obs), "teamgpu_inflight_requests",
                             backend=fake_server.url) == 1, what="in-flight 1")
    stats = obs.client("admin").get("/stats").json()
    assert stats["in_flight"]["total"] == 1
    assert stats["in_flight"]["by_backend"] == {fake_server.url: 1}
    assert done.wait(10)
    wait_until(lambda: value(scrape(obs), "teamgpu_inflight_requests",
                             backend=fake_server.url) == 0, what="in-flight 0")


def test_queue_depth_while_requests_wait(obs: Harness) -> None:
    """A real Admission on the gateway: requests beyond its one slot wait, per class."""
    cfg = FairQueueConfig(reserved_slots_high=0, reserved_slots_normal=0)
    waiting: list[asyncio.Task[Any]] = []

    async def fill() -> Any:
        adm = Admission(cfg, capacity=1)
        obs.gw.admissions.admissions["queued"] = adm
        lease = await adm.acquire(QueuedRequest("r0", "alice", PriorityClass.HIGH))
        for i, (user, cls) in enumerate([("alice", PriorityClass.HIGH), ("bob", PriorityClass.LOW),
                                         ("bob", PriorityClass.LOW),
                                         ("carol", PriorityClass.NORMAL)]):
            waiting.append(asyncio.ensure_future(
                adm.acquire(QueuedRequest(f"r{i + 1}", user, cls))))
        await asyncio.sleep(0.01)
        return lease

    lease = obs.thread.call(fill())
    try:
        t = scrape(obs)
        assert [value(t, "teamgpu_queue_depth", priority=p) for p in ("high", "normal", "low")
                ] == [1, 1, 2]
        q = obs.client("admin").get("/stats").json()["queue"]
        assert (q["high"], q["normal"], q["low"], q["total"]) == (1, 1, 2, 4)
        assert q["oldest_wait_s"]["low"] > 0

        async def release_all() -> None:
            lease.release()
            for next_admitted in asyncio.as_completed(waiting):  # in the queue's order
                (await next_admitted).release()

        obs.thread.call(release_all())
        t = scrape(obs)
        assert [value(t, "teamgpu_queue_depth", priority=p) for p in ("high", "normal", "low")
                ] == [0, 0, 0]
        sched = obs.client("admin").get("/stats").json()["scheduler"]
        assert sched["admitted_total"] == 5
    finally:
        obs.gw.admissions.admissions.pop("queued", None)


def test_stats_needs_an_admin_key(obs: Harness) -> None:
    assert_openai_error(obs.client(None).get("/stats"), 401)
    assert_openai_error(obs.client("user").get("/stats"), 403, code="permission_denied")


def test_stats_reports_today_per_user_from_the_audit_log(obs: Harness) -> None:
    bob, _ = obs.gw.keys.create("bob")
    alice = obs.client("user")
    usage = {"alice": [0, 0], "bob": [0, 0]}
    for c, user, n in ((alice, "alice", 3), (obs.client(bob), "bob", 1)):
        for i in range(n):
            u = c.post("/v1/chat/completions", json={**CHAT, "fake": {"tokens": i + 2}}
                       ).json()["usage"]
            usage[user][0] += u["prompt_tokens"]
            usage[user][1] += u["completion_tokens"]
    r = alice.post("/v1/chat/completions", json={**CHAT, "fake": {"status": 400}})
    assert r.status_code == 400
    assert obs.client("nope").get("/v1/models").status_code == 401
    s = obs.client("admin").get("/stats").json()
    assert s["users_today"]["alice"] == {
        "requests": 4, "prompt_tokens": usage["alice"][0],
        "completion_tokens": usage["alice"][1], "total_tokens": sum(usage["alice"]),
        "errors": 1}
    assert s["users_today"]["bob"]["requests"] == 1
    assert next(iter(s["users_today"])) == "alice"  # most tokens first
    rows = obs.rows()
    assert [r["status"] for r in rows if r["endpoint"] == "models"] == [401]  # audited...
    rows = [r for r in rows if r["endpoint"] != "models"]  # ...but not usage
    assert s["today"]["requests"] == len(rows) == s["requests_total"] == 5
    assert s["today"]["total_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"]
                                             for r in rows)
    assert s["today"]["date"] == datetime.now(UTC).date().isoformat()
    # the all-time fields of the first /stats are still there, same shape
    assert s["users"]["alice"] == {"requests": 4, "prompt_tokens": usage["alice"][0],
                                   "completion_tokens": usage["alice"][1]}
    assert s["gpu"] == []  # no GPU on this machine
    # the five requests that reached the backend went through the scheduler
    assert s["scheduler"]["admitted_total"] == 5 and s["queue"]["total"] == 0
    assert s["backends"][0]["up"] is True and s["backends"][0]["models"] == [MODEL]
    assert s["ttft"]["window_s"] == 300 and len(s["ttft"]["per_minute"]) == 60


def test_stats_ttft_comes_from_the_metrics_window(obs: Harness) -> None:
    m = obs.gw.metrics
    now = time.time()
    for ttft in (0.05, 0.1, 0.2, 1.5):
        m.ttft_window.add(ttft, now)
    t = obs.client("admin").get("/stats").json()["ttft"]
    assert (t["count"], t["p50_s"], t["p95_s"]) == (4, 0.1, 1.5)
    assert t["per_minute"][-1]["count"] == 4


# ------------------------------------------------------------- through the request path


def _delta(before: str, after: str, name: str, **labels: str) -> float:
    return (value(after, name, **labels) or 0.0) - (value(before, name, **labels) or 0.0)


def test_requests_tokens_and_latencies_move_after_real_requests(obs: Harness) -> None:
    before = scrape(obs)
    c = obs.client("user")
    u = c.post("/v1/chat/completions", json={**CHAT, "fake": {"tokens": 5}}).json()["usage"]
    with c.stream("POST", "/v1/chat/completions",
                  json={**CHAT, "stream": True, "fake": {"tokens": 6, "delay_s": 0.02}}) as r:
        r.read()
        rid = r.headers["x-request-id"]
    obs.wait_row(rid)
    stream_row = obs.rows(rid)[0]
    assert obs.client("nope").post("/v1/chat/completions", json=CHAT).status_code == 401
    after = scrape(obs)
    lab = {"user": "alice", "model": MODEL, "endpoint": "chat/completions", "priority": "normal"}
    assert _delta(before, after, "teamgpu_requests_total", **lab, status="200") == 2
    assert _delta(before, after, "teamgpu_tokens_total", user="alice", model=MODEL,
                  kind="completion") == u["completion_tokens"] + stream_row["completion_tokens"]
    assert _delta(before, after, "teamgpu_tokens_total", user="alice", model=MODEL,
                  kind="prompt") == u["prompt_tokens"] + stream_row["prompt_tokens"]
    mp = {"model": MODEL, "priority": "normal"}
    assert _delta(before, after, "teamgpu_time_to_first_token_seconds_count", **mp) == 2
    assert _delta(before, after, "teamgpu_request_duration_seconds_count", **mp) == 2
    # one gap per token after the first; the first chunks may be read before the relay
    assert _delta(before, after, "teamgpu_inter_token_latency_seconds_count", **mp) >= 4
    unauth = [v for (n, labels), v in samples(after).items()
              if n == "teamgpu_requests_total" and ("status", "401") in labels]
    assert unauth == [1.0]
    s = obs.client("admin").get("/stats").json()
    assert s["ttft"]["count"] >= 2


def test_rate_limited_counts_refusals(fake_server: ServerThread, tmp_path: Path) -> None:
    with observed_gateway(tmp_path, [fake_server.url], default_rpm=1) as h:
        c = h.client("user")
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 429
        t = scrape(h)
        assert value(t, "teamgpu_rate_limited_total", user="alice", limit="requests") == 1


def test_metrics_endpoint_is_cheap(obs: Harness) -> None:
    with httpx.Client(base_url=obs.url, trust_env=False) as c:
        t0 = time.perf_counter()
        for _ in range(20):
            assert c.get("/metrics").status_code == 200
        per_scrape_s = (time.perf_counter() - t0) / 20
    assert per_scrape_s < 0.05, per_scrape_s


def test_a_made_up_model_name_never_becomes_a_label(obs: Harness) -> None:
    """Label values are bounded: a client's model name is a label only once it resolved to
    a served model; the audit row still says what was asked for."""
    names = [f"attacker-{i}" for i in range(3)]
    for name in names:
        r = obs.client("user").post("/v1/chat/completions",
                                    json={**CHAT, "model": name})
        assert_openai_error(r, 404, code="model_not_found")
        assert obs.wait_row(r.headers["x-request-id"])["model"] == name
    t = scrape(obs)
    assert not any("attacker" in line for line in t.splitlines()), \
        [line for line in t.splitlines() if "attacker" in line][:3]
    unknown = value(t, "teamgpu_requests_total", user="alice", model="unknown",
                    endpoint="chat/completions", priority="none", status="404")
    assert unknown is not None and unknown >= 3
