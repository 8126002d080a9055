"""GatewayMetrics used directly: every metric moves as it should."""

from __future__ import annotations

import logging
from typing import TypedDict

import pytest

from teamgpu.metrics import GatewayMetrics, GpuSample, NvmlSampler
from teamgpu.metrics.prometheus import TTFT_BUCKETS_S

from .exposition import samples, value
from .fake_nvml import FakeNvml

T0 = 1_800_000_000.0


def done(m: GatewayMetrics, **kw: object) -> None:
    args: dict[str, object] = {"user": "alice", "model": "m", "endpoint": "chat/completions",
                                   "priority": "high", "status": 200, "prompt_tokens": 10,
                                   "completion_tokens": 20, "ttft_s": 0.08, "duration_s": 0.6,
                                   "queue_wait_s": 0.002}
    args.update(kw)
    m.request_done(**args)  # type: ignore[arg-type]


def text(m: GatewayMetrics) -> str:
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    return body.decode()


def test_requests_and_tokens_count_per_user_model_and_status() -> None:
    m = GatewayMetrics()
    done(m)
    done(m, prompt_tokens=5, completion_tokens=1)
    done(m, user="bob", status=429, prompt_tokens=0, completion_tokens=0, ttft_s=None)
    t = text(m)
    ok = {"user": "alice", "model": "m", "endpoint": "chat/completions", "priority": "high"}
    assert value(t, "teamgpu_requests_total", **ok, status="200") == 2
    assert value(t, "teamgpu_requests_total", **{**ok, "user": "bob"}, status="429") == 1
    assert value(t, "teamgpu_tokens_total", user="alice", model="m", kind="prompt") == 15
    assert value(t, "teamgpu_tokens_total", user="alice", model="m", kind="completion") == 21
    assert value(t, "teamgpu_tokens_total", user="bob", model="m", kind="prompt") is None


def test_unauthenticated_and_unresolved_requests_get_fixed_label_values() -> None:
    m = GatewayMetrics()
    done(m, user=None, model=None, priority=None, status=401, prompt_tokens=0,
         completion_tokens=0, ttft_s=None, queue_wait_s=None)
    t = text(m)
    assert value(t, "teamgpu_requests_total", user="anonymous", model="unknown",
                 endpoint="chat/completions", priority="none", status="401") == 1


def test_histograms_observe_in_seconds_with_interactive_buckets() -> None:
    m = GatewayMetrics()
    done(m, ttft_s=0.08, duration_s=0.6, queue_wait_s=0.002)
    done(m, ttft_s=2.0, duration_s=30.0, queue_wait_s=None)
    done(m, ttft_s=None, duration_s=0.01, queue_wait_s=None)  # an error: no token
    m.inter_token(model="m", priority="high", gap_s=0.04)
    m.inter_token(model="m", priority="high", gap_s=0.3)
    t = text(m)
    mp = {"model": "m", "priority": "high"}
    assert value(t, "teamgpu_time_to_first_token_seconds_count", **mp) == 2
    assert value(t, "teamgpu_time_to_first_token_seconds_sum", **mp) == pytest.approx(2.08)
    assert value(t, "teamgpu_time_to_first_token_seconds_bucket", **mp, le="0.025") == 0
    assert value(t, "teamgpu_time_to_first_token_seconds_bucket", **mp, le="0.1") == 1
    assert value(t, "teamgpu_time_to_first_token_seconds_bucket", **mp, le="2.5") == 2
    assert value(t, "teamgpu_time_to_first_token_seconds_bucket", **mp, le="60.0") == 2
    assert value(t, "teamgpu_request_duration_seconds_count", **mp) == 3
    assert value(t, "teamgpu_queue_wait_seconds_count", **mp) == 1
    assert value(t, "teamgpu_queue_wait_seconds_bucket", **mp, le="0.005") == 1
    assert value(t, "teamgpu_inter_token_latency_seconds_count", **mp) == 2
    assert value(t, "teamgpu_inter_token_latency_seconds_bucket", **mp, le="0.05") == 1
    assert TTFT_BUCKETS_S[0] == 0.025 and TTFT_BUCKETS_S[-1] == 60.0


def test_rate_limited_counts_per_user_and_limit() -> None:
    m = GatewayMetrics()
    m.rate_limited(user="alice", limit="requests")
    m.rate_limited(user="alice", limit="requests")
    m.rate_limited(user="bob", limit="daily_tokens")
    t = text(m)
    assert value(t, "teamgpu_rate_limited_total", user="alice", limit="requests") == 2
    assert value(t, "teamgpu_rate_limited_total", user="bob", limit="daily_tokens") == 1


class GaugeState(TypedDict):
    depth: dict[str, int]
    inflight: dict[str, int]
    up: dict[str, bool]


