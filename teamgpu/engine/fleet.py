"""Several models on one server: one supervised vLLM per local model, some on demand.

:class:`EngineFleet` owns one :class:`~teamgpu.engine.supervisor.EngineSupervisor` per
local model of the set (remote-only models have none), each vLLM on its own private port
on 127.0.0.1:

- :meth:`~EngineFleet.start` starts every model that is not on demand (in parallel; see
  ``parallel_start``), after the memory plan (:mod:`teamgpu.engine.memory`) has been
  checked in the constructor;
- :meth:`~EngineFleet.ensure_ready` starts an on-demand model on its first request;
  concurrent callers share one start;
- :meth:`~EngineFleet.begin_request` / :meth:`~EngineFleet.end_request` (or
  :meth:`~EngineFleet.use`) count requests in flight: an engine with requests in flight
  is never stopped;
- :meth:`~EngineFleet.run` supervises (a crashed engine is restarted with backoff by its
  supervisor, and only its model is unavailable meanwhile) and reaps idle on-demand
  models every ``reap_interval_s``: one idle ``idle_ttl_s`` is stopped, on a GPU put to
  sleep;
- before an on-demand model starts, idle on-demand models are evicted, least recently
  used first, until it fits (never a busy one, never one that is not on demand);
- :meth:`~EngineFleet.stop` stops every engine and everything they spawned.

**Sleep mode on a GPU.** On CUDA an on-demand model's engine runs with
``--enable-sleep-mode`` (and ``VLLM_SERVER_DEV_MODE=1``, which vLLM 0.32 needs for the
``/sleep`` and ``/wake_up`` routes; they are on the private port, and the gateway forwards
only ``/v1`` routes). Idle or evicted, it gets ``POST /sleep?level=1``: in vLLM 0.32 level 1
releases every allocation of its sleep-mode allocator (``CuMemAllocator``): the weights
are copied to pinned host RAM first, the KV cache is discarded, and the runtime and CUDA
graph pools are kept in host RAM too (``device_allocator/sleep_mode_backend.py``). Left
on the GPU: the CUDA context and whatever was allocated outside that pool, counted as
``GPU_SLEEP_RESIDUAL`` by the plan. ``POST /wake_up`` maps it all back in, far faster
than a restart (0.1-6 s in https://blog.vllm.ai/2025/10/26/sleep-mode.html; not measured
here, there is no GPU). A sleeping engine holds its weights' size in host RAM; when
MemAvailable cannot take them, the engine is stopped instead. One that crashes while
asleep is restarted awake by its supervisor, counts as awake from then on, and is the
first to go when room is needed while it restarts. On
the CPU, vLLM has no sleep mode (``Platform.is_sleep_mode_available``): an idle model is
stopped and started again (18-35 s here for the demo models).

**For the gateway.** vLLM answers ``/health`` with 200 while asleep, so the backend pool
must follow the fleet's states, not its own polls, for on-demand models: ``on_state(name,
state, message)`` is called on every change (and, while starting, with progress every
0.5 s). A request for a model that is not ``ready`` calls :meth:`ensure_ready` (or
:meth:`use`), which raises a :class:`~teamgpu.engine.errors.ModelUnavailableError`
subclass the gateway answers with 503 and ``Retry-After``.

Time: ``clock`` (default ``time.monotonic``) stamps requests and idleness, so tests drive
the reaper with a fake clock; start timeouts use the event loop's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from teamgpu.engine.demo import demo_engine_args
from teamgpu.engine.errors import (
    EngineControlError,
    EngineStartError,
    MemoryPlanError,
    ModelStartFailed,
    ModelStartTimeout,
    ModelUnavailableError,
    NoRoomError,
    UnknownModelError,
)
from teamgpu.engine.memory import (
    CPU_RESERVE_BYTES,
    Device,
    MemoryPlan,
    estimate_weight_bytes,
    mem_available_bytes,
    plan_memory,
)
from teamgpu.engine.supervisor import (
    EngineSpec,
    EngineState,
    EngineSupervisor,
    free_port,
    port_is_free,
)
from teamgpu.engine.tools import ToolCallDecision, decide_tool_calling
from teamgpu.settings import ModelConfig

__all__ = ["AWAKE_STATES", "EngineFleet", "StateCallback"]

log = logging.getLogger("teamgpu.engine.fleet")

StateCallback = Callable[[str, EngineState, str], None]
"""``on_state(model_name, state, message)``."""

AWAKE_STATES = frozenset({EngineState.STARTING, EngineState.READY, EngineState.RESTARTING})
"""States in which an engine holds (or is about to hold) its whole memory share."""
SLEEP_LEVEL = 1


@dataclass(eq=False)
class _Engine:
    """The fleet's book-keeping for one local model."""

    config: ModelConfig
    spec: EngineSpec
    supervisor: EngineSupervisor
    sleepable: bool
    tools: ToolCallDecision | None
    weight_bytes: int
    in_flight: int = 0
    last_used: float = 0.0
    parking: bool = False
    failed_at: float | None = None
    last_error: EngineStartError | None = None
    watcher: asyncio.Task[None] | None = None
    activation: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> EngineState:
        return self.supervisor.state


