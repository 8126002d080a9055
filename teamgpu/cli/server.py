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
from pathlib import Path
from typing import Any

import click
import uvicorn
from rich.console import Console
from sqlalchemy import Engine

from teamgpu.app import create_app
from teamgpu.auth.keys import KeyStore
from teamgpu.cli.common import load_settings, settings_options
from teamgpu.cli.server_record import ServerRecord, gateway_url, remove_record, write_record
from teamgpu.engine.demo import DEMO_MARKER, DEMO_MODEL_NAME
from teamgpu.preflight import (
    DEFAULT_INFLIGHT,
    ConfigError,
    check_port_free,
    check_settings,
    engine_capacity,
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
    if not s.backends:
        raise click.UsageError("give at least one --backend URL (or set backends in teamgpu.toml)")
    _logging(s)
    store = _preflight(s)
    _first_run_key(s, KeyStore(store))
    record = ServerRecord(kind="serve", pid=os.getpid(), gateway_url=gateway_url(s.host, s.port),
                          backends=list(s.backends))

    async def on_open(_gw: Any) -> None:
        write_record(s.data_dir, record)

    console.print(f"teamgpu gateway on http://{s.host}:{s.port} -> {', '.join(s.backends)}")
    app = create_app(s, store=store, on_open=on_open,
                     on_close=lambda: remove_record(s.data_dir, record.pid))
    uvicorn.Server(_uvicorn_config(app, s)).run()


def _preflight(s: Settings) -> Engine:
    """Everything ``serve`` and ``up`` refuse before they start anything (see
    :mod:`teamgpu.preflight`); returns the opened store.

    Raises:
        click.ClickException: exit status 1 with the message and its fix.
    """
    try:
        check_settings(s)
        scheduler_config(s, s.max_inflight_per_backend or DEFAULT_INFLIGHT)
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


VLLM_DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default on a GPU when --max-num-seqs is not given


def demo_model_dir() -> Path:
    return default_cache_dir() / "models" / DEMO_MODEL_NAME


@click.command("up")
@click.option("--model", default=None,
              help="Local model folder or model id (default: the demo model).")
@click.option("--served-model-name", default=None, help="Name clients use for the model.")
@click.option("--engine-arg", "engine_args", multiple=True,
              help="A further flag for vLLM, e.g. --engine-arg=--max-num-seqs=32 (repeatable).")
@click.option("--engine-python", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Python of the engine venv (default: the one setup recorded).")
@click.option("--engine-port", type=int, default=None, help="Private engine port (default: any).")
@_server_options
@settings_options
def up(_settings_overrides: dict[str, Any], model: str | None, served_model_name: str | None,
       engine_args: tuple[str, ...], engine_python: Path | None, engine_port: int | None,
       host: str | None, port: int | None, max_inflight: int | None,
       redis_url: str | None) -> None:
    """Start vLLM (supervised, on 127.0.0.1) and the gateway in front of it.

    Ctrl-C or SIGTERM stops both. If the engine dies, clients get 503 with Retry-After
    while it is restarted with backoff.
    """
    from teamgpu.engine.demo import demo_engine_args
    from teamgpu.engine.errors import EngineConfigError
    from teamgpu.engine.supervisor import EngineSpec, build_command, engine_arg, free_port

    s = load_settings(**_settings_overrides, model=model, served_model_name=served_model_name,
                      engine_args=list(engine_args) or None, engine_python=engine_python,
                      engine_port=engine_port, host=host, port=port,
                      max_inflight_per_backend=max_inflight, redis_url=redis_url)
    _logging(s)
    py = find_engine_python(s)
    if py is None:
        raise click.ClickException(
            "no engine environment found: run scripts/setup-engine.sh (or ./run.sh), "
            "or pass --engine-python")
    model_path = s.model
    if model_path is None:
        d = demo_model_dir()
        if not (d / DEMO_MARKER).exists():
            raise click.ClickException(
                f"the demo model is not prepared at {d}: run scripts/prepare-demo-model.sh "
                "(or ./run.sh), or pass --model")
        model_path = str(d)
    served = s.served_model_name or (
        DEMO_MODEL_NAME if s.model is None else Path(model_path.rstrip("/")).name)
    device = "cuda" if has_cuda_gpu() else "cpu"
    s.data_dir.mkdir(parents=True, exist_ok=True)
    spec = EngineSpec(
        python=py, model=model_path, served_model_name=served,
        port=s.engine_port or free_port(),
        args=demo_engine_args(model_path, device, tuple(s.engine_args)),
        env={"VLLM_CPU_KVCACHE_SPACE": "1"} if device == "cpu" else {},
        log_path=s.data_dir / "engine.log", device=device,
    )
    try:
        command = build_command(spec)
        max_num_seqs = engine_capacity(engine_arg(command, "--max-num-seqs"),
                                       VLLM_DEFAULT_MAX_NUM_SEQS)
    except EngineConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if s.max_inflight_per_backend is None:
        s.max_inflight_per_backend = max_num_seqs  # admission follows the engine's batch size
    elif s.max_inflight_per_backend > max_num_seqs:
        log.warning("--max-inflight %d is above the engine's --max-num-seqs %d: requests past "
                    "%d wait in vLLM's own queue, where fair share does not apply",
                    s.max_inflight_per_backend, max_num_seqs, max_num_seqs)
    store = _preflight(s)
    try:
        code = asyncio.run(_up(s, spec, store))
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
        console.print(f"sanity check: {SANITY_QUESTION!r} -> {result.answer.strip()!r}",
                      highlight=False)
        return
    if result.error is not None:
        console.print(f"[yellow]sanity check skipped:[/] could not ask {SANITY_QUESTION!r}: "
                      f"{result.error}", highlight=False)
        return
    dtype = engine_arg(spec.args, "--dtype") or "auto"
    console.rule("[bold red]WRONG ANSWER FROM THE MODEL", style="red")
    console.print(
        f"[bold red]Asked {SANITY_QUESTION!r} (temperature 0), the model answered:[/]\n"
        f"  {result.answer.strip()[:300]!r}\n"
        f"The engine runs with --dtype {dtype}. A small model on a CPU can answer nonsense "
        "in bf16 (the result depends on the CPU's bf16 kernels): try "
        "--engine-arg=--dtype=float32. The server keeps running.",
        highlight=False, soft_wrap=True)
    console.rule(style="red")
    logging.getLogger("teamgpu.engine").warning(
        "sanity check failed: %r answered %r", SANITY_QUESTION, result.answer[:300])


async def _up(s: Settings, spec: Any, store: Engine) -> int:
    from teamgpu.engine.errors import EngineStartError
    from teamgpu.engine.supervisor import EngineState, EngineSupervisor

    served = spec.served_model_name
    _first_run_key(s, KeyStore(store), served)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def on_signal(signum: int, frame: Any = None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            loop.call_soon_threadsafe(main.cancel)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    status = console.status("starting vLLM…")
    status.start()

    last_state: list[Any] = [None, 0.0]
    interactive = console.is_terminal
    gateway: list[Any] = []  # the open Gateway, once the app's lifespan opened it

    def on_state(state: Any, message: str) -> None:
        name = getattr(state, "value", state)
        status.update(f"[bold]vLLM[/] {name}: {message}")
        now = time.monotonic()
        changed = state != last_state[0]
        if gateway and state in (EngineState.RESTARTING, EngineState.FAILED):
            # the engine is gone: answer 503 at once instead of waiting for a health poll
            pool = gateway[0].pool
            for b in pool.backends:
                if b.url == sup.base_url and b.up:
                    pool.report_failure(b, message)
        # without a terminal the spinner shows nothing: print a line on every change of
        # state and every 15 s while it lasts
        if changed or (not interactive and not gw_started and now - last_state[1] >= 15):
            last_state[0], last_state[1] = state, now
            if gw_started:
                logging.getLogger("teamgpu.engine").log(
                    logging.INFO if name == "ready" else logging.WARNING,
                    "engine %s: %s", name, message)
            elif not interactive:
                console.print(f"vLLM {name}: {message}", highlight=False)

    gw_started = False
    sup = EngineSupervisor(spec, on_state=on_state, start_timeout_s=s.engine_start_timeout_s)
    record = ServerRecord(kind="up", pid=os.getpid(), gateway_url=gateway_url(s.host, s.port),
                          backends=[sup.base_url], engine_url=sup.base_url,
                          served_model_name=served, model=spec.model,
                          engine_args=list(spec.args))

    async def on_open(gw: Any) -> None:
        gateway.append(gw)
        write_record(s.data_dir, record)

    try:
        try:
            await sup.start()
        except EngineStartError as exc:
            status.stop()
            console.print(f"[red]vLLM did not start:[/] {exc}")
            return 1
        finally:
            status.stop()
        console.print(f"vLLM ready on {sup.base_url} (private), model {served!r}; "
                      f"log: {spec.log_path}")
        await _sanity_check(sup.base_url, served, spec)
        s.backends = [sup.base_url]
        gw_started = True
        app = create_app(s, store=store, on_open=on_open,
                         on_close=lambda: remove_record(s.data_dir, record.pid))
        server = uvicorn.Server(_uvicorn_config(app, s))
        engine_task = asyncio.create_task(sup.run(), name="teamgpu-engine")
        console.print(f"teamgpu gateway on http://{s.host}:{s.port}  (Ctrl-C stops both)")
        # uvicorn handles SIGINT/SIGTERM during serve() and re-raises them afterwards;
        # our handler then only records them.
        await server.serve()
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        return 0
    except asyncio.CancelledError:
        return 130
    finally:
        remove_record(s.data_dir, record.pid)
        console.print("stopping vLLM…")
        await asyncio.shield(sup.stop())
        console.print("stopped.")
