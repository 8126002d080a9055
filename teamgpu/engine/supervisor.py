"""Launch vLLM's OpenAI server as a child process and keep it running.

The gateway never imports vLLM: the engine runs in its own venv (made by
``scripts/setup-engine.sh``), listens on a private port bound to 127.0.0.1, and is
reached over HTTP. :class:`EngineSupervisor` owns that process:

- :meth:`~EngineSupervisor.start` spawns it and polls ``GET /health`` until it answers
  200, reporting progress through ``on_state``;
- :meth:`~EngineSupervisor.run` restarts it with exponential backoff whenever it exits;
- :meth:`~EngineSupervisor.stop` terminates it and everything it spawned;
- :meth:`~EngineSupervisor.sleep` and :meth:`~EngineSupervisor.wake_up` use vLLM's sleep
  mode (CUDA only: ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``, which the
  fleet sets for on-demand models on a GPU).

No orphans: vLLM's API server forks an engine-core process (which forks workers), so the
engine is started in a session and process group of its own and the whole group is
signalled. If the gateway itself dies without running :meth:`stop` (SIGKILL, OOM
killer), the kernel sends the engine SIGTERM through ``prctl(PR_SET_PDEATHSIG)`` (Linux
only), and vLLM then shuts its own children down.

Only the standard library, asyncio and httpx are used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO

import httpx

from teamgpu.engine.errors import EngineConfigError, EngineControlError, EngineStartError

__all__ = [
    "CPU_DEFAULT_ARGS",
    "CPU_DEFAULT_FLAGS",
    "EngineExit",
    "EngineSpec",
    "EngineState",
    "EngineSupervisor",
    "build_command",
    "describe_returncode",
    "engine_arg",
    "free_port",
    "port_is_free",
]

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
HOST = "127.0.0.1"
# Flags the supervisor sets itself; EngineSpec.args may not repeat them.
RESERVED_FLAGS = ("--model", "--host", "--port", "--served-model-name")
# Added unless EngineSpec.args sets them. Priority scheduling is what the gateway's
# priority classes map onto (lower value served first).
DEFAULT_ARGS = (("--scheduling-policy", "priority"),)
# On the CPU (the only device of the test machines) a short context and a small batch
# keep memory and start-up time down; a GPU keeps vLLM's own defaults.
CPU_DEFAULT_ARGS = (("--max-model-len", "2048"), ("--max-num-seqs", "16"))
# Eager mode on the CPU unless the args say --no-enforce-eager (or --enforce-eager): the
# engine is ready in about 25 s instead of about 75 s; compiled graphs decode 10-25 % faster
# (docs/install.md). The demo model's dtype is chosen in teamgpu.engine.demo.
CPU_DEFAULT_FLAGS = ("--enforce-eager",)
PR_SET_PDEATHSIG = 1
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 16_384
KILL_WAIT_S = 5.0  # how long stop() waits for SIGKILLed processes to vanish


GROUP_POLL_S = 0.1  # how often the known processes of a running engine are checked
GROUP_SCAN_S = 2.0  # how often its whole process group is listed (a /proc scan)
CORE_DEATH_GRACE_S = 10.0  # how long vLLM's API server may live on after its core died
VLLM_PROCESS_PREFIX = "VLLM::"  # vLLM names its processes VLLM::EngineCore, VLLM::Worker


def describe_returncode(returncode: int) -> str:
    """``exited with status N``, or ``was killed by SIGKILL`` for a negative status (the
    signal that ended the process, as asyncio reports it)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@dataclass(frozen=True)
class _LostProcess:
    pid: int
    name: str
    at: float  # time.monotonic() when it was found gone


@dataclass(frozen=True)
class EngineExit:
    """How a running engine ended.

    Attributes:
        returncode: the API server's exit status (negative: killed by that signal).
        lost: one of vLLM's own processes (the engine core) found dead before the API
            server exited, if any: its death ended the engine.
    """

    returncode: int
    lost: _LostProcess | None = None

    def describe(self) -> str:
        """A log line that names what truly happened, e.g. ``vLLM's engine core
        (VLLM::EngineCore, pid 5122) died; its API server then exited with status 0``."""
        server = describe_returncode(self.returncode)
        if self.lost is None:
            return f"engine {server}"
        return (f"vLLM's engine process {self.lost.name} (pid {self.lost.pid}) died; its API "
                f"server then {server}")


