"""EngineSupervisor against a fake vLLM (tests/engine/fake_engine.py): no vLLM needed.

Each test launches the supervisor's real command line; the fake answers /health, can be
told to crash, and spawns a child process the way vLLM spawns its engine core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from teamgpu.engine.errors import EngineControlError, EngineStartError
from teamgpu.engine.supervisor import EngineSpec, EngineState, EngineSupervisor
from tests.engine.processes import child_of, controls, launches, process_alive, wait_until_dead

SpecFactory = Callable[..., EngineSpec]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


class Recorder:
    """An on_state callback that keeps every (state, message)."""

    def __init__(self) -> None:
        self.events: list[tuple[EngineState, str]] = []

    def __call__(self, state: EngineState, message: str) -> None:
        self.events.append((state, message))

    def transitions(self) -> list[EngineState]:
        """States in order, with repeats collapsed."""
        out: list[EngineState] = []
        for state, _ in self.events:
            if not out or out[-1] is not state:
                out.append(state)
        return out


@pytest.fixture
async def supervisors() -> AsyncIterator[list[EngineSupervisor]]:
    """Supervisors registered here are stopped after the test, whatever happened."""
    created: list[EngineSupervisor] = []
    yield created
    for supervisor in created:
        await supervisor.stop(timeout_s=2.0)


async def test_start_waits_for_health_and_reports_progress(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(delay_s="1.5"), on_state=recorder)
    supervisors.append(supervisor)

    started = time.monotonic()
    await supervisor.start()

    assert time.monotonic() - started >= 1.5
    assert supervisor.is_ready() and supervisor.state is EngineState.READY
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{supervisor.base_url}/health")).status_code == 200
    assert recorder.transitions() == [EngineState.STARTING, EngineState.READY]
    progress = [message for state, message in recorder.events if state is EngineState.STARTING]
    assert any("loading weights" in message for message in progress)
    [launch] = launches(records)
    assert launch["pid"] == supervisor.pid


async def test_engine_output_goes_to_the_log_file(
    make_spec: SpecFactory, supervisors: list[EngineSupervisor]
) -> None:
    spec = make_spec()
    supervisor = EngineSupervisor(spec)
    supervisors.append(supervisor)
    await supervisor.start()
    assert spec.log_path is not None
    log = spec.log_path.read_text()
    assert "=== teamgpu" in log and "vllm.entrypoints.openai.api_server" in log
    assert "fake engine ready" in log


async def test_start_fails_with_the_log_tail_when_the_engine_exits(
    make_spec: SpecFactory, supervisors: list[EngineSupervisor]
) -> None:
    supervisor = EngineSupervisor(make_spec(fail="ValueError: no such model"))
    supervisors.append(supervisor)

    with pytest.raises(EngineStartError, match="no such model") as caught:
        await supervisor.start()

    assert caught.value.returncode == 2
    assert "exited with status 2" in str(caught.value)
    assert supervisor.state is EngineState.FAILED and not supervisor.is_ready()


async def test_start_times_out_and_leaves_nothing_running(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    supervisor = EngineSupervisor(make_spec(delay_s="60"), start_timeout_s=1.0)
    supervisors.append(supervisor)

    with pytest.raises(EngineStartError, match="not ready after 1 s") as caught:
        await supervisor.start()

    assert caught.value.returncode is None
    assert "loading weights" in caught.value.log_tail
    [launch] = launches(records)
    pid = int(str(launch["pid"]))
    assert await wait_until_dead([pid, child_of(records, pid)]) == []


async def test_start_refuses_a_port_someone_else_listens_on(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    spec = make_spec()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", spec.port))
        squatter.listen()
        supervisor = EngineSupervisor(spec)
        supervisors.append(supervisor)
        with pytest.raises(EngineStartError, match="already in use"):
            await supervisor.start()
    assert launches(records) == []


async def test_run_restarts_a_crashed_engine_with_backoff(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(), on_state=recorder, backoff_initial_s=0.3,
                                  backoff_max_s=0.5)
    supervisors.append(supervisor)
    await supervisor.start()
    first_pid = supervisor.pid
    assert first_pid is not None
    first_child = child_of(records, first_pid)
    runner = asyncio.create_task(supervisor.run())

    async def crash_and_wait_ready(expected_restarts: int) -> float:
        async with httpx.AsyncClient() as client:
            await client.get(f"{supervisor.base_url}/crash")
        crashed = time.monotonic()
        while supervisor.restarts < expected_restarts or not supervisor.is_ready():
            assert not runner.done()
            await asyncio.sleep(0.02)
        return time.monotonic() - crashed

    first_gap_s = await crash_and_wait_ready(1)
    second_gap_s = await crash_and_wait_ready(2)
    third_gap_s = await crash_and_wait_ready(3)

    assert recorder.transitions()[-6:] == [EngineState.RESTARTING, EngineState.READY] * 3
    delays = [m for s, m in recorder.events if m.startswith("engine exited")]
    assert [d.rsplit("in ", 1)[1] for d in delays] == ["0.3 s", "0.5 s", "0.5 s"]
    assert first_gap_s >= 0.3 and second_gap_s >= 0.5 and third_gap_s >= 0.5
    pids = [int(str(launch["pid"])) for launch in launches(records)]
    assert len(set(pids)) == 4 and pids[-1] == supervisor.pid
    # The crashed engines' children were cleared before each restart.
    assert await wait_until_dead([first_pid, first_child]) == []

    await supervisor.stop()
    await asyncio.wait_for(runner, timeout=5.0)
    assert supervisor.state is EngineState.STOPPED


async def test_backoff_resets_after_a_healthy_stretch(
    make_spec: SpecFactory, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(), on_state=recorder, backoff_initial_s=0.2,
                                  healthy_reset_s=0.5)
    supervisors.append(supervisor)
    await supervisor.start()
    runner = asyncio.create_task(supervisor.run())
    for restarts in (1, 2):
        await asyncio.sleep(0.6)  # longer than healthy_reset_s
        async with httpx.AsyncClient() as client:
            await client.get(f"{supervisor.base_url}/crash")
        while supervisor.restarts < restarts or not supervisor.is_ready():  # noqa: ASYNC110 -- a real process restarts
            await asyncio.sleep(0.02)
    delays = [m for s, m in recorder.events if m.startswith("engine exited")]
    assert [d.rsplit("in ", 1)[1] for d in delays] == ["0.2 s", "0.2 s"]
    await supervisor.stop()
    await asyncio.wait_for(runner, timeout=5.0)


async def test_failed_restarts_keep_backing_off_until_one_succeeds(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(), on_state=recorder, backoff_initial_s=0.1,
                                  healthy_reset_s=0.05)
    supervisors.append(supervisor)
    await supervisor.start()
    runner = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0.2)  # healthy long enough: the first crash waits the initial delay
    (records / "fail").write_text("CUDA out of memory")
    async with httpx.AsyncClient() as client:
        await client.get(f"{supervisor.base_url}/crash")
    while supervisor.restarts < 3:  # noqa: ASYNC110 -- a real process restarts
        await asyncio.sleep(0.02)
    (records / "fail").unlink()
    while not supervisor.is_ready():
        assert not runner.done()
        await asyncio.sleep(0.02)

    delays = [m.rsplit("in ", 1)[1] for s, m in recorder.events if m.startswith("engine exited")]
    assert delays[:3] == ["0.1 s", "0.2 s", "0.4 s"]
    failures = [m for s, m in recorder.events if m.startswith("restart failed")]
    assert failures and "exited with status 2" in failures[0]
    assert supervisor.state is EngineState.READY
    await supervisor.stop()
    await asyncio.wait_for(runner, timeout=5.0)


async def test_stop_kills_the_whole_group_even_a_child_ignoring_sigterm(
    make_spec: SpecFactory, records: Path
) -> None:
    supervisor = EngineSupervisor(make_spec(stubborn_child="1"))
    await supervisor.start()
    pid = supervisor.pid
    assert pid is not None
    child = child_of(records, pid)
    assert process_alive(child)

    started = time.monotonic()
    await supervisor.stop(timeout_s=1.0)

    assert time.monotonic() - started >= 1.0  # the child needed SIGKILL
    assert not process_alive(pid) and not process_alive(child)
    assert supervisor.state is EngineState.STOPPED
    await supervisor.stop()  # idempotent


async def test_stop_during_start_ends_the_start(
    make_spec: SpecFactory, records: Path
) -> None:
    supervisor = EngineSupervisor(make_spec(delay_s="60"))
    starting = asyncio.create_task(supervisor.start())
    while not launches(records):  # noqa: ASYNC110 -- the fake engine writes its launch record
        await asyncio.sleep(0.05)
    await supervisor.stop(timeout_s=2.0)
    with pytest.raises(EngineStartError, match="stopped before it was ready"):
        await starting
    assert supervisor.state is EngineState.STOPPED
    pid = int(str(launches(records)[0]["pid"]))
    assert await wait_until_dead([pid]) == []


def sleepable(spec: EngineSpec, dev_mode: bool = True) -> EngineSpec:
    """``spec`` with vLLM's sleep mode on, as the fleet launches on-demand models on CUDA."""
    env = {**spec.env, **({"VLLM_SERVER_DEV_MODE": "1"} if dev_mode else {})}
    return dataclasses.replace(spec, args=("--enable-sleep-mode",), env=env)


