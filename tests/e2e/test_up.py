"""``teamgpu up`` as a user runs it: vLLM supervised behind the gateway, first-run key,
503 with Retry-After while the engine is down, restart, clean stop with no orphan."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.support.fake_backend import free_port
from tests.support.harness import wait_until

from .conftest import (
    ENGINE_FIXTURE_S,
    SERVED_MODEL_NAME,
    VllmEngine,
    pids_with,
    saw_answer,
    stop_up,
)

TEAMGPU = str(Path(sys.executable).parent / "teamgpu")


# Its own waits add up to about 940 s at worst (start 300, two restarts 240 each, ...);
# it takes 4-5 min here. The fixture's bounds come on top when it runs first.
@pytest.mark.timeout(ENGINE_FIXTURE_S + 1000)
def test_up_serves_recovers_and_stops_cleanly(vllm_engine: VllmEngine, tmp_path: Path) -> None:
    port, engine_port = free_port(), free_port()
    env = {**os.environ, "TEAMGPU_ENGINE_PYTHON": os.environ.get("TEAMGPU_ENGINE_PYTHON", ""),
           "TEAMGPU_HEALTH_INTERVAL_S": "0.5", "TERM": "dumb", "COLUMNS": "200"}
    if not env["TEAMGPU_ENGINE_PYTHON"]:
        env.pop("TEAMGPU_ENGINE_PYTHON")
    proc = subprocess.Popen(
        [TEAMGPU, "up", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port),
         "--engine-port", str(engine_port), "--model", str(vllm_engine.model_dir),
         "--served-model-name", SERVED_MODEL_NAME,
         "--engine-arg=--enforce-eager", "--engine-arg=--max-num-seqs=8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "teamgpu gateway on" in "".join(out) or proc.poll() is not None,
                   300, "the gateway to start")
        text = "".join(out)
        assert proc.poll() is None, text
        keys = re.findall(r"tg-[A-Za-z0-9_-]{43}", text)
        assert len(set(keys)) == 1, text  # the first-run admin key, printed once
        key = keys[0]
        assert "curl" in text and "OPENAI_BASE_URL" in text
        # the sanity question, asked once the engine was ready, got a right answer
        assert re.search(r"sanity check: .*capital of France.*Paris", text), text
        assert "WRONG ANSWER" not in text
        auth = {"Authorization": f"Bearer {key}"}
        chat = {"model": SERVED_MODEL_NAME, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
            def ready() -> bool:
                try:
                    return c.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 30, "readiness")
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            saw_answer("teamgpu up, chat", r.json()["choices"][0]["message"]["content"])
            assert "Paris" in r.json()["choices"][0]["message"]["content"]

            # The engine binds to loopback only.
            engine_pids = pids_with(f"--port {engine_port}")
            assert engine_pids, "engine process not found"
            listen = Path("/proc/net/tcp").read_text()
            assert f"0100007F:{engine_port:04X}" in listen  # 127.0.0.1:engine_port

            # The engine dies: clients get 503 with Retry-After, then it comes back.
            for pid in engine_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            r = wait_until(lambda: (x := c.post("/v1/chat/completions", json=chat)).status_code
                           == 503 and x, 30, "a 503 while the engine is down")
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "backend_unavailable"
            wait_until(lambda: c.post("/v1/chat/completions", json=chat).status_code == 200,
                       240, "the engine to be restarted")

            # Only vLLM's engine core dies (its API server lives on, answering 500 with
            # "EngineCore encountered an issue" until it exits with status 0): clients get
            # 503 in the gateway's words, and the log names the engine core's death.
            cores = [p for p in pids_with("VLLM::EngineCore")
                     if os.getpgid(p) == os.getpgid(pids_with(f"--port {engine_port}")[0])]
            assert len(cores) == 1, cores
            os.kill(cores[0], signal.SIGKILL)
            r = wait_until(lambda: (x := c.post("/v1/chat/completions", json=chat)).status_code
                           == 503 and x, 30, "a 503 after the engine core died")
            assert int(r.headers["retry-after"]) >= 1
            assert "EngineCore" not in r.text, r.text
            assert r.json()["error"]["code"] == "backend_unavailable"
            wait_until(lambda: c.post("/v1/chat/completions", json=chat).status_code == 200,
                       240, "the engine to be restarted after its core died")
            log = "".join(out)
            assert re.search(rf"vLLM's engine process VLLM::EngineCore \(pid {cores[0]}\) died; "
                             r"its API server then (exited with status \d+|was killed by \w+)",
                             log), log[-3000:]
    finally:
        code = stop_up(proc, reader, out, 60)
    assert code == 0, "".join(out)
    wait_until(lambda: not pids_with(f"--port {engine_port}"), 10, "no orphaned engine process")
