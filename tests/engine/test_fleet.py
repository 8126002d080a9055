"""EngineFleet against fake vLLM processes (tests/engine/fake_engine.py), no vLLM needed.

Every engine is a real process started by the supervisor's real command line; time that
matters (idleness, LRU order, retry windows) comes from a fake clock, and memory from an
injected MemAvailable, so nothing here sleeps for long.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from teamgpu.engine.errors import (
    EngineStartError,
    MemoryPlanError,
    ModelStartFailed,
    ModelStartTimeout,
    ModelUnavailableError,
    NoRoomError,
    UnknownModelError,
)
from teamgpu.engine.fleet import EngineFleet
from teamgpu.engine.memory import CPU_ENGINE_OVERHEAD_BYTES, GiB
from teamgpu.engine.supervisor import EngineState
from teamgpu.settings import ModelConfig
from tests.engine.processes import child_of, controls, launches, wait_until_dead

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

# A generating model on the CPU takes 1 GiB of KV cache + the engine overhead (fake models
# have no weight files); 1 GiB of MemAvailable is kept for the system.
ENGINE_BYTES = 1 * GiB + CPU_ENGINE_OVERHEAD_BYTES
ROOM_FOR_TWO = 2 * ENGINE_BYTES + 1 * GiB + GiB // 2


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


FleetFactory = Callable[..., EngineFleet]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def fleets() -> AsyncIterator[list[EngineFleet]]:
    """Fleets registered here are stopped after the test, whatever happened."""
    created: list[EngineFleet] = []
    yield created
    for fleet in created:
        await fleet.stop()


@pytest.fixture
def make_fleet(tmp_path: Path, fake_env: dict[str, str], clock: FakeClock,
               fleets: list[EngineFleet]) -> FleetFactory:
    def factory(*models: ModelConfig, device: str = "cpu", mem_bytes: int = 100 * GiB,
                **options: Any) -> EngineFleet:
        mem = options.pop("mem_available", lambda: mem_bytes)
        fleet = EngineFleet(
            list(models), python=Path(sys.executable), device=device,  # type: ignore[arg-type]
            log_dir=tmp_path / "logs", mem_available=mem, clock=clock, env=fake_env,
            start_timeout_s=20.0,
            supervisor_options={"health_interval_s": 0.05, "backoff_initial_s": 0.1},
            **options)
        fleets.append(fleet)
        return fleet

    return factory


def model(name: str, *, on_demand: bool = False, delay_s: float | None = None,
          engine_args: tuple[str, ...] = (), **fields: Any) -> ModelConfig:
    """A model whose folder does not exist (no weights, no template) for the fake."""
    args = [f"--fake-delay-s={delay_s}"] if delay_s is not None else []
    return ModelConfig(name=name, model=f"/nonexistent/{name}", on_demand=on_demand,
                       engine_args=[*args, *engine_args], **fields)


def served_names(records: Path) -> list[str]:
    """The served model name of every fake-engine launch, in order."""
    out = []
    for launch in launches(records):
        argv = [str(a) for a in launch["argv"]]  # type: ignore[attr-defined]
        out.append(argv[argv.index("--served-model-name") + 1])
    return out


class StateLog:
    """An on_state callback keeping (name, state) changes, repeats collapsed."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, EngineState]] = []

    def __call__(self, name: str, state: EngineState, message: str) -> None:
        last = [s for n, s in self.changes if n == name]
        if not last or last[-1] is not state:
            self.changes.append((name, state))

    def of(self, name: str) -> list[EngineState]:
        return [s for n, s in self.changes if n == name]


# --- start, states, ports, environment ----------------------------------------------


