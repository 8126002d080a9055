"""Scraping vLLM's /metrics for its own load (through httpx.MockTransport)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from teamgpu.scheduler import EngineLoad, EngineLoadPoller, fetch_engine_load, parse_engine_load

URL = "http://engine.test/metrics"

# Shaped like vLLM 0.10's exposition: two label sets per gauge, plus a histogram.
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 16.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="demo"} 3.0
vllm:num_requests_waiting{engine="0",model_name="demo-lora"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="demo"} 0.97
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="demo"} 0.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="demo"} 12.0
vllm:time_to_first_token_seconds_count{model_name="demo"} 12.0
vllm:time_to_first_token_seconds_sum{model_name="demo"} 3.5
"""


def test_parse_sums_waiting_and_takes_the_fullest_cache() -> None:
    assert parse_engine_load(METRICS) == EngineLoad(
        num_requests_waiting=5.0, kv_cache_usage_perc=0.97
    )


def test_parse_accepts_the_pre_0_10_cache_gauge() -> None:
    text = (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="m"} 0.0\n'
    )
    assert parse_engine_load(text) == EngineLoad(0.0, 0.5)


def test_parse_without_the_gauges_is_none() -> None:
    assert parse_engine_load("# TYPE up gauge\nup 1\n") is None
    assert parse_engine_load("") is None


def test_parse_rejects_broken_values() -> None:
    with pytest.raises(ValueError, match="not-a-number"):
        parse_engine_load("vllm:num_requests_waiting{model_name=\"m\"} not-a-number\n")


def client_for(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler)


async def test_fetch_returns_the_load() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text=METRICS)

    async with client_for(httpx.MockTransport(handler)) as client:
        assert await fetch_engine_load(client, URL) == EngineLoad(5.0, 0.97)
    assert seen == [URL]


@pytest.mark.parametrize(
    "respond",
    [
        lambda r: httpx.Response(500, text="oops"),
        lambda r: httpx.Response(200, text="<html>not metrics</html>"),
        lambda r: httpx.Response(200, text='vllm:num_requests_waiting{a="b"} x\n'),
    ],
    ids=["status-500", "no-gauges", "unparsable"],
)
async def test_fetch_failures_are_none(respond: object) -> None:
    async with client_for(httpx.MockTransport(respond)) as client:  # type: ignore[arg-type]
        assert await fetch_engine_load(client, URL) is None


async def test_fetch_connection_error_is_none() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with client_for(httpx.MockTransport(refuse)) as client:
        assert await fetch_engine_load(client, URL) is None


async def test_poller_keeps_the_latest_good_load_until_stale() -> None:
    now = [100.0]
    answers = [httpx.Response(200, text=METRICS), httpx.Response(503)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    async with client_for(httpx.MockTransport(handler)) as client:
        poller = EngineLoadPoller(client, URL, interval_ms=100, stale_after_ms=1000,
                                  clock=lambda: now[0])
        assert poller.latest() is None
        assert await poller.poll_once() == EngineLoad(5.0, 0.97)
        assert await poller.poll_once() is None  # a failed scrape ...
        now[0] += 0.5
        assert poller.latest() == EngineLoad(5.0, 0.97)  # ... keeps the last good load
        now[0] += 0.6
        assert poller.latest() is None  # stale: hold nothing back on old data


async def test_poller_run_scrapes_every_interval() -> None:
    scrapes = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal scrapes
        scrapes += 1
        waiting = float(scrapes)
        return httpx.Response(200, text=f"vllm:num_requests_waiting {waiting}\n")

    async with client_for(httpx.MockTransport(handler)) as client:
        poller = EngineLoadPoller(client, URL, interval_ms=10)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert 3 <= scrapes <= 15
    latest = poller.latest()
    assert latest is not None and latest.num_requests_waiting == scrapes


def test_poller_rejects_bad_intervals() -> None:
    with pytest.raises(ValueError, match=r"interval_ms=0, .*must be > 0"):
        EngineLoadPoller(httpx.AsyncClient(), URL, interval_ms=0)