class EngineState(enum.StrEnum):
    """Where the engine process is in its life.

    ``sleeping``: the process runs but vLLM's sleep mode (level 1) has moved its weights
    to host RAM and dropped its KV cache; it answers ``/health`` with 200 yet serves
    nothing until :meth:`EngineSupervisor.wake_up`.
    """

    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineSpec:
    """Everything needed to launch one vLLM server.

    Attributes:
        python: the engine venv's python (it must be able to import vllm).
        model: a local model folder or a model id.
        served_model_name: the model name clients send.
        port: private TCP port; the server binds 127.0.0.1 only.
        args: further vLLM flags, as given to ``--engine-arg``. They may override the
            defaults (``--scheduling-policy``, and on the CPU ``--max-model-len``,
            ``--max-num-seqs``) but not the flags in ``RESERVED_FLAGS``.
        env: variables added to the inherited environment (``VLLM_CPU_KVCACHE_SPACE``).
        log_path: file that receives the engine's stdout and stderr (appended to, one
            header line per launch); None discards them.
        device: ``cpu`` applies ``CPU_DEFAULT_ARGS``; ``cuda`` leaves vLLM's defaults.
    """

    python: Path
    model: str
    served_model_name: str
    port: int
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    log_path: Path | None = None
    device: str = "cpu"


def _flag_name(arg: str) -> str:
    """``--max_num_seqs=8`` -> ``--max-num-seqs`` (vLLM accepts both spellings)."""
    return arg.split("=", 1)[0].replace("_", "-")


def build_command(spec: EngineSpec) -> list[str]:
    """The argv that starts vLLM's OpenAI server for ``spec``.

    Args:
        spec: what to launch.

    Returns:
        ``[python, -m, vllm.entrypoints.openai.api_server, --model, ..., --host,
        127.0.0.1, --port, ..., --served-model-name, ..., <defaults not in args>,
        *spec.args]``.

    Raises:
        EngineConfigError: ``spec.args`` sets a flag the supervisor owns, or
            ``spec.device`` is neither ``cpu`` nor ``cuda``.
    """
    if spec.device not in ("cpu", "cuda"):
        raise EngineConfigError(f"device must be 'cpu' or 'cuda', got {spec.device!r}")
    given = {_flag_name(arg) for arg in spec.args if arg.startswith("--")}
    clashes = sorted(given.intersection(RESERVED_FLAGS))
    if clashes:
        raise EngineConfigError(
            f"engine args may not set {', '.join(clashes)}; the supervisor sets them "
            f"(args: {list(spec.args)})"
        )
    command = [
        str(spec.python), "-m", API_SERVER_MODULE,
        "--model", spec.model,
        "--host", HOST,
        "--port", str(spec.port),
        "--served-model-name", spec.served_model_name,
    ]
    defaults = DEFAULT_ARGS + (CPU_DEFAULT_ARGS if spec.device == "cpu" else ())
    for flag, value in defaults:
        if flag not in given:
            command += [flag, value]
    if spec.device == "cpu":
        for flag in CPU_DEFAULT_FLAGS:
            if flag not in given and "--no-" + flag[2:] not in given:
                command.append(flag)
    return command + list(spec.args)


