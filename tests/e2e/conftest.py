"""One real vLLM for the whole test session, with the demo model, on the CPU.

Every test in this folder is marked ``e2e``. The ``vllm_engine`` fixture starts a single
vLLM server through :class:`~teamgpu.engine.supervisor.EngineSupervisor` (the same code
``teamgpu up`` runs) the first time a test asks for it, and stops it (whole process
group) at the end of the session.

It works on a fresh clone: the engine python comes from ``$TEAMGPU_ENGINE_PYTHON`` or
the file ``scripts/setup-engine.sh`` writes (``$CACHE/engine-python``), and the model
from ``$TEAMGPU_DEMO_MODEL_DIR`` or ``$CACHE/models/SmolLM2-135M-Instruct``
(``$CACHE`` = ``${XDG_CACHE_HOME:-~/.cache}/teamgpu``). When either is missing the
fixture runs the setup script itself (minutes the first time, seconds afterwards).

Engine flags, and why:
- ``--enforce-eager``: no graph compilation. Start-up measured here is about 35 s instead
  of about 115 s, for about 25 % less decode speed (27 instead of 35 tok/s for one
  client). The tests generate a few hundred tokens in all, so eager mode wins by over a
  minute per session; throughput benchmarks should not use this fixture.
- ``--dtype float32``: what ``teamgpu up`` runs the demo model with on the CPU
  (:func:`teamgpu.engine.demo.demo_engine_args`). The answer checks in this folder rely on
  it: asked "What is the capital of France?" through chat (with the model's default
  system prompt), the greedy first token is "The" at logprob -1.86 against "L" at -1.96,
  a margin of 0.10 nats (float32, measured here). bf16 kernels move these logits by about
  0.2 (on a Xeon with AMX, "L" won, and the answer became "L'Étoile, la Marseillaise,
  ..."); float32 kernels differ from one CPU to another by rounding only, around 1e-4 on
  these logits, a thousand times less than the margin.
  ``test_engine_smoke.py::test_greedy_answer_margin_is_far_above_float32_noise`` keeps
  that margin measured, so a change of model, prompt or engine that shrinks it fails there
  first, with the figure, rather than as a wrong answer.
- ``--max-num-seqs 16`` and ``--max-model-len 2048`` with ``VLLM_CPU_KVCACHE_SPACE=1``
  (1 GiB of KV cache): about 1.4 GB resident, enough for the concurrency tests.
- ``VLLM_ENABLE_RESPONSES_API_STORE=1``: vLLM keeps Responses API objects (for
  ``GET /v1/responses/{id}`` and ``previous_response_id``), as ``teamgpu up`` has it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from teamgpu.engine.demo import demo_engine_args
from teamgpu.engine.supervisor import EngineSpec, EngineState, EngineSupervisor, free_port

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
ENGINE_ARGS = ("--enforce-eager", "--max-num-seqs", "16", "--max-model-len", "2048")
# VLLM_ENABLE_RESPONSES_API_STORE: vLLM keeps Responses API objects (retrieve,
# previous_response_id) only with it, as ``teamgpu up`` runs the engine
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
# pytest-timeout counts a fixture's set-up against the test that first asks for it, and
# its teardown against the last: whichever e2e test runs first pays for the engine's start
# (about 35 s here, about 3 min on a fresh machine, bounded by START_TIMEOUT_S; more when
# the fixture has to run the setup scripts itself). Each e2e test may therefore take the
# fixture's own bounds plus its own run, so the fixture's clearer error comes first.
ENGINE_FIXTURE_S = START_TIMEOUT_S + 30 + STOP_TIMEOUT_S + 30
E2E_TIMEOUT_S = ENGINE_FIXTURE_S + 300
DEMO_MARKER = ".teamgpu-demo-ok"
T = TypeVar("T")


ANSWERS: list[tuple[str, str]] = []  # (test, the demo model's answer), for the summary


def saw_answer(test: str, text: str) -> None:
    """Keep the demo model's answer for the end of the run: CI's output then quotes what
    the real engine said, not only that an assertion held."""
    ANSWERS.append((test, text))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ANSWERS:
        terminalreporter.section("the demo model's answers in the e2e tests")
        for test, text in ANSWERS:
            terminalreporter.write_line(f"{test}: {text!r}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from this folder ``e2e``, and give it ``E2E_TIMEOUT_S``
    unless it sets a timeout of its own."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))


@dataclass(frozen=True)
class VllmEngine:
    """The session's running vLLM server.

    Attributes:
        base_url: ``http://127.0.0.1:PORT`` (no ``/v1``).
        served_model_name: the model name requests must carry.
        model_dir: the demo model folder vLLM loaded.
        log_path: the engine's stdout and stderr.
    """

    base_url: str
    served_model_name: str
    model_dir: Path
    log_path: Path


def pids_with(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (this process left out)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


def stop_up(proc: subprocess.Popen[str], reader: threading.Thread, out: list[str],
            timeout_s: int) -> int:
    """SIGTERM ``teamgpu up`` (``proc``) and return its exit status; fail the test (after
    killing its process group) when it does not exit within ``timeout_s``. Then joins
    ``reader``, the thread collecting its output in ``out``, and closes that output."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"teamgpu up did not stop within {timeout_s} s of SIGTERM:\n" + "".join(out))
    finally:
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "teamgpu"


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``scripts/<name>`` and return the last line of its stdout."""
    result = subprocess.run(
        [str(REPO / "scripts" / name), *args],
        stdout=subprocess.PIPE, text=True, check=True, env=env,
    )
    return result.stdout.strip().splitlines()[-1]


def engine_python() -> Path:
    """The engine venv's python; sets the venv up when no usable one is recorded."""
    for candidate in (os.environ.get("TEAMGPU_ENGINE_PYTHON"),
                      _read(cache_dir() / "engine-python")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return Path(run_script("setup-engine.sh"))


def demo_model_dir(python: Path) -> Path:
    """The demo model folder; converts the model when it is not there yet."""
    wanted = Path(os.environ.get("TEAMGPU_DEMO_MODEL_DIR")
                  or cache_dir() / "models" / SERVED_MODEL_NAME)
    if (wanted / DEMO_MARKER).is_file():
        return wanted
    env = {**os.environ, "TEAMGPU_ENGINE_PYTHON": str(python)}
    return Path(run_script("prepare-demo-model.sh", str(wanted), env=env))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class _LoopThread:
    """An event loop in a thread of its own that lives for the whole session.

    The supervisor's child watcher, restarts and PR_SET_PDEATHSIG (tied to the thread
    that forks the engine) all need one long-lived loop; pytest-asyncio gives each test
    its own.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine",
                                        daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    """Start one vLLM server with the demo model for the session; stop it at the end."""
    python = engine_python()
    model_dir = demo_model_dir(python)
    log_path = tmp_path_factory.mktemp("vllm") / "engine.log"
    spec = EngineSpec(
        python=python,
        model=str(model_dir),
        served_model_name=SERVED_MODEL_NAME,
        port=free_port(),
        args=demo_engine_args(str(model_dir), "cpu", ENGINE_ARGS),
        env=ENGINE_ENV,
        log_path=log_path,
    )
    last_state: list[EngineState] = []

    def on_state(state: EngineState, message: str) -> None:
        # Shown by pytest only when a test fails; skip the 0.5 s progress repeats.
        if last_state[-1:] != [state] or not message.startswith("waiting"):
            print(f"vllm_engine: {state}: {message}")
        last_state[:] = [state]

    thread = _LoopThread()
    supervisor = EngineSupervisor(spec, on_state=on_state, start_timeout_s=START_TIMEOUT_S)
    watcher: concurrent.futures.Future[None] | None = None
    try:
        thread.submit(supervisor.start()).result(timeout=START_TIMEOUT_S + 30)
        # Restarts the engine should a test crash it; returns once stop() is called.
        watcher = thread.submit(supervisor.run())
        yield VllmEngine(
            base_url=supervisor.base_url,
            served_model_name=SERVED_MODEL_NAME,
            model_dir=model_dir,
            log_path=log_path,
        )
    finally:
        thread.submit(supervisor.stop(timeout_s=STOP_TIMEOUT_S)).result(STOP_TIMEOUT_S + 30)
        if watcher is not None:
            watcher.result(timeout=10)
        thread.close()