async def test_start_runs_only_the_models_that_are_not_on_demand(
    make_fleet: FleetFactory, records: Path
) -> None:
    embed = ModelConfig(name="minilm", model="/nonexistent/minilm", roles=["embed"])
    remote = ModelConfig(name="far", backends=["http://10.0.0.9:8000"])
    fleet = make_fleet(model("chat"), embed, model("later", on_demand=True), remote)

    await fleet.start()

    assert fleet.names() == ["chat", "minilm", "later"]  # the remote-only model has none
    assert fleet.states() == {"chat": EngineState.READY, "minilm": EngineState.READY,
                              "later": EngineState.STOPPED}
    assert sorted(served_names(records)) == ["chat", "minilm"]  # started in parallel
    urls = {fleet.base_url(n) for n in fleet.names()}
    assert len(urls) == 3 and all(u.startswith("http://127.0.0.1:") for u in urls)
    kv = {n: fleet.spec(n).env["VLLM_CPU_KVCACHE_SPACE"] for n in fleet.names()}
    assert kv == {"chat": "1", "minilm": "0", "later": "1"}
    async with httpx.AsyncClient() as client:
        for name in ("chat", "minilm"):
            body = (await client.get(f"{fleet.base_url(name)}/v1/models")).json()
            assert body["data"][0]["id"] == name
    with pytest.raises(UnknownModelError, match="far"):
        fleet.state("far")


class OrderLog(StateLog):
    """Every (name, state) change across the fleet, in order."""

    def sequence(self) -> list[tuple[str, EngineState]]:
        return list(self.changes)


@pytest.mark.parametrize("parallel", [True, False])
async def test_start_is_parallel_unless_told_otherwise(
    make_fleet: FleetFactory, parallel: bool
) -> None:
    log = OrderLog()
    fleet = make_fleet(model("a", delay_s=0.3), model("b", delay_s=0.3), on_state=log,
                       parallel_start=parallel)
    await fleet.start()
    order = [(n, s.value) for n, s in log.sequence()]
    if parallel:
        assert order[:2] == [("a", "starting"), ("b", "starting")]
    else:
        assert order == [("a", "starting"), ("a", "ready"), ("b", "starting"), ("b", "ready")]