def test_gauges_are_read_at_scrape_time() -> None:
    state: GaugeState = {"depth": {"high": 1, "low": 7}, "inflight": {"http://a": 3},
                         "up": {"http://a": True, "http://b": False}}
    m = GatewayMetrics(queue_depth=lambda: state["depth"], inflight=lambda: state["inflight"],
                       backend_up=lambda: state["up"])
    t = text(m)
    assert value(t, "teamgpu_queue_depth", priority="high") == 1
    assert value(t, "teamgpu_queue_depth", priority="normal") == 0  # left out: 0
    assert value(t, "teamgpu_queue_depth", priority="low") == 7
    assert value(t, "teamgpu_inflight_requests", backend="http://a") == 3
    assert value(t, "teamgpu_backend_up", backend="http://a") == 1
    assert value(t, "teamgpu_backend_up", backend="http://b") == 0
    state["depth"] = {}
    state["inflight"] = {"http://a": 0}
    state["up"]["http://b"] = True
    t = text(m)
    assert value(t, "teamgpu_queue_depth", priority="low") == 0
    assert value(t, "teamgpu_inflight_requests", backend="http://a") == 0
    assert value(t, "teamgpu_backend_up", backend="http://b") == 1


def test_a_broken_source_is_left_out_and_the_rest_still_scrapes(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    m = GatewayMetrics(queue_depth=broken, inflight=lambda: {"http://a": 2})
    with caplog.at_level(logging.ERROR, logger="teamgpu.metrics"):
        t = text(m)
    assert value(t, "teamgpu_queue_depth", priority="high") is None
    assert value(t, "teamgpu_inflight_requests", backend="http://a") == 2
    assert "queue depth" in caplog.text


def test_gpu_gauges_are_absent_without_a_gpu() -> None:
    m = GatewayMetrics(gpu=NvmlSampler())  # the real NVML: no driver on this machine
    t = text(m)
    assert not [n for n, _ in samples(t) if n.startswith("teamgpu_gpu_")]
    assert m.gpu_samples() == []


def test_gpu_gauges_per_gpu_with_nvml() -> None:
    m = GatewayMetrics(gpu=NvmlSampler(nvml=FakeNvml()))
    t = text(m)
    g = {"gpu": "0", "uuid": "GPU-00000000-1111-2222-3333-444444444444", "name": "NVIDIA L4"}
    assert value(t, "teamgpu_gpu_utilization_percent", **g) == 37
    assert value(t, "teamgpu_gpu_memory_used_bytes", **g) == 12 * 1024**3
    assert value(t, "teamgpu_gpu_memory_total_bytes", **g) == 24 * 1024**3
    assert value(t, "teamgpu_gpu_temperature_celsius", **g) == 61
    assert value(t, "teamgpu_gpu_power_watts", **g) == 72.5


def test_a_gpu_callable_works_too_and_missing_fields_are_left_out() -> None:
    sample = GpuSample(index=0, name="X", uuid=None, utilization_percent=10.0,
                       memory_used_bytes=None, memory_total_bytes=None, temperature_c=None,
                       power_w=None)
    t = text(GatewayMetrics(gpu=lambda: [sample]))
    assert value(t, "teamgpu_gpu_utilization_percent", gpu="0", uuid="", name="X") == 10
    assert "teamgpu_gpu_power_watts" not in t


def test_two_instances_share_nothing() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    done(a)
    assert value(text(b), "teamgpu_requests_total", user="alice", model="m",
                 endpoint="chat/completions", priority="high", status="200") is None


def test_no_created_series() -> None:
    m = GatewayMetrics()
    done(m)
    m.rate_limited(user="a", limit="tokens")
    assert "_created" not in text(m)


def test_request_done_feeds_the_ttft_window() -> None:
    clock = [T0]
    m = GatewayMetrics(wall_clock=lambda: clock[0])
    for ttft in (0.1, 0.2, 0.3, 0.4, 5.0):
        done(m, ttft_s=ttft)
    done(m, ttft_s=None)  # no token: not a TTFT sample
    s = m.ttft_summary()
    assert (s.count, s.p50_s, s.p95_s) == (5, 0.3, 5.0)
    assert m.ttft_per_minute()[-1].count == 5
    clock[0] += 301
    assert m.ttft_summary().count == 0


def test_token_gap_observer_spreads_gaps_over_tokens_of_one_read() -> None:
    m = GatewayMetrics()
    clock = [10.0]
    observe = m.token_gap_observer(model="m", priority="low", clock=lambda: clock[0])
    observe(0)  # a read without content: nothing
    observe(1)  # the first token starts the clock, no gap yet
    clock[0] += 0.04
    observe(2)  # one gap of 40 ms
    observe(2)  # no new token
    clock[0] += 0.27
    observe(5)  # three tokens in one read: three gaps of 90 ms
    t = text(m)
    mp = {"model": "m", "priority": "low"}
    assert value(t, "teamgpu_inter_token_latency_seconds_count", **mp) == 4
    assert value(t, "teamgpu_inter_token_latency_seconds_sum", **mp) == pytest.approx(0.31)
    assert value(t, "teamgpu_inter_token_latency_seconds_bucket", **mp, le="0.05") == 1
    assert value(t, "teamgpu_inter_token_latency_seconds_bucket", **mp, le="0.1") == 4
