"""The scheduler in front of a real vLLM (CPU, demo model): the engine accepts the
``priority`` values the gateway sends, and an interactive request finds a free slot while
a batch flood is queued. Few slots, short generations: seconds, not minutes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

import httpx
import pytest

from teamgpu.scheduler import PriorityClass
from tests.support.harness import Harness, start_gateway, wait_until

from .conftest import VllmEngine


class SchedulingSettings(TypedDict):
    max_inflight_per_backend: int
    reserved_slots_high: int
    reserved_slots_normal: int
    aging_s: float


# low may start below 4 - 1 - 1 = 2 in flight, normal below 3, high below 4
SETTINGS: SchedulingSettings = {"max_inflight_per_backend": 4, "reserved_slots_high": 1,
                                "reserved_slots_normal": 1, "aging_s": 3600.0}


@pytest.fixture(scope="module")
def gw(vllm_engine: VllmEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with start_gateway(tmp_path_factory.mktemp("e2e-sched"), [vllm_engine.base_url],
                       **SETTINGS) as h:
        yield h


def complete(gw: Harness, model: str, priority: str, max_tokens: int) -> httpx.Response:
    with gw.client(timeout_s=120.0) as c:
        return c.post("/v1/completions", headers={"X-Priority": priority},
                      json={"model": model, "prompt": "Once upon a time", "temperature": 0,
                            "max_tokens": max_tokens, "ignore_eos": True})


@pytest.mark.parametrize(("priority", "served"), [("interactive", "high"), ("normal", "normal"),
                                                  ("batch", "low")])
def test_vllm_accepts_each_class_priority(gw: Harness, vllm_engine: VllmEngine,
                                          priority: str, served: str) -> None:
    r = complete(gw, vllm_engine.served_model_name, priority, 4)
    assert r.status_code == 200, r.text
    assert r.headers["x-priority"] == served
    assert r.json()["usage"]["completion_tokens"] == 4


def test_interactive_request_skips_a_queued_batch_flood(gw: Harness,
                                                        vllm_engine: VllmEngine) -> None:
    model = vllm_engine.served_model_name
    # Clients are made before the flood starts and each low request generates 256 tokens
    # (a few seconds on the CPU): on a 2-core machine busy with vLLM the six requests
    # reach the gateway up to ~1.5 s apart (measured), so a short flood could drain two
    # at a time before four were ever queued together.
    clients = [gw.client(timeout_s=180.0) for _ in range(6)]

    def low(c: httpx.Client) -> httpx.Response:
        return c.post("/v1/completions", headers={"X-Priority": "low"},
                      json={"model": model, "prompt": "Once upon a time", "temperature": 0,
                            "max_tokens": 256, "ignore_eos": True})

    def queued_low() -> int:
        adm = gw.gw.admissions.admissions.get(model)
        return 0 if adm is None else adm.stats().queued[PriorityClass.LOW]

    with ThreadPoolExecutor(max_workers=6) as pool:
        flood = [pool.submit(low, c) for c in clients]
        # two low requests run; the others wait behind them (more when vLLM still
        # reports waiting requests from an earlier test and the gateway holds low back)
        wait_until(lambda: queued_low() >= 3, 60.0, "three batch requests queued behind two")
        t0 = time.monotonic()
        r = complete(gw, model, "high", 8)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.headers["x-priority"] == "high"
        row = gw.wait_row(r.headers["x-request-id"])
        assert row["queue_ms"] < 100, row  # a reserved slot was free
        assert queued_low() >= 1  # it finished while the flood still waited
        assert took < 10.0
        for f in flood:
            assert f.result(180.0).status_code == 200
