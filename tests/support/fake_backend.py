"""A fast fake of vLLM's OpenAI server, for tests and the overhead benchmark.

Plain ASGI, no framework. It answers ``/health``, ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` (streaming or not, with ``stream_options.include_usage`` handled as
vLLM does), ``/v1/embeddings``, ``/metrics`` and ``/tokenize`` (its ``count`` equals the
``prompt_tokens`` the answer will report; ``FakeBackend(tokenize=False)`` answers 404, as
an engine without it). It also answers vLLM 0.32's other client APIs, in vLLM's shapes:
``/v1/responses`` (with ``GET /v1/responses/{id}`` and ``.../cancel``), ``/v1/messages``,
``/v1/messages/count_tokens``, ``/detokenize``, ``/v1/score`` and ``/v1/rerank``, and a chat
stream of parallel tool calls (see :mod:`tests.support.fake_apis`). A request may steer it
with a ``fake`` object in its body, which the gateway passes through like any unknown field:

    {"fake": {"tokens": 5,            # completion tokens to produce (default 4)
              "delay_s": 0.0,         # pause before each token
              "split": false,         # write each event in two writes, split mid-character
              "text": "tok ",         # the text of each token (default "tok ")
              "status": 400,          # answer with this error status instead
              "error_first": false,   # stream: first event is an error (HTTP 200)
              "break_after": null,    # stream: drop the connection after N tokens
              "break_mid_event": false,  # ... after writing half of the next event
              "pause_after": null,    # stream: after N tokens, fall silent for pause_s
              "pause_s": 1.0,
              "no_done": false,       # stream: end without data: [DONE]
              "tool_calls": 0,        # chat stream: answer with N (1-3) parallel tool calls
              "engine_dead": false}}  # from now on answer 500 (requests and /health) as
                                      # vLLM with a dead engine core (FakeBackend.engine_dead)

``FakeBackend.requests`` records every request received as ``{"path", "body",
"request_id", "vllm_priority"}`` (the ``X-Request-Id`` and ``X-Vllm-Priority`` headers the
gateway sent, or None; ``body`` is ``{}`` for the
body-less ``GET``/``cancel`` of a stored response), and ``active`` counts the
generations in progress, streamed or not (a disconnect by the gateway shows up as
``aborted``). ``responses`` holds the Responses API objects it keeps (as vLLM does with
``VLLM_ENABLE_RESPONSES_API_STORE=1``; ``FakeBackend(responses_store=False)`` keeps none).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Self

import orjson

from tests.support import fake_apis
from tests.support.fake_io import disconnected_within as _disconnected_within
from tests.support.fake_io import err as _err
from tests.support.fake_io import (
    prompt_token_count,
    send_body,
    wait_before_token,
    watch_disconnect,
)
from tests.support.fake_io import send_json as _json

__all__ = ["ENGINE_DEAD_MESSAGE", "MODEL", "FakeBackend", "ServerThread", "free_port",
           "prompt_token_count"]

MODEL = "fake-model"
# vLLM 0.32's EngineDeadError text (vllm/v1/engine/exceptions.py)
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."


class FakeBackend:
    def __init__(self, model: str = MODEL, max_model_len: int = 2048, record: bool = True,
                 tokenize: bool = True, responses_store: bool = True) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.record = record
        self.tokenize = tokenize
        self.tokenize_calls = 0
        self.requests: list[dict[str, Any]] = []
        self.active = 0
        self.aborted = 0
        self.healthy = True
        self.engine_dead = False  # vLLM with a dead engine core: 500 everywhere
        self.responses_store = responses_store
        self.responses: dict[str, dict[str, Any]] = {}  # Responses API objects kept
        self.background: dict[str, asyncio.Future[None]] = {}  # background responses

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/health":
            if self.engine_dead:
                await _json(send, _err(ENGINE_DEAD_MESSAGE, 500), 500)
                return
            await _json(send, {} if self.healthy else {"error": "unhealthy"},
                        200 if self.healthy else 503)
            return
        if path == "/v1/models":
            await _json(send, {"object": "list", "data": [{
                "id": self.model, "object": "model", "owned_by": "vllm",
                "root": f"/models/{self.model}",
                "max_model_len": self.max_model_len}]})
            return
        if path == "/metrics":
            body = (f"vllm:num_requests_running{{model_name=\"{self.model}\"}} {self.active}\n"
                    f"vllm:num_requests_waiting{{model_name=\"{self.model}\"}} 0\n"
                    f"vllm:kv_cache_usage_perc{{model_name=\"{self.model}\"}} 0.1\n").encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
            return
        headers = dict(scope["headers"])
        rid_header = headers.get(b"x-request-id", b"").decode("latin-1") or None
        vllm_priority = headers.get(b"x-vllm-priority", b"").decode("latin-1") or None
        if path.startswith("/v1/responses/"):  # a stored response: no body
            if self.record:
                self.requests.append({"path": path, "body": {}, "request_id": rid_header})
            if self.engine_dead:
                await _json(send, _err(ENGINE_DEAD_MESSAGE, 500), 500)
                return
            await fake_apis.responses_item(self, scope["method"], path, send)
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            await _json(send, _err("bad json", 400), 400)
            return
        if path == "/tokenize" and self.tokenize:
            # vLLM's /tokenize: the same prompt count the completion's usage will report
            self.tokenize_calls += 1
            n = prompt_token_count(req)
            await _json(send, {"count": n, "max_model_len": self.max_model_len,
                               "tokens": list(range(n)), "token_strs": None})
            return
        if self.record:
            self.requests.append({"path": path, "body": req, "request_id": rid_header,
                                  "vllm_priority": vllm_priority})
        fake = req.get("fake") or {}
        if fake.get("engine_dead"):
            self.engine_dead = True
        if self.engine_dead:
            # vLLM after its engine core died: every request 500 with this text, /health 500
            await _json(send, _err(ENGINE_DEAD_MESSAGE, 500), 500)
            return
        if fake.get("status"):
            message, status = f"fake error {fake['status']}", fake["status"]
            if path.startswith("/v1/messages"):  # vLLM translates to Anthropic's shape there
                await _json(send, fake_apis.anthropic_err(message, status), status)
            else:
                await _json(send, _err(message, status), status)
            return
        if path == "/v1/responses":
            await fake_apis.responses_create(self, req, fake, send, receive)
            return
        if path == "/v1/messages":
            await fake_apis.messages(self, req, fake, send, receive, rid_header)
            return
        if path == "/v1/messages/count_tokens":
            await fake_apis.count_tokens(self, req, send)
            return
        if path == "/detokenize" and self.tokenize:
            await fake_apis.detokenize(self, req, send)
            return
        if path == "/v1/score":
            await fake_apis.score(self, req, send)
            return
        if path == "/v1/rerank":
            await fake_apis.rerank(self, req, send)
            return
        if path == "/v1/embeddings":
            inp = req.get("input")
            n = len(inp) if isinstance(inp, list) else 1
            await _json(send, {"object": "list", "model": self.model,
                               "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]}
                                        for i in range(n)],
                               "usage": {"prompt_tokens": 3 * n, "total_tokens": 3 * n}})
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            await _json(send, _err("not found", 404), 404)
            return
        chat = path == "/v1/chat/completions"
        if req.get("top_p") == 0:
            await _json(send, _err("top_p must be in (0, 1]", 400), 400)
            return
        prompt_tokens = prompt_token_count(req)
        max_tokens = req.get("max_tokens") or 16
        if prompt_tokens + max_tokens > self.max_model_len:
            await _json(send, _err(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens", 400), 400)
            return
        n_tok = min(int(fake.get("tokens", 4)), max_tokens)
        text = fake.get("text", "tok ")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tok,
                 "total_tokens": prompt_tokens + n_tok}
        rid = "cmpl-fake"
        if chat and req.get("stream") and fake.get("tool_calls"):
            await fake_apis.tool_call_stream(self, req, fake, send, receive, prompt_tokens)
            return
        if not req.get("stream"):
            if chat:
                out = {"id": rid, "object": "chat.completion", "created": 0, "model": self.model,
                       "choices": [{"index": 0,
                                    "message": {"role": "assistant", "content": text * n_tok},
                                    "finish_reason": "length"}], "usage": usage}
            else:
                out = {"id": rid, "object": "text_completion", "created": 0, "model": self.model,
                       "choices": [{"index": 0, "text": text * n_tok, "finish_reason": "length"}],
                       "usage": usage}
            if await self.generation_aborted(receive, fake, n_tok):
                return
            await _json(send, out)
            return
        await self._stream(send, receive, req, fake, chat, n_tok, text, usage, rid)

    async def generation_aborted(self, receive: Any, fake: dict[str, Any], n_tok: int) -> bool:
        """Wait out the generation of a non-streamed answer of ``n_tok`` tokens,
        ``fake["delay_s"]`` each, counted in ``active`` meanwhile. True (counted in
        ``aborted``) when the caller disconnects first: vLLM aborts the generation then."""
        delay = float(fake.get("delay_s", 0))
        if not delay:
            return False
        self.active += 1
        try:
            if await _disconnected_within(receive, delay * n_tok):
                self.aborted += 1
                return True
            return False
        finally:
            self.active -= 1

    async def _stream(self, send: Any, receive: Any, req: dict[str, Any], fake: dict[str, Any],
                      chat: bool, n_tok: int, text: str, usage: dict[str, int], rid: str) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        split = bool(fake.get("split"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def event(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else orjson.dumps(data).decode()
            raw = f"data: {payload}\n\n".encode()
            await send_body(send, raw, split=split)

        if fake.get("error_first"):
            await event({"error": {"message": "bad parameter", "type": "BadRequestError",
                                   "param": None, "code": 400}})
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        self.active += 1
        disconnected = asyncio.Event()
        watcher = asyncio.ensure_future(watch_disconnect(receive, disconnected))
        try:
            base = {"id": rid, "object": obj, "created": 0, "model": self.model}
            if include_usage:
                base["usage"] = None
            for i in range(n_tok):
                await wait_before_token(fake, i, disconnected)
                if disconnected.is_set():
                    self.aborted += 1
                    return
                if fake.get("break_after") is not None and i >= int(fake["break_after"]):
                    if fake.get("break_mid_event"):  # half an event, then the break
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": b'data: {"id": "cmpl-fake", "choi'})
                        await asyncio.sleep(0.01)
                    raise ConnectionResetError("fake backend breaks the stream")
                if chat:
                    delta: dict[str, Any] = {"content": text}
                    if i == 0:
                        delta = {"role": "assistant", "content": text}
                    choice = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": "length" if i == n_tok - 1 else None}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": "length" if i == n_tok - 1 else None}
                await event({**base, "choices": [choice]})
            if include_usage:
                await event({"id": rid, "object": obj, "created": 0, "model": self.model,
                             "choices": [], "usage": usage})
            if not fake.get("no_done"):
                await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.active -= 1
            watcher.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Run an ASGI app with uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False, lifespan="on", http="httptools", loop="asyncio",
                                # the app decides whether to trust X-Forwarded-For, not uvicorn
                                proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs in (available once it started)."""
        return self.server.servers[0].get_loop()

    def call(self, aw: Any, timeout_s: float = 10.0) -> Any:
        """Run the coroutine ``aw`` in the server's event loop and return its result.

        For tests that must reach into a running app, e.g.
        ``thread.call(app.state.gw.audit.flush())``.
        """
        return asyncio.run_coroutine_threadsafe(aw, self.loop).result(timeout_s)


def main() -> None:
    """``python -m tests.support.fake_backend --port P``: serve the fake on 127.0.0.1."""
    import argparse

    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=MODEL)
    a = ap.parse_args()
    uvicorn.run(FakeBackend(a.model, record=False), host="127.0.0.1", port=a.port,
                log_level="warning", access_log=False, http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