def _log_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class EngineFleet:
    """The engines of a model set; create and use inside one event loop.

    Args:
        models: the model set; only models with ``model`` get an engine.
        python: the engine venv's python.
        device: ``cpu`` or ``cuda``.
        log_dir: where ``engine-<name>.log`` files go.
        on_state: called as ``on_state(name, state, message)``; see the module docstring.
        plan: the memory plan; default: :func:`plan_memory` of ``models`` (raises
            :class:`~teamgpu.engine.errors.MemoryPlanError` when they do not fit).
        mem_available: returns MemAvailable in bytes (CPU plan, and host RAM for sleeping
            on a GPU); default: ``/proc/meminfo``.
        clock: seconds for idleness and LRU order.
        env: variables added to every engine's environment.
        start_timeout_s: seconds one engine launch may take to become healthy.
        reap_interval_s: seconds between two idle checks in :meth:`run`.
        retry_failed_after_s: an on-demand model whose start failed is not started again
            before this many seconds (clock); meanwhile callers get the same failure.
        parallel_start: start the always-on models together (the default) or one after
            the other. Measured with the demo set on 2 CPU cores shared with other work
            (vLLM 0.32 CPU, eager; docs/models.md): both ready after 31.5 and 38.2 s in
            parallel, 42.0 and 44.1 s one after the other, though the chat model alone
            was ready after 22-23 s when it went first. :meth:`start` returns when all
            are ready, so parallel is the default on the CPU too (not measured on a
            GPU).
        supervisor_options: further keyword arguments for each EngineSupervisor
            (backoff times, health interval).
        ports: the private port of particular models' engines (``up --engine-port``);
            the others get a free one.

    Raises:
        MemoryPlanError: the set does not fit (before anything starts).
        EngineConfigError: a model's flags cannot be turned into a command line.
        ToolParserError: a model's ``tool_call_parser`` is not a vLLM parser.
    """

    def __init__(
        self,
        models: Sequence[ModelConfig],
        *,
        python: Path,
        device: Device,
        log_dir: Path,
        on_state: StateCallback | None = None,
        plan: MemoryPlan | None = None,
        mem_available: Callable[[], int] = mem_available_bytes,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 900.0,
        reap_interval_s: float = 5.0,
        retry_failed_after_s: float = 30.0,
        parallel_start: bool = True,
        supervisor_options: Mapping[str, float] | None = None,
        ports: Mapping[str, int] | None = None,
    ) -> None:
        self.device: Device = device
        self._on_state = on_state
        self._mem_available = mem_available
        self._clock = clock
        self._start_timeout_s = start_timeout_s
        self._reap_interval_s = reap_interval_s
        self._retry_failed_after_s = retry_failed_after_s
        self._parallel_start = parallel_start
        self._supervisor_options = dict(supervisor_options or {})
        self._lock = asyncio.Lock()  # held while memory is reserved: make room + start/wake
        self._stopping = asyncio.Event()
        self._started = False

        local = [m for m in models if m.local]
        args = {m.name: self._engine_args(m) for m in local}
        self.plan = plan if plan is not None else plan_memory(
            models, device, mem_available=mem_available, engine_args=lambda m: args[m.name])
        self._engines: dict[str, _Engine] = {}
        for m in local:
            assert m.model is not None
            tools = (decide_tool_calling(m.model, m.tool_call_parser, engine_args=args[m.name])
                     if m.generates else None)
            share = self.plan.shares[m.name]
            engine_env = dict(env or {})
            extra: list[str] = list(tools.flags) if tools else []
            sleepable = device == "cuda" and m.on_demand
            if device == "cuda":
                extra += ["--gpu-memory-utilization", f"{share.gpu_fraction:g}"]
                if sleepable:
                    engine_env["VLLM_SERVER_DEV_MODE"] = "1"
                    if "--enable-sleep-mode" not in args[m.name]:
                        extra.append("--enable-sleep-mode")
            else:
                engine_env["VLLM_CPU_KVCACHE_SPACE"] = str(share.kv_cache_gib)
            spec = EngineSpec(python=python, model=m.model, served_model_name=m.name,
                              port=(ports or {}).get(m.name) or free_port(),
                              args=(*args[m.name], *extra),
                              env=engine_env, log_path=log_dir / f"engine-{_log_name(m.name)}.log",
                              device=device)
            self._engines[m.name] = _Engine(
                config=m, spec=spec, supervisor=self._supervisor(spec, m.name),
                sleepable=sleepable, tools=tools,
                weight_bytes=estimate_weight_bytes(m.model, args[m.name]))

    # --- what the gateway reads -------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the local models, in the set's order."""
        return list(self._engines)

    def state(self, name: str) -> EngineState:
        """The engine's state.

        Raises:
            UnknownModelError: no local model has that name.
        """
        return self._engine(name).state

    def states(self) -> dict[str, EngineState]:
        """Every local model's state."""
        return {n: e.state for n, e in self._engines.items()}

    def base_url(self, name: str) -> str:
        """The engine's base URL (``http://127.0.0.1:PORT``, without ``/v1``).

        It may change when the engine is started again after its port was taken while it
        was stopped; read it again after ``on_state(name, ready, ...)``.

        Raises:
            UnknownModelError: no local model has that name.
        """
        return self._engine(name).supervisor.base_url

    def in_flight(self, name: str) -> int:
        """Requests :meth:`begin_request` counted and :meth:`end_request` did not end."""
        return self._engine(name).in_flight

    def spec(self, name: str) -> EngineSpec:
        """The launch spec of the model's engine (command line, environment, log)."""
        return self._engine(name).spec

    def tool_calling(self, name: str) -> ToolCallDecision | None:
        """The tool-call decision for the model (None for embed/rerank-only models)."""
        return self._engine(name).tools

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every model that is not on demand and wait until each is ready.

        Raises:
            EngineStartError: an engine did not become healthy; every engine started is
                stopped again before this is raised.
        """
        self._started = True
        self._stopping.clear()
        engines = [self._engines[n] for n in self.plan.always_on()]
        try:
            if self._parallel_start:
                results = await asyncio.gather(*(self._launch(e) for e in engines),
                                               return_exceptions=True)
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
            else:
                for e in engines:
                    await self._launch(e)
        except BaseException:
            await self.stop()
            raise

    async def run(self) -> None:
        """Supervise until :meth:`stop`: reap idle on-demand models every
        ``reap_interval_s``. Calls :meth:`start` first if it was not called."""
        if not self._started:
            await self.start()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._reap_interval_s)
            if not self._stopping.is_set():
                await self.reap_idle()

    async def stop(self) -> None:
        """Stop every engine (SIGTERM to each process group, SIGKILL after 15 s) and end
        :meth:`run`; idempotent. Starts in progress fail; no process is left."""
        self._stopping.set()
        await asyncio.gather(*(e.supervisor.stop() for e in self._engines.values()))
        tasks = [t for e in self._engines.values() for t in (e.watcher, e.activation)
                 if t is not None]
        for task in tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=5.0)
        for e in self._engines.values():
            e.watcher = e.activation = None

    # --- requests ---------------------------------------------------------------------

    async def ensure_ready(self, name: str, timeout_s: float) -> str:
        """Wait until the model's engine is ready, starting (or waking) an on-demand
        model that is not; concurrent callers share one start.

        Args:
            name: the model's name.
            timeout_s: the longest wait, in seconds.

        Returns:
            The engine's base URL.

        Raises:
            UnknownModelError: no local model has that name.
            ModelStartTimeout: not ready within ``timeout_s`` (a start goes on).
            ModelStartFailed: its engine failed to start (now, or within
                ``retry_failed_after_s`` before).
            NoRoomError: memory is taken and no idle on-demand model can be evicted.
            ModelUnavailableError: the fleet is stopping, or a model that is not on demand
                is stopped.
        """
        e = self._engine(name)
        e.last_used = self._clock()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._stopping.is_set():
                raise ModelUnavailableError(name, f"model {name!r} is unavailable: the "
                                            "engines are stopping")
            if e.state is EngineState.READY and not e.parking:
                return e.supervisor.base_url
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelStartTimeout(name, f"model {name!r} is not ready after "
                                        f"{timeout_s:g} s (state: {e.state})")
            try:
                await self._progress(e, remaining)
            except TimeoutError:
                raise ModelStartTimeout(name, f"model {name!r} is not ready after "
                                        f"{timeout_s:g} s (state: {e.state})") from None

    def begin_request(self, name: str) -> None:
        """Count a request in flight on a ready model (call right after
        :meth:`ensure_ready`, with no ``await`` between, or use :meth:`use`).

        Raises:
            UnknownModelError: no local model has that name.
            ModelUnavailableError: the model is not ready (or is being stopped).
        """
        e = self._engine(name)
        if e.state is not EngineState.READY or e.parking:
            raise ModelUnavailableError(name, f"model {name!r} is {e.state}; call "
                                        "ensure_ready first")
        e.in_flight += 1
        e.last_used = self._clock()

    def end_request(self, name: str) -> None:
        """End a request counted by :meth:`begin_request`."""
        e = self._engine(name)
        e.in_flight = max(0, e.in_flight - 1)
        e.last_used = self._clock()

    @contextlib.asynccontextmanager
    async def use(self, name: str, timeout_s: float) -> AsyncIterator[str]:
        """``async with fleet.use(name, timeout_s) as base_url:`` ensure_ready, then
        begin_request, and end_request on the way out. Raises as :meth:`ensure_ready`."""
        base_url = await self.ensure_ready(name, timeout_s)
        self.begin_request(name)
        try:
            yield base_url
        finally:
            self.end_request(name)

    async def reap_idle(self) -> list[str]:
        """Stop (on a GPU: put to sleep) every on-demand model idle for its
        ``idle_ttl_s``; returns their names."""
        reaped = []
        for e in self._engines.values():
            if not self._idle_for_ttl(e):
                continue
            async with self._lock:
                if self._idle_for_ttl(e):  # a request may have come while we waited
                    idle_s = self._clock() - e.last_used
                    await self._park(e, f"idle for {idle_s:.0f} s")
                    reaped.append(e.name)
        return reaped

    # --- internals --------------------------------------------------------------------

    def _engine(self, name: str) -> _Engine:
        try:
            return self._engines[name]
        except KeyError:
            raise UnknownModelError(name, f"no local engine serves model {name!r} "
                                    f"(local models: {', '.join(self._engines)})") from None

    def _engine_args(self, m: ModelConfig) -> tuple[str, ...]:
        assert m.model is not None
        return demo_engine_args(m.model, self.device, tuple(m.engine_args))

    def _supervisor(self, spec: EngineSpec, name: str) -> EngineSupervisor:
        def on_state(state: EngineState, message: str) -> None:
            self._engine_state(name, state, message)

        return EngineSupervisor(spec, on_state=on_state, start_timeout_s=self._start_timeout_s,
                                **self._supervisor_options)

    def _engine_state(self, name: str, state: EngineState, message: str) -> None:
        e = self._engines.get(name)
        if e is not None:
            if state is EngineState.READY:
                e.last_used = self._clock()
            e.changed.set()
            e.changed = asyncio.Event()
        if self._on_state is not None:
            self._on_state(name, state, message)

    def _idle_for_ttl(self, e: _Engine) -> bool:
        return (e.config.on_demand and e.state is EngineState.READY and e.in_flight == 0
                and not e.parking and e.activation is None
                and self._clock() - e.last_used >= e.config.idle_ttl_s)

    async def _progress(self, e: _Engine, timeout_s: float) -> None:
        """One step towards ``e`` being ready; raises TimeoutError after ``timeout_s``."""
        state = e.state
        if e.activation is None and state in (EngineState.STARTING, EngineState.RESTARTING):
            # start() or the supervisor's restart loop is bringing it up: wait for news.
            await asyncio.wait_for(e.changed.wait(), timeout_s)
            return
        if e.activation is None:
            if not e.config.on_demand and not e.parking:
                raise ModelUnavailableError(e.name, f"model {e.name!r} is {state} (it is not "
                                            "on demand: it runs from start-up or not at all)")
            if (e.failed_at is not None and e.last_error is not None
                    and self._clock() - e.failed_at < self._retry_failed_after_s):
                raise ModelStartFailed(e.name, f"model {e.name!r} failed to start: "
                                       f"{str(e.last_error).splitlines()[0]}") from e.last_error
            e.activation = asyncio.create_task(self._activate(e), name=f"teamgpu-start-{e.name}")
            e.activation.add_done_callback(functools.partial(self._activation_done, e))
        try:
            await asyncio.wait_for(asyncio.shield(e.activation), timeout_s)
        except EngineStartError as exc:
            raise ModelStartFailed(e.name, f"model {e.name!r} failed to start: "
                                   f"{str(exc).splitlines()[0]}") from exc
        except EngineControlError as exc:
            raise ModelStartFailed(e.name, f"model {e.name!r} could not be woken: {exc}") from exc

    def _activation_done(self, e: _Engine, task: asyncio.Task[None]) -> None:
        if e.activation is task:
            e.activation = None
        if not task.cancelled():
            task.exception()  # retrieved here; the callers waiting got it already

    async def _activate(self, e: _Engine) -> None:
        """Make room, then start (or wake) ``e``; holds the lock throughout."""
        async with self._lock:
            if self._stopping.is_set():
                raise ModelUnavailableError(e.name, "the engines are stopping")
            if e.state in AWAKE_STATES:
                return  # woken or started by someone else meanwhile
            await self._make_room(e)
            if e.state is EngineState.SLEEPING:
                try:
                    await e.supervisor.wake_up()
                    return
                except EngineControlError as exc:
                    log.warning("model %s did not wake up (%s); restarting it", e.name, exc)
                    await self._stop_engine(e)
            try:
                await self._launch(e)
            except EngineStartError as exc:
                e.failed_at, e.last_error = self._clock(), exc
                raise
            e.failed_at = e.last_error = None

    async def _launch(self, e: _Engine) -> None:
        """Start ``e``'s engine (on a new port if its old one was taken) and watch it."""
        if not port_is_free(e.spec.port):
            old = e.spec.port
            e.spec = dataclasses.replace(e.spec, port=free_port())
            e.supervisor = self._supervisor(e.spec, e.name)
            log.warning("port %d of model %s is taken; using %d", old, e.name, e.spec.port)
        await e.supervisor.start()
        e.watcher = asyncio.create_task(self._watch(e), name=f"teamgpu-engine-{e.name}")

    async def _watch(self, e: _Engine) -> None:
        try:
            await e.supervisor.run()
        except EngineStartError as exc:  # only if the process was gone before run()
            log.warning("model %s: %s", e.name, exc)

    def _awake_and_asleep(self, besides: _Engine) -> tuple[list[str], list[str]]:
        others = [x for x in self._engines.values() if x is not besides]
        return ([x.name for x in others if x.state in AWAKE_STATES],
                [x.name for x in others if x.state is EngineState.SLEEPING])

    async def _make_room(self, e: _Engine) -> None:
        """Evict idle on-demand models, least recently used first, until ``e`` fits.

        Raises:
            NoRoomError: it does not fit and nothing more can be evicted.
        """
        while True:
            awake, asleep = self._awake_and_asleep(e)
            mem = self._mem_available() if self.device == "cpu" else None
            if self.plan.fits([*awake, e.name], asleep, new=e.name, mem_available=mem):
                return
            idle = [x for x in self._engines.values() if x is not e and x.config.on_demand
                    and x.in_flight == 0 and not x.parking and x.activation is None]
            # Awake ones first (sleeping frees most of a GPU share), then one crashed and
            # restarting with nobody waiting, then sleepers (stopping frees the rest).
            victims = ([x for x in idle if x.state is EngineState.READY]
                       or [x for x in idle if x.state is EngineState.RESTARTING]
                       or [x for x in idle if x.state is EngineState.SLEEPING])
            if not victims:
                raise NoRoomError(e.name, self._no_room_message(e, awake, asleep, mem))
            victim = min(victims, key=lambda x: x.last_used)
            await self._park(victim, f"to make room for {e.name!r}",
                             stop=victim.state is not EngineState.READY)

    def _no_room_message(self, e: _Engine, awake: list[str], asleep: list[str],
                         mem: int | None) -> str:
        busy = [f"{x.name} ({x.in_flight} in flight)" for x in self._engines.values()
                if x.in_flight]
        pinned = [n for n in awake if not self._engines[n].config.on_demand]
        now = "" if mem is None else f"; MemAvailable now {mem / 2**30:.2f} GiB"
        return (f"model {e.name!r} cannot start now: not enough memory, and no idle on-demand "
                f"model is left to stop{now}.\n{self.plan.describe([*awake, e.name], asleep)}\n"
                f"  busy: {', '.join(busy) or 'none'}; not on demand (never stopped): "
                f"{', '.join(pinned) or 'none'}")

    async def _park(self, e: _Engine, why: str, *, stop: bool = False) -> None:
        """Put ``e`` to sleep (GPU, host RAM permitting) or stop it. Caller holds the lock."""
        e.parking = True
        try:
            if (not stop and e.sleepable and e.state is EngineState.READY
                    and self._host_ram_for_sleep(e)):
                try:
                    await e.supervisor.sleep(SLEEP_LEVEL)
                    log.info("model %s asleep (%s)", e.name, why)
                    return
                except EngineControlError as exc:
                    log.warning("model %s did not go to sleep (%s); stopping it", e.name, exc)
            await self._stop_engine(e)
            log.info("model %s stopped (%s)", e.name, why)
        finally:
            e.parking = False

    def _host_ram_for_sleep(self, e: _Engine) -> bool:
        try:
            free = self._mem_available() - CPU_RESERVE_BYTES
        except (MemoryPlanError, OSError):  # no MemAvailable: do not risk the host
            return False
        return e.weight_bytes <= free

    async def _stop_engine(self, e: _Engine) -> None:
        await e.supervisor.stop()
        if e.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(e.watcher, timeout=5.0)
            e.watcher = None

