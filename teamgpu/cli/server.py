"""``teamgpu serve`` (gateway only) and ``teamgpu up`` (vLLM plus gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
import uvicorn
from rich.console import Console
from sqlalchemy import Engine

from teamgpu.app import create_app
from teamgpu.auth.keys import KeyStore
from teamgpu.cli.common import load_settings, settings_options
from teamgpu.cli.server_record import ServerRecord, gateway_url, remove_record, write_record
from teamgpu.preflight import (
    DEFAULT_INFLIGHT,
    ConfigError,
    check_port_free,
    check_settings,
    open_store_checked,
    scheduler_config,
)
from teamgpu.settings import Settings, default_cache_dir, default_data_dir

console = Console(stderr=True)
log = logging.getLogger("teamgpu.server")


def _server_options(fn: Any) -> Any:
    fn = click.option("--host", default=None, help="Gateway address (default 0.0.0.0).")(fn)
    fn = click.option("--port", type=int, default=None, help="Gateway port (default 8080).")(fn)
    fn = click.option("--max-inflight", "max_inflight", type=click.IntRange(min=1), default=None,
                      help="Requests in the engine at once per backend.")(fn)
    return click.option("--redis-url", default=None,
                        help="Keep limit state in Redis, shared by gateway replicas.")(fn)


def _first_run_key(settings: Settings, keys: KeyStore, model: str | None = None) -> None:
    """Create and print an admin key when the store has no active admin key."""
    if keys.has_admin():
        return
    secret, p = keys.create("admin", admin=True)
    host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = f"http://{host}:{settings.port}/v1"
    model_name = model or "MODEL"
    argv0 = sys.argv[0] if sys.argv else ""
    teamgpu = argv0 if "/" in argv0 else "teamgpu"  # the path this command was run by
    data = "" if settings.data_dir == default_data_dir() else f" --data-dir {settings.data_dir}"
    console.rule("[bold]first run: admin key")
    console.print(
        f"Created admin key [bold]{p.key_id}[/] for user 'admin'. It is shown this once:\n\n"
        f"  [bold green]{secret}[/]\n\n"
        f"Make a key for each developer:  {teamgpu} keys create alice{data}\n\n"
        "Try it with curl:\n"
        f"  curl {base}/chat/completions -H 'Authorization: Bearer {secret}' \\\n"
        "    -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{model_name}\", \"temperature\": 0, \"max_tokens\": 64, "
        "\"messages\": "
        "[{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'\n\n"
        "Or with the OpenAI SDK:\n"
        f"  export OPENAI_BASE_URL={base}\n"
        f"  export OPENAI_API_KEY={secret}\n"
        "  python -c \"from openai import OpenAI; c = OpenAI(); "
        f"print(c.chat.completions.create(model='{model_name}', temperature=0, max_tokens=64, "
        "messages=[{'role': 'user', 'content': 'What is the capital of France?'}])"
        ".choices[0].message.content)\"\n"
        + ("" if model else "(MODEL: a name that GET /v1/models lists)"),
        highlight=False, soft_wrap=True,
    )
    console.rule()


def _uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, http="httptools", loop="uvloop", lifespan="on",
        proxy_headers=False,  # the client address comes from trust_forwarded_for only
        timeout_graceful_shutdown=10, workers=1,
    )


async def _serve_announced(server: uvicorn.Server, banner: str) -> None:
    """Run ``server`` and print ``banner`` once it listens (after the app's start-up:
    migrations, the store, the first health poll), so that a client reading the banner can
    connect at once; a server that fails to start prints nothing."""
    serving = asyncio.create_task(server.serve(), name="teamgpu-gateway")
    while not server.started and not serving.done():
        await asyncio.wait({serving}, timeout=0.05)
    if server.started:
        console.print(banner, highlight=False)
    await serving


def _logging(settings: Settings) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.command("serve")
@click.option("--backend", "backends", multiple=True,
              help="Base URL of a running vLLM or OpenAI-compatible server (repeatable).")
@_server_options
@settings_options
def serve(_settings_overrides: dict[str, Any], backends: tuple[str, ...], host: str | None,
          port: int | None, max_inflight: int | None, redis_url: str | None) -> None:
    """Run only the gateway, in front of backends that already run."""
    s = load_settings(**_settings_overrides, backends=list(backends) or None, host=host, port=port,
                      max_inflight_per_backend=max_inflight, redis_url=redis_url)
    # the servers of [[models]] entries with backends, and their aliases, join the pool
    s.backends = list(dict.fromkeys([*s.backends, *(u for m in s.models for u in m.backends)]))
    s.model_aliases = {**s.model_aliases, **{a: m.name for m in s.models for a in m.aliases}}
    if not s.backends:
        raise click.UsageError("give at least one --backend URL (or set backends in teamgpu.toml)")
    _logging(s)
    store = _preflight(s)
    _first_run_key(s, KeyStore(store))
    record = ServerRecord(kind="serve", pid=os.getpid(), gateway_url=gateway_url(s.host, s.port),
                          backends=list(s.backends))

    async def on_open(_gw: Any) -> None:
        write_record(s.data_dir, record)

    app = create_app(s, store=store, on_open=on_open,
                     on_close=lambda: remove_record(s.data_dir, record.pid))
    config = _uvicorn_config(app, s)
    banner = f"teamgpu gateway on http://{s.host}:{s.port} -> {', '.join(s.backends)}"
    with contextlib.suppress(KeyboardInterrupt), \
            asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve_announced(uvicorn.Server(config), banner))


def _preflight(s: Settings, capacities: list[int] | None = None) -> Engine:
    """Everything ``serve`` and ``up`` refuse before they start anything (see
    :mod:`teamgpu.preflight`); returns the opened store.

    Raises:
        click.ClickException: exit status 1 with the message and its fix.
    """
    try:
        check_settings(s)
        for capacity in capacities or [s.max_inflight_per_backend or DEFAULT_INFLIGHT]:
            scheduler_config(s, capacity)
        check_port_free(s.host, s.port)
        return open_store_checked(s)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def find_engine_python(settings: Settings) -> Path | None:
    """The engine venv's python: the setting, else the one scripts/setup-engine.sh recorded."""
    if settings.engine_python:
        return settings.engine_python
    marker = default_cache_dir() / "engine-python"
    if marker.exists():
        p = Path(marker.read_text().strip())
        if p.exists():
            return p
    return None