def engine_arg(args: list[str] | tuple[str, ...], flag: str) -> str | None:
    """The value of ``flag`` in vLLM-style args (``--f v`` or ``--f=v``; ``_`` = ``-``),
    the last one given winning as in vLLM's parser; None when absent."""
    want = flag.replace("_", "-")
    found = None
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if name.replace("_", "-") == want:
            if eq:
                found = value
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it).

    Another process may take it before the engine binds it; :meth:`EngineSupervisor.start`
    then fails with :class:`EngineStartError` rather than talk to a stranger.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on (or is bound to) 127.0.0.1:``port``; TIME_WAIT
    leftovers do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the engine's server, so a restart on the same port is not refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when we die (Linux).

    ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` is set in the forked child just before exec and
    survives the exec. Caveats: it fires when the *thread* that forked the child exits,
    so start the engine from the thread that runs the event loop for the gateway's
    whole life (the main thread); and it reaches the direct child only (vLLM's API
    server), which on SIGTERM shuts down the engine core it spawned. The function runs
    between fork and exec, so it only calls into the libc loaded beforehand.

    Returns:
        The function, or None where prctl is unavailable (then only :meth:`stop` and
        the process group protect against orphans).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"], [])


def _group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of group ``pgid``: pid -> command name (``comm``)."""
    members: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            if name.startswith(VLLM_PROCESS_PREFIX):  # comm is cut at 15 characters
                try:
                    full = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
                except (OSError, UnicodeDecodeError):
                    full = ""
                if full.startswith(name):  # vLLM's setproctitle name, in full
                    name = full
            members[int(entry.name)] = name
    return members


def _read_tail(path: Path | None, start: int, max_lines: int) -> list[str]:
    """The last ``max_lines`` non-empty lines written to ``path`` after byte ``start``."""
    if path is None:
        return []
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(start, size - LOG_TAIL_BYTES))
            data = log.read()
    except OSError:
        return []
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    return [line for line in lines if line][-max_lines:]


class EngineSupervisor:
    """Owns one engine process: start it, restart it when it dies, stop it.

    Args:
        spec: what to launch.
        on_state: called as ``on_state(state, message)`` on every state change and,
            while starting or restarting, every poll (0.5 s) with the elapsed seconds
            and the engine's last log line, for a progress display. It runs in the
            event loop; exceptions it raises propagate to the caller of start/run.
        start_timeout_s: seconds one launch may take to answer 200 on ``/health``.
        backoff_initial_s: delay before the first restart after a crash, in seconds;
            it doubles with every further crash.
        backoff_max_s: upper bound of that delay, in seconds.
        healthy_reset_s: an engine that ran this long (seconds) since it was last ready
            resets the backoff to ``backoff_initial_s``.
        health_interval_s: seconds between two ``/health`` polls while starting.
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        on_state: Callable[[EngineState, str], None] | None = None,
        start_timeout_s: float = 900.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        healthy_reset_s: float = 60.0,
        health_interval_s: float = 0.5,
    ) -> None:
        self.spec = spec
        self.base_url = f"http://{HOST}:{spec.port}"
        self.state = EngineState.STOPPED
        self.restarts = 0
        self._on_state = on_state
        self._start_timeout_s = start_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._healthy_reset_s = healthy_reset_s
        self._health_interval_s = health_interval_s
        self._process: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        self._ready_at: float | None = None  # when the current process became ready
        self._stopping = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """PID (and process group id) of the current engine process, if any."""
        return None if self._process is None else self._process.pid

    def is_ready(self) -> bool:
        """Whether the engine answered ``/health`` and has not exited since."""
        return self.state is EngineState.READY

    async def start(self) -> None:
        """Launch the engine and wait until ``GET /health`` answers 200.

        Raises:
            EngineConfigError: the spec cannot be turned into a command.
            EngineStartError: the port is taken, the process exited, ``start_timeout_s``
                passed, or :meth:`stop` was called first. The process group is killed
                and the state is ``failed`` (``stopped`` after :meth:`stop`).
        """
        self._stopping.clear()
        try:
            await self._launch(EngineState.STARTING)
        except EngineStartError as exc:
            if not self._stopping.is_set():
                self._set_state(EngineState.FAILED, str(exc).splitlines()[0])
            raise

    async def run(self) -> None:
        """Watch the engine and restart it whenever it exits, until :meth:`stop`.

        Calls :meth:`start` first if the engine is not running. A restart waits
        ``backoff_initial_s`` doubled per consecutive crash (at most ``backoff_max_s``);
        the state is ``restarting`` from the crash until the new process is healthy. A
        failed restart counts as another crash; the supervisor never gives up.

        Raises:
            EngineStartError: only from the initial :meth:`start`.
        """
        if self._process is None or self._process.returncode is not None:
            await self.start()
        backoff = self._backoff_initial_s
        while not self._stopping.is_set():
            exit_ = await self._wait_exit_or_stop()
            if exit_ is None:
                return
            # The API server is gone; its engine core may not be. Clear the group.
            await self._terminate(timeout_s=5.0)
            ready_at = self._ready_at
            if ready_at is not None and time.monotonic() - ready_at >= self._healthy_reset_s:
                backoff = self._backoff_initial_s
            self.restarts += 1
            self._set_state(EngineState.RESTARTING,
                            f"{exit_.describe()}; restarting in {backoff:.1f} s")
            if await self._sleep_or_stop(backoff):
                return
            backoff = min(backoff * 2, self._backoff_max_s)
            try:
                await self._launch(EngineState.RESTARTING)
            except EngineStartError as exc:
                if self._stopping.is_set():
                    return
                first_line = str(exc).splitlines()[0]
                self._set_state(EngineState.RESTARTING, f"restart failed: {first_line}")

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the engine's whole process group; idempotent.

        Sends SIGTERM to the group, waits up to ``timeout_s`` seconds for every process
        in it to exit, then sends SIGKILL. Also ends a concurrent :meth:`run` and makes
        a concurrent :meth:`start` raise :class:`EngineStartError`.
        """
        self._stopping.set()
        await self._terminate(timeout_s)
        if self.state is not EngineState.STOPPED:
            self._set_state(EngineState.STOPPED, "engine stopped")

    async def sleep(self, level: int = 1, timeout_s: float = 120.0) -> None:
        """Put a ready engine to sleep: ``POST /sleep?level=LEVEL&mode=wait``.

        Level 1 moves the weights to host RAM and drops the KV cache; level 2 drops the
        weights too. ``mode=wait`` lets requests still running finish first (vLLM 0.32;
        older versions ignore it). Sleep mode needs ``--enable-sleep-mode`` and
        ``VLLM_SERVER_DEV_MODE=1`` in the engine's environment, and a CUDA (or ROCm, XPU)
        device: vLLM's CPU build refuses ``--enable-sleep-mode``.

        Raises:
            EngineControlError: the engine is not ready, or did not answer 200 (the state
                stays ``ready``).
        """
        if self.state is not EngineState.READY:
            raise EngineControlError(f"cannot put an engine in state {self.state} to sleep")
        await self._control(f"/sleep?level={level}&mode=wait", timeout_s)
        self._set_state(EngineState.SLEEPING,
                        f"engine asleep (level {level}) on {self.base_url}")

    async def wake_up(self, timeout_s: float = 120.0) -> None:
        """Wake a sleeping engine: ``POST /wake_up``; ready again when it answers 200.

        Raises:
            EngineControlError: the engine is not asleep, or did not answer 200 with
                ``"status": "awake"`` (vLLM 0.32 reports a partial wake-up as
                ``"sleeping"``).
        """
        if self.state is not EngineState.SLEEPING:
            raise EngineControlError(f"cannot wake an engine in state {self.state}")
        started = time.monotonic()
        body = await self._control("/wake_up", timeout_s)
        if isinstance(body, dict) and body.get("status", "awake") != "awake":
            raise EngineControlError(f"engine is not fully awake after /wake_up: {body}",
                                     status=200)
        self._set_state(EngineState.READY, f"engine awake on {self.base_url} after "
                        f"{time.monotonic() - started:.1f} s")

    # --- internals -----------------------------------------------------------------

    async def _control(self, path: str, timeout_s: float) -> object:
        """POST ``path`` to the engine; its JSON answer (None if not JSON)."""
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s,
                                         trust_env=False) as client:
                response = await client.post(path)
        except httpx.HTTPError as exc:
            raise EngineControlError(
                f"POST {path} to {self.base_url} failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise EngineControlError(
                f"POST {path} to {self.base_url} answered {response.status_code}: "
                f"{response.text[:300]}", status=response.status_code)
        try:
            return response.json()
        except ValueError:
            return None


    def _set_state(self, state: EngineState, message: str) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, message)

    async def _launch(self, state: EngineState) -> None:
        """Spawn one engine process and wait for health, reporting as ``state``."""
        command = build_command(self.spec)
        self._set_state(state, f"launching engine on {self.base_url}")
        if not port_is_free(self.spec.port):
            raise EngineStartError(f"port {HOST}:{self.spec.port} is already in use")
        self._ready_at = None
        await self._spawn(command)
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as client:
                while True:
                    elapsed = time.monotonic() - started
                    if await self._healthy(client):
                        break
                    self._check_launch(elapsed)
                    last = _read_tail(self.spec.log_path, self._log_offset, 1)
                    self._set_state(state, f"waiting for the engine ({elapsed:.0f} s)"
                                    + (f": {last[0]}" if last else ""))
                    if await self._sleep_or_stop(self._health_interval_s):
                        self._check_launch(elapsed)
        except BaseException:
            await self._terminate(timeout_s=5.0)
            raise
        self._ready_at = time.monotonic()
        self._set_state(EngineState.READY,
                        f"engine ready on {self.base_url} after {self._ready_at - started:.1f} s")

    def _check_launch(self, elapsed_s: float) -> None:
        """Raise EngineStartError if this launch is over: exited, stopped or too slow."""
        assert self._process is not None
        returncode = self._process.returncode
        if self._stopping.is_set():  # first: stop() makes the engine exit, too
            reason = "engine stopped before it was ready"
        elif returncode is not None:
            reason = f"engine exited with status {returncode} before it was ready"
        elif elapsed_s > self._start_timeout_s:
            reason = f"engine not ready after {self._start_timeout_s:.0f} s"
        else:
            return
        raise EngineStartError(reason, returncode=returncode, log_tail=self._log_tail())

    async def _spawn(self, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.env}
        if self.spec.log_path is None:
            self._process = await self._exec(command, env, asyncio.subprocess.DEVNULL)
            return
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spec.log_path.open("ab") as log:
            self._log_offset = log.seek(0, os.SEEK_END)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== teamgpu {stamp}: {' '.join(command)}\n".encode())
            log.flush()
            self._process = await self._exec(command, env, log)

    async def _exec(self, command: list[str], env: dict[str, str],
                    output: int | IO[bytes]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own session and process group: pgid == pid
            preexec_fn=_die_with_parent(),
        )

    async def _healthy(self, client: httpx.AsyncClient) -> bool:
        try:
            response = await client.get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _log_tail(self) -> str:
        if self.spec.log_path is None:
            return "(no engine log: EngineSpec.log_path is unset)"
        return "\n".join(_read_tail(self.spec.log_path, self._log_offset, LOG_TAIL_LINES))

    async def _sleep_or_stop(self, delay_s: float) -> bool:
        """Sleep ``delay_s`` seconds; True if :meth:`stop` was called meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
        return self._stopping.is_set()

    async def _wait_exit_or_stop(self) -> EngineExit | None:
        """How the engine ended, or None if :meth:`stop` came first.

        While waiting, vLLM's processes in the group (listed every ``GROUP_SCAN_S``) are
        checked every ``GROUP_POLL_S``: when one of
        vLLM's own processes (the engine core, a worker) dies while the API server lives,
        the engine is dead (vLLM then answers 500 until its API server exits). The state
        turns ``restarting`` at once, so the gateway stops sending it requests, and the
        API server is given ``CORE_DEATH_GRACE_S`` to exit before the group is killed.
        """
        assert self._process is not None
        process = self._process
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        lost: _LostProcess | None = None
        try:
            seen = _group_members(process.pid)
            next_scan = time.monotonic() + GROUP_SCAN_S
            while not (exited.done() or stopping.done()):
                await asyncio.wait({exited, stopping}, timeout=GROUP_POLL_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                if exited.done() or stopping.done():
                    break
                now = time.monotonic()
                if lost is None:
                    gone = [(pid, name) for pid, name in seen.items()
                            if pid != process.pid and name.startswith(VLLM_PROCESS_PREFIX)
                            and not _alive(pid)]
                    if gone:
                        lost = _LostProcess(gone[0][0], gone[0][1], now)
                        self._set_state(EngineState.RESTARTING,
                                        f"vLLM's engine process {lost.name} (pid {lost.pid}) "
                                        "died; the engine is stopping")
                    elif now >= next_scan:  # processes vLLM started since
                        seen = _group_members(process.pid)
                        next_scan = now + GROUP_SCAN_S
                elif now - lost.at >= CORE_DEATH_GRACE_S:
                    await self._terminate(timeout_s=5.0)  # the API server did not exit
        finally:
            exited.cancel()
            stopping.cancel()
        if self._stopping.is_set():
            return None
        returncode = process.returncode
        assert returncode is not None
        return EngineExit(returncode, lost)

    async def _terminate(self, timeout_s: float) -> None:
        """SIGTERM the process group, wait up to ``timeout_s`` s, then SIGKILL it."""
        process = self._process
        if process is None:
            return
        pgid = process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.returncode is not None and not _group_alive(pgid):
                break
            await asyncio.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            # SIGKILL is delivered asynchronously; return once the group is gone.
            deadline = time.monotonic() + KILL_WAIT_S
            while _group_alive(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 -- no event marks the group's end
                await asyncio.sleep(0.02)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=KILL_WAIT_S)
