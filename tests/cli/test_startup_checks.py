"""Mistakes fail at start-up, never per request (issue 9, point 2), and ``doctor`` checks the
server that runs (point 4).

Each configuration the scheduler, the limits, the store or the engine cannot work with is
either refused when ``serve``/``up`` starts, exit status 1 with the fix in the message, or
adapted with a logged warning; the adapted ones then answer every request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from teamgpu.cli.doctor import doctor
from teamgpu.cli.server import serve, up
from teamgpu.cli.server_record import RECORD_NAME, ServerRecord, read_record, write_record
from teamgpu.preflight import scheduler_config
from teamgpu.scheduler import PriorityClass
from teamgpu.settings import Settings
from tests.support.fake_backend import MODEL, ServerThread, free_port
from tests.support.harness import start_gateway, wait_until

TEAMGPU = str(Path(sys.executable).parent / "teamgpu")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def invoke(command: Any, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(command, list(args), catch_exceptions=False)
    return r.exit_code, r.output


# --- adapted, with a warning ---------------------------------------------------------------
@pytest.mark.parametrize(("capacity", "high", "normal"), [(1, 0, 0), (2, 1, 0), (3, 2, 0),
                                                          (4, 2, 1), (16, 2, 1)])
def test_reserves_shrink_to_leave_low_a_slot(clean_env: Path, capacity: int, high: int,
                                             normal: int) -> None:
    cfg, warnings = scheduler_config(Settings(data_dir=clean_env), capacity)
    assert (cfg.reserved_slots_high, cfg.reserved_slots_normal) == (high, normal)
    assert cfg.admission_limit(PriorityClass.LOW, capacity) >= 1  # low has a slot
    cfg.check_capacity(capacity)  # so this never raises on the request path
    if (high, normal) == (2, 1):
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert f"reserved_slots_high={high}" in warnings[0]
        assert "--max-num-seqs" in warnings[0]


@pytest.mark.parametrize("max_inflight", [1, 2, 3])
def test_a_small_capacity_serves_every_class(clean_env: Path, fake_server: ServerThread,
                                             caplog: pytest.LogCaptureFixture,
                                             max_inflight: int) -> None:
    """``--max-inflight 1`` (or an engine with ``--max-num-seqs 3``) used to answer 500 to
    every request: now the reserves shrink at start and every class is served."""
    with caplog.at_level(logging.WARNING, logger="teamgpu"), \
            start_gateway(clean_env / "gw", [fake_server.url],
                          max_inflight_per_backend=max_inflight) as h:
        c = h.client()
        for cls in ("high", "normal", "low"):
            r = c.post("/v1/chat/completions", json=CHAT, headers={"X-Priority": cls})
            assert r.status_code == 200, r.text
            assert h.wait_row(r.headers["x-request-id"])["outcome"] == "ok"
    assert any("leave no slot for low" in rec.getMessage() for rec in caplog.records)


# --- refused at start, with the fix -------------------------------------------------------
def test_serve_refuses_token_weights_that_are_both_zero(clean_env: Path) -> None:
    os.environ["TEAMGPU_INPUT_TOKEN_WEIGHT"] = "0"
    os.environ["TEAMGPU_OUTPUT_TOKEN_WEIGHT"] = "0"
    try:
        code, out = invoke(serve, "--backend", "http://127.0.0.1:9", "--data-dir",
                           str(clean_env / "d"), "--port", str(free_port()))
    finally:
        del os.environ["TEAMGPU_INPUT_TOKEN_WEIGHT"], os.environ["TEAMGPU_OUTPUT_TOKEN_WEIGHT"]
    assert code == 1
    assert "input_token_weight=0 and output_token_weight=0" in out


def test_serve_refuses_a_redis_url_that_is_not_redis(clean_env: Path) -> None:
    code, out = invoke(serve, "--backend", "http://127.0.0.1:9", "--data-dir",
                       str(clean_env / "d"), "--port", str(free_port()),
                       "--redis-url", "http://user:secret@cache:6379/0")
    assert code == 1
    assert "redis://" in out and "secret" not in out  # the fix, and the password masked


def test_serve_refuses_a_port_in_use(clean_env: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = invoke(serve, "--backend", "http://127.0.0.1:9", "--host", "127.0.0.1",
                           "--port", str(port), "--data-dir", str(clean_env / "d"))
    assert code == 1
    assert f"port {port}" in out and "in use" in out and "--port" in out


def test_serve_refuses_a_store_it_cannot_open(clean_env: Path) -> None:
    os.environ["TEAMGPU_DATABASE_URL"] = "postgresql+psycopg://teamgpu:pw@127.0.0.1:1/none"
    try:
        code, out = invoke(serve, "--backend", "http://127.0.0.1:9", "--port",
                           str(free_port()), "--data-dir", str(clean_env / "d"))
    finally:
        del os.environ["TEAMGPU_DATABASE_URL"]
    assert code == 1
    assert "cannot open the store" in out and "pw" not in out
    assert "database server runs" in out


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return d


@pytest.mark.parametrize(("arg", "expected"), [
    ("--engine-arg=--port=9000", "may not set --port"),
    ("--engine-arg=--max-num-seqs=lots", "--max-num-seqs='lots': must be a positive integer"),
    ("--engine-arg=--max-num-seqs=0", "must be a positive integer"),
])
def test_up_refuses_engine_flags_before_starting_anything(clean_env: Path, model_dir: Path,
                                                          arg: str, expected: str) -> None:
    code, out = invoke(up, "--engine-python", sys.executable, "--model", str(model_dir),
                       "--port", str(free_port()), "--data-dir", str(clean_env / "d"), arg)
    assert code == 1, out
    assert expected in out
    assert not (clean_env / "d" / "engine.log").exists()  # no engine was launched


# --- doctor checks the server that runs ----------------------------------------------------
def test_serve_records_where_it_listens_and_doctor_reads_it(clean_env: Path,
                                                             fake_server: ServerThread) -> None:
    data = clean_env / "d"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEAMGPU_", "OPENAI_"))}
    proc = subprocess.Popen([TEAMGPU, "serve", "--backend", fake_server.url, "--host",
                             "127.0.0.1", "--port", str(port), "--data-dir", str(data)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (data / RECORD_NAME).exists() or proc.poll() is not None, 30,
                   "server.json")
        record, note = read_record(data)
        assert record is not None, note
        assert (record.kind, record.pid, record.gateway_url, record.backends) == (
            "serve", proc.pid, f"http://127.0.0.1:{port}", [fake_server.url])
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
                   10, "the gateway")
        # no --url: doctor finds the gateway on the recorded port, not the default 8080
        _code, out = invoke(doctor, "--data-dir", str(data), "--skip-gpu", "--json")
        report = json.loads(out)
        assert report["server"].startswith(f"teamgpu serve (pid {proc.pid}) at "
                                           f"http://127.0.0.1:{port}")
        checks = {c["name"]: c for c in report["checks"]}
        assert checks["backend"]["status"] == "pass", checks["backend"]
        assert fake_server.url in checks["backend"]["message"]
        assert checks["gateway"]["status"] == "warn"  # up; no key given, no request tried
        assert f"127.0.0.1:{port}" in checks["gateway"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert not (data / RECORD_NAME).exists()  # removed on a clean stop


def test_the_banner_comes_when_the_gateway_listens(clean_env: Path,
                                                   fake_server: ServerThread) -> None:
    """A client (or a test) that connects on reading "teamgpu gateway on" is never
    refused: the line is printed after the port is bound, not before the app starts."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEAMGPU_", "OPENAI_"))}
    proc = subprocess.Popen([TEAMGPU, "serve", "--backend", fake_server.url, "--host",
                             "127.0.0.1", "--port", str(port), "--data-dir",
                             str(clean_env / "d")],
                            env={**env, "TERM": "dumb", "COLUMNS": "200"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "teamgpu gateway on" in line:
                break
        else:
            pytest.fail(f"serve exited with {proc.wait()} and no banner")
        assert f"http://127.0.0.1:{port}" in line
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # no retry
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        proc.stdout.close()


def test_a_stale_record_is_ignored_and_said_so(clean_env: Path) -> None:
    data = clean_env / "d"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(data, ServerRecord(kind="up", pid=dead.pid,
                                    gateway_url="http://127.0.0.1:1"))
    record, note = read_record(data)
    assert record is None and note is not None and "not running (stale)" in note
    code, out = invoke(doctor, "--data-dir", str(data), "--skip-gpu")
    assert code == 1
    assert "no running server recorded" in out and "stale" in out