async def test_sleep_and_wake_up_keep_the_process_and_change_the_state(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(sleepable(make_spec()), on_state=recorder)
    supervisors.append(supervisor)
    await supervisor.start()
    pid = supervisor.pid

    await supervisor.sleep()
    asleep = supervisor.state
    assert not supervisor.is_ready()
    await supervisor.wake_up()

    assert asleep is EngineState.SLEEPING
    assert supervisor.state is EngineState.READY and supervisor.pid == pid
    assert [c["path"] for c in controls(records)] == ["/sleep?level=1&mode=wait", "/wake_up"]
    assert recorder.transitions()[-3:] == [EngineState.READY, EngineState.SLEEPING,
                                           EngineState.READY]
    assert len(launches(records)) == 1


async def test_sleep_needs_a_ready_engine_and_vllm_dev_mode(
    make_spec: SpecFactory, supervisors: list[EngineSupervisor]
) -> None:
    supervisor = EngineSupervisor(sleepable(make_spec(), dev_mode=False))
    supervisors.append(supervisor)
    with pytest.raises(EngineControlError, match="state stopped"):
        await supervisor.sleep()
    await supervisor.start()
    with pytest.raises(EngineControlError, match="answered 404") as caught:
        await supervisor.sleep()
    assert caught.value.status == 404
    assert supervisor.state is EngineState.READY  # unchanged: it still serves
    with pytest.raises(EngineControlError, match="cannot wake"):
        await supervisor.wake_up()


GATEWAY = """
import asyncio, sys
from pathlib import Path
from teamgpu.engine.supervisor import EngineSpec, EngineSupervisor

async def main():
    spec = EngineSpec(python=Path(sys.executable), model="m", served_model_name="m",
                      port=int(sys.argv[1]), env={"PYTHONPATH": sys.argv[2],
                      "FAKE_ENGINE_DIR": sys.argv[3]})
    supervisor = EngineSupervisor(spec)
    await supervisor.start()
    print(supervisor.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_engine_dies_with_a_sigkilled_gateway(make_spec: SpecFactory, records: Path) -> None:
    spec = make_spec()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GATEWAY, str(spec.port), spec.env["PYTHONPATH"], str(records),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert gateway.stdout is not None
        engine_pid = int(await asyncio.wait_for(gateway.stdout.readline(), timeout=30))
        engine_child = child_of(records, engine_pid)
        assert process_alive(engine_pid)
    finally:
        gateway.kill()
        await gateway.wait()
    try:
        # PR_SET_PDEATHSIG delivers SIGTERM; the fake, like vLLM, then stops its child.
        assert await wait_until_dead([engine_pid, engine_child]) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine_pid, signal.SIGKILL)


async def test_a_dead_engine_core_is_named_in_the_log(
    make_spec: SpecFactory, records: Path, supervisors: list[EngineSupervisor]
) -> None:
    """``kill -9`` of vLLM's engine core: its API server exits with status 0 a moment
    later. The state turns ``restarting`` as soon as the core is gone, and the log names
    the core's death, not only the API server's status 0."""
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(), on_state=recorder, backoff_initial_s=0.2)
    supervisors.append(supervisor)
    await supervisor.start()
    assert supervisor.pid is not None
    core = child_of(records, supervisor.pid)
    runner = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0.6)  # the supervisor has seen the group
    os.kill(core, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while supervisor.restarts < 1 or not supervisor.is_ready():
        assert time.monotonic() < deadline, recorder.events
        await asyncio.sleep(0.02)
    messages = [m for s, m in recorder.events if s is EngineState.RESTARTING]
    assert messages[0] == (f"vLLM's engine process VLLM::EngineCore (pid {core}) died; "
                           "the engine is stopping")
    assert any(m.startswith(f"vLLM's engine process VLLM::EngineCore (pid {core}) died; its "
                            "API server then exited with status 0; restarting in")
               for m in messages), messages
    await supervisor.stop()
    await asyncio.wait_for(runner, timeout=5.0)


async def test_a_killed_engine_is_named_with_its_signal(
    make_spec: SpecFactory, supervisors: list[EngineSupervisor]
) -> None:
    recorder = Recorder()
    supervisor = EngineSupervisor(make_spec(), on_state=recorder, backoff_initial_s=0.2)
    supervisors.append(supervisor)
    await supervisor.start()
    assert supervisor.pid is not None
    runner = asyncio.create_task(supervisor.run())
    os.kill(supervisor.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while supervisor.restarts < 1:
        assert time.monotonic() < deadline, recorder.events
        await asyncio.sleep(0.02)
    assert any(m.startswith("engine was killed by SIGKILL; restarting in")
               for _, m in recorder.events), recorder.events
    await supervisor.stop()
    await asyncio.wait_for(runner, timeout=5.0)