def has_cuda_gpu() -> bool:
    """Whether ``nvidia-smi -L`` lists a GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


@click.command("up")
@click.option("--model", "models", multiple=True,
              help="A local model folder or model id to serve (repeatable; default: the "
                   "models of [[models]] in teamgpu.toml, else the demo set: a chat and an "
                   "embeddings model).")
@click.option("--served-model-name", default=None,
              help="Name clients use for the model (with one --model).")
@click.option("--engine-arg", "engine_args", multiple=True,
              help="A further flag for vLLM, e.g. --engine-arg=--max-num-seqs=32 (repeatable; "
                   "every engine).")
@click.option("--tool-call-parser", default=None,
              help="vLLM's tool-call parser for the chat models: auto (default: from the "
                   "model's chat template), none, or a parser name.")
@click.option("--engine-python", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Python of the engine venv (default: the one setup recorded).")
@click.option("--engine-port", type=int, default=None,
              help="Private port of the first model's engine (default: any).")
@_server_options
@settings_options
def up(_settings_overrides: dict[str, Any], models: tuple[str, ...],
       served_model_name: str | None, engine_args: tuple[str, ...],
       tool_call_parser: str | None, engine_python: Path | None, engine_port: int | None,
       host: str | None, port: int | None, max_inflight: int | None,
       redis_url: str | None) -> None:
    """Start vLLM (one supervised engine per model, on 127.0.0.1) and the gateway in front.

    Ctrl-C or SIGTERM stops everything. If an engine dies, its models answer 503 with
    Retry-After while it is restarted with backoff; the other models keep serving.
    """
    from teamgpu.engine.errors import EngineError
    from teamgpu.engine.fleet import EngineFleet
    from teamgpu.engine.modelset import resolve_model_set

    s = load_settings(**_settings_overrides, served_model_name=served_model_name,
                      engine_args=list(engine_args) or None, engine_python=engine_python,
                      engine_port=engine_port, host=host, port=port,
                      max_inflight_per_backend=max_inflight, redis_url=redis_url)
    _logging(s)
    py = find_engine_python(s)
    if py is None:
        raise click.ClickException(
            "no engine environment found: run scripts/setup-engine.sh (or ./run.sh), "
            "or pass --engine-python")
    device: Literal["cpu", "cuda"] = "cuda" if has_cuda_gpu() else "cpu"
    s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        mset = resolve_model_set(s, models, served_model_name=s.served_model_name,
                                 tool_call_parser=tool_call_parser, device=device,
                                 models_dir=default_cache_dir() / "models")
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for note in mset.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    local = [m for m in mset.models if m.local]
    if not local:
        raise click.ClickException("no local model to start: every model of the set is "
                                   "remote (backends only); use `teamgpu serve` instead")
    store = _preflight(s, capacities=list(mset.capacity.values()))
    ports = {local[0].name: s.engine_port} if s.engine_port else {}
    relay: list[Callable[[str, Any, str], None]] = []  # _up's state callback, once set
    try:
        fleet = EngineFleet(mset.models, python=py, device=device, log_dir=s.data_dir,
                            # stored Responses API objects (teamgpu/store/responses.py)
                            env={"VLLM_ENABLE_RESPONSES_API_STORE": "1"},
                            start_timeout_s=s.engine_start_timeout_s, ports=ports,
                            on_state=lambda n, st, msg: relay[0](n, st, msg) if relay
                            else None)
    except (EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        code = asyncio.run(_up(s, fleet, mset, store, relay))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _sanity_check(base_url: str, served: str, spec: Any) -> None:
    """Ask the engine the sanity question and say loudly when its answer is wrong.

    A wrong answer does not stop ``up`` (the team may still want the server), but it is
    printed in a red box with the likely cause: numerics (bf16 kernels on this CPU) for a
    model that should know the answer.
    """
    from teamgpu.engine.demo import SANITY_QUESTION, ask_sanity_question
    from teamgpu.engine.supervisor import engine_arg

    result = await ask_sanity_question(base_url, served)
    if result.ok:
        console.print(f"sanity check: {served}: {SANITY_QUESTION!r} -> "
                      f"{result.answer.strip()!r}", highlight=False)
        return
    if result.error is not None:
        console.print(f"[yellow]sanity check skipped:[/] could not ask {served} "
                      f"{SANITY_QUESTION!r}: {result.error}", highlight=False)
        return
    dtype = engine_arg(spec.args, "--dtype") or "auto"
    console.rule("[bold red]WRONG ANSWER FROM THE MODEL", style="red")
    console.print(
        f"[bold red]Asked {SANITY_QUESTION!r} (temperature 0), {served} answered:[/]\n"
        f"  {result.answer.strip()[:300]!r}\n"
        f"The engine runs with --dtype {dtype}. A small model on a CPU can answer nonsense "
        "in bf16 (the result depends on the CPU's bf16 kernels): try "
        "--engine-arg=--dtype=float32. The server keeps running.",
        highlight=False, soft_wrap=True)
    console.rule(style="red")
    logging.getLogger("teamgpu.engine").warning(
        "sanity check failed: %s answered %r to %r", served, result.answer[:300],
        SANITY_QUESTION)


async def _up(s: Settings, fleet: Any, mset: Any, store: Engine,
              relay: list[Callable[[str, Any, str], None]]) -> int:
    from teamgpu.engine.errors import EngineStartError
    from teamgpu.engine.host import FleetHost
    from teamgpu.engine.supervisor import EngineState

    chat = next((m.name for m in mset.models if "chat" in m.roles), mset.models[0].name)
    _first_run_key(s, KeyStore(store), chat)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopping = False
    serving: list[uvicorn.Server] = []  # the gateway, once it serves

    def on_signal(signum: int, frame: Any = None) -> None:
        nonlocal stopping
        if serving:  # uvicorn's own handlers stop it; this one sees the signal uvicorn
            serving[0].should_exit = True  # re-raises after serve(): a clean stop, exit 0
        elif not stopping:
            stopping = True
            loop.call_soon_threadsafe(main.cancel)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    names = fleet.names()
    status = console.status(f"starting vLLM ({', '.join(names)})…")
    status.start()
    interactive = console.is_terminal
    gw_started = False
    last: dict[str, tuple[Any, str, float]] = {}
    # the gateway's view of the fleet; its pool is set when the app's lifespan opens it,
    # and until then the states it is given move nothing
    host = FleetHost(fleet, None, start_timeout_s=s.model_start_timeout_s,
                     retry_after_s=s.backend_down_retry_after_s, models=list(mset.models))
    engine_log = logging.getLogger("teamgpu.engine")

    def on_state(name: str, state: Any, message: str) -> None:
        host.on_state(name, state, message)
        status.update(f"[bold]vLLM {name}[/] {state}: {message}")
        now = time.monotonic()
        prev = last.get(name)
        progress = message.startswith("waiting")  # the supervisor's 0.5 s start progress
        # every new message but the progress repeats (a crash has two: what died, then
        # how the API server ended); without a terminal, progress every 15 s
        if prev is None or prev[0] != state or (not progress and prev[1] != message) or (
                progress and not interactive and not gw_started and now - prev[2] >= 15):
            last[name] = (state, message, now)
            if gw_started:
                # a crash is a warning; a start, a stop (idle, or ours) or a wake is not
                engine_log.log(logging.WARNING if state is EngineState.RESTARTING
                               else logging.INFO,
                               "engine %s %s: %s", name, state, message)
            elif not interactive:
                console.print(f"vLLM {name} {state}: {message}", highlight=False)

    relay.append(on_state)
    record = ServerRecord(
        kind="up", pid=os.getpid(), gateway_url=gateway_url(s.host, s.port),
        backends=[fleet.base_url(n) for n in names], engine_url=fleet.base_url(chat)
        if chat in names else fleet.base_url(names[0]),
        served_model_name=chat, model=fleet.spec(chat).model if chat in names else None,
        engine_args=list(fleet.spec(chat).args) if chat in names else [])
    try:
        try:
            await fleet.start()
        except EngineStartError as exc:
            status.stop()
            console.print(f"[red]vLLM did not start:[/] {exc}")
            return 1
        finally:
            status.stop()
        for n in names:
            st = fleet.state(n)
            where = fleet.base_url(n)
            console.print(f"vLLM {n}: {st} on {where} (private); log: {fleet.spec(n).log_path}",
                          highlight=False)
        for m in mset.models:
            if m.local and m.generates and fleet.state(m.name) is EngineState.READY:
                await _sanity_check(fleet.base_url(m.name), m.name, fleet.spec(m.name))
        remote = [u for m in mset.models if not m.local for u in m.backends]
        s.backends = [*(fleet.base_url(n) for n in names), *remote]
        s.model_aliases = {**s.model_aliases,
                           **{a: m.name for m in mset.models for a in m.aliases}}
        s.models = list(mset.models)  # the set served: roles in /v1/models and /stats

        async def on_open(gw: Any) -> None:
            host.pool = gw.pool
            for n in names:  # a model stopped on demand is parked, not down
                host.on_state(n, fleet.state(n), "at start")
            write_record(s.data_dir, record)

        gw_started = True
        app = create_app(s, store=store, on_open=on_open, host=host,
                         model_capacity=mset.capacity,
                         declared={fleet.base_url(n): [n] for n in names},
                         on_close=lambda: remove_record(s.data_dir, record.pid))
        server = uvicorn.Server(_uvicorn_config(app, s))
        serving.append(server)
        engines = asyncio.create_task(fleet.run(), name="teamgpu-engines")
        # uvicorn handles SIGINT/SIGTERM during serve() and re-raises them afterwards;
        # on_signal then only asks the server to exit (a no-op by then): exit status 0.
        await _serve_announced(server, f"teamgpu gateway on http://{s.host}:{s.port}  "
                                       "(Ctrl-C stops everything)")
        engines.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engines
        return 0
    except asyncio.CancelledError:
        return 130
    finally:
        remove_record(s.data_dir, record.pid)
        console.print("stopping vLLM…")
        await asyncio.shield(fleet.stop())
        console.print("stopped.")
