"""A stand-in for vLLM's OpenAI server, for supervisor tests that must not need vLLM.

The tests copy this file to ``<tmp>/vllm/entrypoints/openai/api_server.py`` and put
``<tmp>`` on PYTHONPATH, so the supervisor's real command line
(``python -m vllm.entrypoints.openai.api_server --host ... --port ...``) runs it.

Like vLLM it spawns a child process (vLLM's engine core, named ``VLLM::EngineCore`` as
vLLM names it) and, on SIGTERM, stops that child and exits. When the child dies on its
own (``kill -9`` of the engine core), it exits with status 0 a moment later, as vLLM's
API server does. It serves ``GET /health`` (200, 500 once the child died),
``GET /v1/models`` (the served name), ``GET /crash`` (answers, then exits with status 3
at once, leaving its child behind, as a crash would) and, like vLLM with
``VLLM_SERVER_DEV_MODE=1``, ``POST /sleep?level=N``, ``POST /wake_up`` and
``GET /is_sleeping`` (404 without that variable; 400 without ``--enable-sleep-mode``,
which vLLM needs for sleeping).

Flags besides vLLM's (the fake ignores the rest): ``--fake-delay-s S`` overrides
FAKE_ENGINE_DELAY_S for one engine of a fleet; ``--fake-control-delay-s S`` makes each
sleep and wake-up call take S seconds.

Environment:
    FAKE_ENGINE_DIR: folder for records: ``starts`` (one line per launch: pid and
        argv as JSON) and ``child-<pid>`` (the child's pid).
    FAKE_ENGINE_DELAY_S: seconds of "loading" before the port is opened.
    FAKE_ENGINE_FAIL: if set, print it and exit with status 2 before serving; a file
        ``fail`` in FAKE_ENGINE_DIR does the same (to fail only later launches), and a
        file ``fail-<served name>`` for one engine of a fleet.
    FAKE_ENGINE_STUBBORN_CHILD: if "1", the child ignores SIGTERM.

Records besides ``starts``: ``control`` gets one JSON line per sleep or wake-up call
(served name, path, pid).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STUBBORN_CHILD = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)"
CHILD = ("import ctypes, time; ctypes.CDLL(None).prctl(15, b'VLLM::EngineCore', 0, 0, 0); "
         "print('child up', flush=True); time.sleep(600)")
CORE_DEAD = threading.Event()


def crash_soon() -> None:
    """Exit with status 3 once the /crash reply is out, skipping all clean-up."""
    time.sleep(0.05)
    os._exit(3)


class Engine:
    """What the handler needs to know: the served name, sleep mode, where to record."""

    served = "fake"
    sleep_mode = False
    dev_mode = False
    sleeping = False
    control_delay_s = 0.0
    records = Path(".")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the engine log to what the tests read

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(500 if CORE_DEAD.is_set() else 200, b"")
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": Engine.served, "object": "model"}]})
        elif self.path == "/crash":
            self._reply(200, b"crashing")
            threading.Thread(target=crash_soon).start()
        elif self.path == "/is_sleeping" and Engine.dev_mode:
            self._json(200, {"is_sleeping": Engine.sleeping})
        else:
            self._reply(404, b"not found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/sleep", "/wake_up") or not Engine.dev_mode:
            self._reply(404, b"not found")
            return
        if not Engine.sleep_mode:
            self._json(400, {"error": "sleep mode is not enabled (--enable-sleep-mode)"})
            return
        time.sleep(Engine.control_delay_s)
        with (Engine.records / "control").open("a") as control:
            control.write(json.dumps({"served": Engine.served, "path": self.path,
                                      "pid": os.getpid()}) + "\n")
        Engine.sleeping = path == "/sleep"
        if Engine.sleeping:
            self._json(200, {"status": "sleeping", "level": 1})
        else:
            self._json(200, {"status": "awake", "tags": None})

    def _json(self, status: int, body: object) -> None:
        self._reply(status, json.dumps(body).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="fake")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fake-delay-s", type=float, default=None)
    parser.add_argument("--fake-control-delay-s", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    records = Path(os.environ["FAKE_ENGINE_DIR"])
    Engine.served, Engine.sleep_mode, Engine.records = (
        args.served_model_name, args.enable_sleep_mode, records)
    Engine.dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    Engine.control_delay_s = args.fake_control_delay_s
    with (records / "starts").open("a") as starts:
        starts.write(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:],
                                 "env": {k: v for k, v in os.environ.items()
                                         if k.startswith("VLLM_")}}) + "\n")

    fail = os.environ.get("FAKE_ENGINE_FAIL")
    for fail_file in (records / "fail", records / f"fail-{args.served_model_name}"):
        if not fail and fail_file.exists():
            fail = fail_file.read_text()
    if fail:
        print(fail, flush=True)
        sys.exit(2)

    stubborn = os.environ.get("FAKE_ENGINE_STUBBORN_CHILD") == "1"
    code = f"{STUBBORN_CHILD}; {CHILD}" if stubborn else CHILD
    # named as vLLM names it: argv[0] (what setproctitle changes) and comm (prctl, above)
    child = subprocess.Popen(["VLLM::EngineCore", "-c", code], executable=sys.executable,
                             stdout=subprocess.PIPE)
    assert child.stdout is not None
    child.stdout.readline()  # its signal disposition is in place
    (records / f"child-{os.getpid()}").write_text(str(child.pid))

    terminating = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        terminating.set()
        child.terminate()
        os._exit(0)

    def watch_core() -> None:
        child.wait()
        if not terminating.is_set():  # the engine core died: shut down, status 0
            CORE_DEAD.set()
            print("engine core exited unexpectedly; shutting down", flush=True)
            time.sleep(0.5)
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=watch_core, daemon=True).start()

    delay_s = (args.fake_delay_s if args.fake_delay_s is not None
               else float(os.environ.get("FAKE_ENGINE_DELAY_S", "0")))
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        print(f"loading weights, {deadline - time.monotonic():.1f} s to go", flush=True)
        time.sleep(0.2)
    print("fake engine ready", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
