"""The model and batch-job gauges: GatewayMetrics fed directly, then a real gateway with a
batch job running against the fake backend and models that are not ready (declared on a
backend where nothing listens, one of them reported sleeping by a stand-in engine host)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from teamgpu.batch import JobStats
from teamgpu.metrics import GatewayMetrics
from teamgpu.metrics.prometheus import BATCH_STATUSES, MODEL_STATES
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, start_gateway, wait_until
from tests.support.observed import StandInHost, batch_stats, chat_lines, submit_batch

from .exposition import samples, value

#: two items at a time (4 slots less the two reserves), so a job of ten takes five rounds
SLOW_BATCH: dict[str, Any] = {"batch_poll_interval_s": 0.1, "max_inflight_per_backend": 4,
                              "reserved_slots_high": 1, "reserved_slots_normal": 1}
STARTS = {"count": 2, "last_wait_s": 4.2, "waiting": 0}


def text(m: GatewayMetrics) -> str:
    return m.render()[0].decode()


def job(batch_id: str, status: str, *, done: int = 0, eta_s: float | None = None,
        user: str = "alice", finished_at: float | None = None,
        paused_until: float | None = None) -> JobStats:
    return {"id": batch_id, "user": user, "endpoint": "/v1/chat/completions",
            "status": status,
            "items": {"total": 10, "queued": 10 - done - 2, "in_flight": 2, "done": done,
                      "failed": 0},
            "tokens": {"prompt": 0, "completion": 0, "total": 0}, "started_at": 1.0,
            "finished_at": finished_at, "eta_s": eta_s, "paused_until": paused_until}


def series(t: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples(t).items() if n == name}


# --------------------------------------------------------------------------- direct


def test_model_state_is_one_series_per_state_with_1_for_the_current_one() -> None:
    models = [
        {"name": "chat", "state": "ready", "in_flight": 3, "queued": 5, "starts": None},
        {"name": "embed", "state": "sleeping", "in_flight": 0, "queued": 1, "starts": STARTS},
        {"name": "odd", "state": "draining", "in_flight": 0, "queued": 0, "starts": None},
    ]
    t = text(GatewayMetrics(models=lambda: models))
    for st in MODEL_STATES:
        assert value(t, "teamgpu_model_state", model="chat", state=st) == (st == "ready")
        assert value(t, "teamgpu_model_state", model="embed", state=st) == (st == "sleeping")
        assert value(t, "teamgpu_model_state", model="odd", state=st) == 0
    # a state the list does not know yet still shows, rather than a model in no state
    assert value(t, "teamgpu_model_state", model="odd", state="draining") == 1
    assert value(t, "teamgpu_model_inflight_requests", model="chat") == 3
    assert value(t, "teamgpu_model_queue_depth", model="chat") == 5
    assert value(t, "teamgpu_model_queue_depth", model="embed") == 1
    # a counter: only models that start on demand have one
    assert value(t, "teamgpu_model_starts_total", model="embed") == 2
    assert value(t, "teamgpu_model_starts_total", model="chat") is None
    assert "# TYPE teamgpu_model_starts_total counter" in t


def test_batch_items_and_eta_only_for_active_jobs_and_jobs_by_status() -> None:
    now = 1_800_000_000.0
    jobs = [job("batch_a", "in_progress", done=4, eta_s=12.5),
            job("batch_b", "validating", user="bob"),
            job("batch_c", "completed", done=8, finished_at=2.0),
            # the runner's ETA of a job paused ten more minutes counts the pause
            job("batch_d", "in_progress", done=3, eta_s=602.0, paused_until=now + 600)]
    t = text(GatewayMetrics(batches=lambda: jobs, wall_clock=lambda: now))
    a = {"batch_id": "batch_a", "user": "alice"}
    assert value(t, "teamgpu_batch_items", **a, state="queued") == 4
    assert value(t, "teamgpu_batch_items", **a, state="in_flight") == 2
    assert value(t, "teamgpu_batch_items", **a, state="done") == 4
    assert value(t, "teamgpu_batch_items", **a, state="failed") == 0
    assert value(t, "teamgpu_batch_eta_seconds", **a) == 12.5
    assert value(t, "teamgpu_batch_items", batch_id="batch_b", user="bob", state="queued") == 8
    assert value(t, "teamgpu_batch_eta_seconds", batch_id="batch_b", user="bob") is None
    # paused for ten more minutes by a key limit: it cannot finish before that
    assert value(t, "teamgpu_batch_eta_seconds", batch_id="batch_d", user="alice") == 602
    # an ended job has no per-job series (bounded cardinality), only its status count
    assert not [labels for labels in series(t, "teamgpu_batch_items")
                if ("batch_id", "batch_c") in labels]
    jobs_by_status = {dict(k)["status"]: v for k, v in series(t, "teamgpu_batch_jobs").items()}
    assert jobs_by_status == {**dict.fromkeys(BATCH_STATUSES, 0.0), "in_progress": 2.0,
                              "validating": 1.0, "completed": 1.0}


def test_without_sources_the_families_are_absent_and_a_broken_one_is_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    assert "teamgpu_model_" not in text(GatewayMetrics())
    assert "teamgpu_batch_" not in text(GatewayMetrics())

    def broken() -> list[JobStats]:
        raise RuntimeError("boom")

    # a source that raises, and one whose items lack a key: both left out, logged
    m = GatewayMetrics(models=lambda: [{"name": "x"}], batches=broken,
                       inflight=lambda: {"http://a": 1})
    with caplog.at_level(logging.ERROR, logger="teamgpu.metrics"):
        t = text(m)
    assert "teamgpu_model_state{" not in t and "teamgpu_batch_jobs{" not in t
    assert value(t, "teamgpu_inflight_requests", backend="http://a") == 1
    assert "reading models failed" in caplog.text and "reading batch jobs failed" in caplog.text


# --------------------------------------------------------------------------- a gateway


def test_a_gateway_exports_its_models_and_a_running_batch(
        fake_server: ServerThread, closed_port_url: str, tmp_path: Path) -> None:
    host = StandInHost({"sleepy": "sleeping"}, {"sleepy": STARTS})
    with start_gateway(tmp_path / "gw", [fake_server.url], host=host,
                       declared={closed_port_url: ["sleepy", "gone"]}, **SLOW_BATCH) as h:
        batch_id = submit_batch(h, h.user_key, chat_lines(10, tokens=2, delay_s=0.3))
        running = batch_stats(h, batch_id, done_at_least=3)
        t = scrape(h)
        assert running["status"] == "in_progress"

        # models: the fake's model is ready, the declared ones are not
        for model, current in ((MODEL, "ready"), ("sleepy", "sleeping"), ("gone", "down")):
            for st in MODEL_STATES:
                assert value(t, "teamgpu_model_state", model=model, state=st) == (
                    st == current), (model, st)
        assert value(t, "teamgpu_model_starts_total", model="sleepy") == 2
        assert value(t, "teamgpu_model_starts_total", model=MODEL) is None
        # one scrape reads one moment: the model's in flight is its backend's, its queue
        # the scheduler's
        assert value(t, "teamgpu_model_inflight_requests", model=MODEL) == value(
            t, "teamgpu_inflight_requests", backend=fake_server.url)
        assert value(t, "teamgpu_model_queue_depth", model=MODEL) == sum(
            v for v in series(t, "teamgpu_queue_depth").values())
        assert value(t, "teamgpu_model_inflight_requests", model="gone") == 0

        # the job: its items add up, at most two in flight, an ETA once items finished
        b = {"batch_id": batch_id, "user": "alice"}
        items = {st: value(t, "teamgpu_batch_items", **b, state=st)
                 for st in ("queued", "in_flight", "done", "failed")}
        assert sum(v or 0 for v in items.values()) == 10, items
        assert items["done"] is not None and items["done"] >= 3
        assert items["in_flight"] is not None and items["in_flight"] <= 2
        assert items["failed"] == 0
        eta = value(t, "teamgpu_batch_eta_seconds", **b)
        assert eta is not None and 0 <= eta < 60
        assert value(t, "teamgpu_batch_jobs", status="in_progress") == 1

        # ended: its per-job series are gone, it is counted as completed
        wait_until(lambda: batch_stats(h, batch_id)["status"] == "completed", 20,
                   "the batch to complete")
        t = scrape(h)
        assert not [k for k in series(t, "teamgpu_batch_items") if ("batch_id", batch_id) in k]
        assert value(t, "teamgpu_batch_eta_seconds", **b) is None
        assert value(t, "teamgpu_batch_jobs", status="completed") == 1
        assert value(t, "teamgpu_batch_jobs", status="in_progress") == 0


def scrape(h: Harness) -> str:
    r = h.client(None).get("/metrics")
    assert r.status_code == 200, r.text
    return r.text