async def test_an_engine_whose_port_was_taken_while_stopped_gets_another(
    make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(model("od", on_demand=True))
    old_url = fleet.base_url("od")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", fleet.spec("od").port))
        squatter.listen()
        url = await fleet.ensure_ready("od", timeout_s=10)
    assert url != old_url and url == fleet.base_url("od")
    assert fleet.state("od") is EngineState.READY


async def test_a_set_that_does_not_fit_is_refused_before_anything_starts(
    make_fleet: FleetFactory, records: Path
) -> None:
    with pytest.raises(MemoryPlanError, match=r"(?s)a .*b .*c .*total"):
        make_fleet(model("a"), model("b"), model("c"), mem_bytes=ROOM_FOR_TWO)
    assert launches(records) == []


async def test_a_failing_start_stops_the_models_already_started(
    make_fleet: FleetFactory, records: Path
) -> None:
    (records / "fail-b").write_text("ValueError: no such model")
    fleet = make_fleet(model("a"), model("b"))
    with pytest.raises(EngineStartError, match="no such model"):
        await fleet.start()
    assert fleet.states() == {"a": EngineState.STOPPED, "b": EngineState.STOPPED}
    pids = [int(str(launch["pid"])) for launch in launches(records)]
    assert await wait_until_dead(pids) == []


# --- on demand ----------------------------------------------------------------------


async def test_concurrent_first_requests_share_one_start(
    make_fleet: FleetFactory, records: Path
) -> None:
    fleet = make_fleet(model("big", on_demand=True, delay_s=0.5))
    await fleet.start()
    assert fleet.state("big") is EngineState.STOPPED

    urls = await asyncio.gather(*(fleet.ensure_ready("big", timeout_s=10) for _ in range(5)))

    assert set(urls) == {fleet.base_url("big")}
    assert served_names(records) == ["big"]
    assert fleet.state("big") is EngineState.READY


async def test_a_timeout_is_a_clear_error_and_the_start_goes_on(
    make_fleet: FleetFactory, records: Path
) -> None:
    fleet = make_fleet(model("slow", on_demand=True, delay_s=1.0))
    with pytest.raises(ModelStartTimeout, match=r"'slow' is not ready after 0.2 s") as caught:
        await fleet.ensure_ready("slow", timeout_s=0.2)
    assert caught.value.model == "slow"
    assert fleet.state("slow") is EngineState.STARTING

    await fleet.ensure_ready("slow", timeout_s=10)
    assert served_names(records) == ["slow"]  # the second caller joined the first start


async def test_a_failed_start_is_reported_and_not_retried_at_once(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    (records / "fail-flaky").write_text("torch.OutOfMemoryError: no room")
    fleet = make_fleet(model("flaky", on_demand=True), retry_failed_after_s=30.0)

    with pytest.raises(ModelStartFailed, match="exited with status 2") as caught:
        await fleet.ensure_ready("flaky", timeout_s=10)
    assert "no room" in str(caught.value.__cause__)  # the engine's log tail
    with pytest.raises(ModelStartFailed):
        await fleet.ensure_ready("flaky", timeout_s=10)
    assert len(launches(records)) == 1  # the second call did not launch again

    (records / "fail-flaky").unlink()
    clock.advance(31)
    await fleet.ensure_ready("flaky", timeout_s=10)
    assert fleet.state("flaky") is EngineState.READY and len(launches(records)) == 2


async def test_a_model_that_is_not_on_demand_is_not_started_by_a_request(
    make_fleet: FleetFactory, records: Path
) -> None:
    fleet = make_fleet(model("a"))  # start() never called
    with pytest.raises(ModelUnavailableError, match="not on demand"):
        await fleet.ensure_ready("a", timeout_s=1)
    with pytest.raises(ModelUnavailableError, match="ensure_ready first"):
        fleet.begin_request("a")
    assert launches(records) == []


# --- idleness -----------------------------------------------------------------------


async def test_the_reaper_stops_an_idle_on_demand_model_after_its_ttl(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    log = StateLog()
    fleet = make_fleet(model("always"), model("od", on_demand=True, idle_ttl_s=60),
                       on_state=log)
    await fleet.start()
    async with fleet.use("od", timeout_s=10):
        pass
    pid = int(str(launches(records)[-1]["pid"]))

    clock.advance(59)
    assert await fleet.reap_idle() == []
    clock.advance(2)
    assert await fleet.reap_idle() == ["od"]

    assert fleet.state("od") is EngineState.STOPPED
    assert await wait_until_dead([pid, child_of(records, pid)]) == []
    assert log.of("od")[-3:] == [EngineState.STARTING, EngineState.READY, EngineState.STOPPED]
    clock.advance(10_000)
    assert await fleet.reap_idle() == []  # never the model that is not on demand
    assert fleet.state("always") is EngineState.READY


async def test_a_model_with_requests_in_flight_is_never_reaped(
    make_fleet: FleetFactory, clock: FakeClock
) -> None:
    fleet = make_fleet(model("od", on_demand=True, idle_ttl_s=60))
    await fleet.ensure_ready("od", timeout_s=10)
    fleet.begin_request("od")
    clock.advance(3600)
    assert await fleet.reap_idle() == []
    assert fleet.in_flight("od") == 1

    fleet.end_request("od")  # idle from now on
    clock.advance(30)
    assert await fleet.reap_idle() == []
    clock.advance(31)
    assert await fleet.reap_idle() == ["od"]


async def test_run_reaps_on_its_own(make_fleet: FleetFactory, clock: FakeClock) -> None:
    fleet = make_fleet(model("od", on_demand=True, idle_ttl_s=5), reap_interval_s=0.05)
    runner = asyncio.create_task(fleet.run())
    await fleet.ensure_ready("od", timeout_s=10)
    clock.advance(6)
    while fleet.state("od") is not EngineState.STOPPED:
        assert not runner.done()
        await asyncio.sleep(0.02)
    await fleet.stop()
    await asyncio.wait_for(runner, timeout=5)


# --- eviction -----------------------------------------------------------------------


async def test_the_least_recently_used_idle_model_makes_room(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    fleet = make_fleet(model("b", on_demand=True), model("c", on_demand=True),
                       model("d", on_demand=True), mem_bytes=ROOM_FOR_TWO)
    await fleet.ensure_ready("b", timeout_s=10)
    clock.advance(10)
    await fleet.ensure_ready("c", timeout_s=10)
    clock.advance(10)
    async with fleet.use("b", timeout_s=10):  # b is now used more recently than c
        pass

    await fleet.ensure_ready("d", timeout_s=10)

    assert fleet.states() == {"b": EngineState.READY, "c": EngineState.STOPPED,
                              "d": EngineState.READY}
    assert served_names(records) == ["b", "c", "d"]


async def test_nothing_to_evict_is_a_clear_error_and_busy_models_keep_running(
    make_fleet: FleetFactory
) -> None:
    fleet = make_fleet(model("always"), model("b", on_demand=True),
                       model("c", on_demand=True), mem_bytes=ROOM_FOR_TWO)
    await fleet.start()
    await fleet.ensure_ready("b", timeout_s=10)
    fleet.begin_request("b")

    with pytest.raises(NoRoomError) as caught:
        await fleet.ensure_ready("c", timeout_s=10)

    message = str(caught.value)
    assert "'c' cannot start now" in message
    assert "b (1 in flight)" in message and "never stopped): always" in message
    assert "total" in message and "GiB" in message
    assert fleet.states() == {"always": EngineState.READY, "b": EngineState.READY,
                              "c": EngineState.STOPPED}

    fleet.end_request("b")  # idle now: it may go
    await fleet.ensure_ready("c", timeout_s=10)
    assert fleet.state("b") is EngineState.STOPPED


async def test_memory_taken_by_other_programs_counts_before_a_start(
    make_fleet: FleetFactory
) -> None:
    free = {"bytes": 100 * GiB}
    fleet = make_fleet(model("b", on_demand=True), mem_available=lambda: free["bytes"])
    free["bytes"] = 2 * GiB  # someone else took the memory since the plan was made
    with pytest.raises(NoRoomError, match=r"MemAvailable now 2\.00 GiB"):
        await fleet.ensure_ready("b", timeout_s=10)


# --- crashes and stopping -----------------------------------------------------------


async def test_a_crash_makes_only_that_model_unavailable_while_it_restarts(
    make_fleet: FleetFactory, records: Path
) -> None:
    log = StateLog()
    fleet = make_fleet(model("a"), model("b"), on_state=log)
    await fleet.start()
    runner = asyncio.create_task(fleet.run())
    old_url = fleet.base_url("a")
    async with httpx.AsyncClient() as client:
        await client.get(f"{old_url}/crash")
    while fleet.state("a") is not EngineState.RESTARTING:  # noqa: ASYNC110 (a real process)
        await asyncio.sleep(0.01)
    assert fleet.state("b") is EngineState.READY
    with pytest.raises(ModelUnavailableError):
        fleet.begin_request("a")

    assert await fleet.ensure_ready("a", timeout_s=10) == old_url  # waits for the restart

    assert log.of("a")[-2:] == [EngineState.RESTARTING, EngineState.READY]
    assert log.of("b") == [EngineState.STARTING, EngineState.READY]
    started = served_names(records)
    assert sorted(started[:2]) == ["a", "b"] and started[2:] == ["a"]  # a and b in parallel
    await fleet.stop()
    await asyncio.wait_for(runner, timeout=5)


async def test_stop_leaves_no_process_behind(make_fleet: FleetFactory, records: Path) -> None:
    fleet = make_fleet(model("a"), model("od", on_demand=True))
    await fleet.start()
    await fleet.ensure_ready("od", timeout_s=10)
    pids = [int(str(launch["pid"])) for launch in launches(records)]
    children = [child_of(records, pid) for pid in pids]

    await fleet.stop()

    assert await wait_until_dead(pids + children) == []
    assert set(fleet.states().values()) == {EngineState.STOPPED}
    with pytest.raises(ModelUnavailableError, match="stopping"):
        await fleet.ensure_ready("od", timeout_s=1)
    await fleet.stop()  # idempotent


# --- GPU: sleep mode ----------------------------------------------------------------


def gpu_model(name: str, fraction: float, on_demand: bool = False, **fields: Any) -> ModelConfig:
    return model(name, on_demand=on_demand, gpu_memory_utilization=fraction, **fields)


async def test_on_a_gpu_an_idle_on_demand_model_sleeps_and_wakes_in_the_same_process(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    fleet = make_fleet(gpu_model("main", 0.5), gpu_model("od", 0.4, on_demand=True,
                                                         idle_ttl_s=60), device="cuda")
    spec = fleet.spec("od")
    assert "--enable-sleep-mode" in spec.args and spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert spec.args[spec.args.index("--gpu-memory-utilization") + 1] == "0.4"
    assert "--enable-sleep-mode" not in fleet.spec("main").args
    assert "VLLM_SERVER_DEV_MODE" not in fleet.spec("main").env
    await fleet.start()
    await fleet.ensure_ready("od", timeout_s=10)
    clock.advance(61)

    assert await fleet.reap_idle() == ["od"]
    assert fleet.state("od") is EngineState.SLEEPING
    await fleet.ensure_ready("od", timeout_s=10)

    assert fleet.state("od") is EngineState.READY
    assert served_names(records) == ["main", "od"]  # woken, not started again
    assert [(c["served"], c["path"]) for c in controls(records)] == [
        ("od", "/sleep?level=1&mode=wait"), ("od", "/wake_up")]


async def test_a_request_during_a_sleep_waits_and_wakes_the_model(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    od = gpu_model("od", 0.5, on_demand=True, idle_ttl_s=60,
                   engine_args=("--fake-control-delay-s=0.3",))
    fleet = make_fleet(od, device="cuda")
    await fleet.ensure_ready("od", timeout_s=10)
    clock.advance(61)
    reaper = asyncio.create_task(fleet.reap_idle())
    await asyncio.sleep(0.1)  # the sleep call (0.3 s) is under way
    assert fleet.state("od") is EngineState.READY and not reaper.done()
    with pytest.raises(ModelUnavailableError):
        fleet.begin_request("od")  # still "ready", but going to sleep: refused

    await fleet.ensure_ready("od", timeout_s=10)

    assert await reaper == ["od"]
    assert fleet.state("od") is EngineState.READY
    assert [c["path"].split("?")[0] for c in controls(records)] == ["/sleep", "/wake_up"]


async def test_on_a_gpu_eviction_puts_models_to_sleep_then_stops_sleepers(
    make_fleet: FleetFactory, records: Path, clock: FakeClock
) -> None:
    # 0.3 + 0.6 awake + 0.05 asleep = 0.95 fits; a second sleeper (1.0) does not.
    fleet = make_fleet(gpu_model("main", 0.3), gpu_model("b", 0.6, on_demand=True),
                       gpu_model("c", 0.6, on_demand=True), gpu_model("d", 0.6, on_demand=True),
                       device="cuda")
    await fleet.start()
    await fleet.ensure_ready("b", timeout_s=10)
    clock.advance(1)
    await fleet.ensure_ready("c", timeout_s=10)
    assert fleet.state("b") is EngineState.SLEEPING
    clock.advance(1)

    await fleet.ensure_ready("d", timeout_s=10)

    assert fleet.states() == {"main": EngineState.READY, "b": EngineState.STOPPED,
                              "c": EngineState.SLEEPING, "d": EngineState.READY}
    assert [(c["served"], c["path"].split("?")[0]) for c in controls(records)] == [
        ("b", "/sleep"), ("c", "/sleep")]


async def test_on_a_gpu_a_model_is_stopped_instead_of_slept_without_host_ram(
    make_fleet: FleetFactory, tmp_path: Path, clock: FakeClock
) -> None:
    folder = tmp_path / "od"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    od = ModelConfig(name="od", model=str(folder), on_demand=True, idle_ttl_s=1,
                     gpu_memory_utilization=0.5)
    fleet = make_fleet(od, device="cuda", mem_bytes=1 * GiB)  # all kept for the system
    await fleet.ensure_ready("od", timeout_s=10)
    clock.advance(2)
    assert await fleet.reap_idle() == ["od"]
    assert fleet.state("od") is EngineState.STOPPED


async def test_the_gpu_plan_is_checked_before_anything_starts(make_fleet: FleetFactory) -> None:
    with pytest.raises(MemoryPlanError, match=r"(?s)a +0\.60.*b +0\.50.*total 1\.10"):
        make_fleet(gpu_model("a", 0.6), gpu_model("b", 0.5), device="cuda")
