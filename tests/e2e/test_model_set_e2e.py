"""``teamgpu up`` with a model set on real vLLM CPU engines (issue 12): the demo chat model
always on and the demo embeddings model on demand. The chat model answers; the embeddings
model starts on its first request (which waits for it) and returns vectors, and stops
after its idle time; killing the chat engine's core leaves the embeddings model serving;
SIGTERM leaves no engine behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import free_port
from tests.support.harness import wait_until

from .conftest import (
    ENGINE_FIXTURE_S,
    SERVED_MODEL_NAME,
    VllmEngine,
    pids_with,
    run_script,
    saw_answer,
    stop_up,
)

TEAMGPU = str(Path(sys.executable).parent / "teamgpu")
EMBED = "all-MiniLM-L6-v2"
IDLE_TTL_S = 8


def _embed_model_dir() -> Path:
    wanted = os.environ.get("TEAMGPU_DEMO_EMBED_MODEL_DIR")
    if wanted and (Path(wanted) / ".teamgpu-demo-embed-ok").is_file():
        return Path(wanted)
    return Path(run_script("prepare-demo-embed-model.sh"))


@pytest.mark.timeout(ENGINE_FIXTURE_S + 1200)  # the session engine may start first
def test_a_model_set_with_an_on_demand_model(vllm_engine: VllmEngine, tmp_path: Path) -> None:
    embed_dir = _embed_model_dir()
    config = tmp_path / "teamgpu.toml"
    config.write_text(f"""
[[models]]
name = "{SERVED_MODEL_NAME}"
model = "{vllm_engine.model_dir}"
roles = ["chat", "edit", "apply", "autocomplete"]
kv_cache_gib = 1
engine_args = ["--max-num-seqs", "8"]

[[models]]
name = "{EMBED}"
model = "{embed_dir}"
roles = ["embed"]
kv_cache_gib = 0
engine_args = ["--max-model-len", "256"]
on_demand = true
idle_ttl_s = {IDLE_TTL_S}
""")
    port = free_port()
    env = {**os.environ, "TEAMGPU_HEALTH_INTERVAL_S": "0.5", "TERM": "dumb", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [TEAMGPU, "up", "--config", str(config), "--data-dir", str(tmp_path / "data"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    out: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: out.extend(iter(stdout.readline, "")), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    chat_port = 0
    try:
        wait_until(lambda: "teamgpu gateway on" in "".join(out) or proc.poll() is not None,
                   300, "the gateway to start")
        assert proc.poll() is None, "".join(out)
        key = re.findall(r"tg-[A-Za-z0-9_-]{43}", "".join(out))[0]
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                          timeout=180) as c:
            wait_until(lambda: c.get("/readyz").status_code == 200, 30, "readiness")

            def models() -> dict[str, Any]:
                return {m["name"]: m for m in c.get("/stats").json()["models"]}

            # the embeddings model is on demand: not started, yet listed with its role
            assert models()[EMBED]["state"] == "stopped"
            cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
            assert cards[EMBED]["teamgpu"]["roles"] == ["embed"]
            chat = {"model": SERVED_MODEL_NAME, "max_tokens": 16, "temperature": 0,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            saw_answer("model set, chat", r.json()["choices"][0]["message"]["content"])
            assert "Paris" in r.json()["choices"][0]["message"]["content"]

            # its first request starts it, and waits: the vectors come back
            r = c.post("/v1/embeddings", json={"model": EMBED, "input": ["hello", "world"]})
            assert r.status_code == 200, r.text
            vectors = [d["embedding"] for d in r.json()["data"]]
            assert len(vectors) == 2 and len(vectors[0]) == 384
            m = models()[EMBED]
            assert m["state"] == "ready" and m["starts"]["count"] == 1
            assert m["starts"]["last_wait_s"] > 1.0  # the request waited for the start

            # idle for its idle_ttl_s: stopped again (the reaper runs every 5 s)
            wait_until(lambda: models()[EMBED]["state"] == "stopped", IDLE_TTL_S + 30,
                       "the idle embeddings model to stop")

            # the chat engine's core dies: the chat model answers 503 while it restarts,
            # and the embeddings model (started again by this request) serves
            found = re.search(rf"vLLM {SERVED_MODEL_NAME}: ready on http://127.0.0.1:(\d+)",
                              "".join(out))
            assert found, "".join(out)
            chat_port = int(found.group(1))
            leader = pids_with(f"--port {chat_port}")
            cores = [p for p in pids_with("VLLM::EngineCore")
                     if leader and os.getpgid(p) == os.getpgid(leader[0])]
            assert len(cores) == 1, (chat_port, leader, cores)
            os.kill(cores[0], signal.SIGKILL)
            r = wait_until(lambda: (x := c.post("/v1/chat/completions", json=chat))
                           .status_code == 503 and x, 30, "the chat model's 503")
            assert int(r.headers["retry-after"]) >= 1
            r = c.post("/v1/embeddings", json={"model": EMBED, "input": "still here"})
            assert r.status_code == 200, r.text
            wait_until(lambda: c.post("/v1/chat/completions", json=chat).status_code == 200,
                       300, "the chat engine to be restarted")
    finally:
        code = stop_up(proc, reader, out, 90)
    assert code == 0, "".join(out)
    # no engine of this set is left: none on either model's private port (by port, not by
    # model path: another teamgpu on this machine may serve the same demo models)
    found = re.search(rf"vLLM {EMBED}: \w+ on http://127.0.0.1:(\d+)", "".join(out))
    assert found, "".join(out)
    ports = [chat_port, int(found.group(1))]
    wait_until(lambda: not any(pids_with(f"--port {p} ") for p in ports), 15,
               "no engine process left")
