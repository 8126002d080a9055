"""Fakes for the batch tests: a clock moved by hand, an executor steered by each line's
body, and a small Starlette app around :func:`teamgpu.batch.batch_routes`.

The fake executor reads a ``fake`` object in an item's body::

    {"fake": {"status": 400,          # answer with this error status (final)
              "retry_after_s": 5.0,   # answer 429 with retry_after_s ...
              "retry_times": 1,       # ... for the first N attempts (default 1)
              "delay_s": 0.0,         # real seconds to take
              "hold": false,          # wait until FakeExecutor.release() is called
              "gate": "g1",           # wait until FakeExecutor.open_gate("g1") is called
              "crash": false}}        # raise instead of answering (an executor bug)

Anything else gets a chat completion with usage 3 prompt + 5 completion tokens.
``FakeExecutor.hold_all`` holds every item as ``"hold"`` does; a custom_id in
``FakeExecutor.fail_ids`` gets a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from teamgpu.api.errors import error_response
from teamgpu.api.request_id import RequestIdMiddleware
from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.batch import BatchCall, BatchRunner, BatchService, CallResult, FileStore
from teamgpu.batch.clock import Clock
from teamgpu.batch.routes import batch_routes
from teamgpu.errors import AuthenticationError, GatewayError
from teamgpu.settings import Settings
from tests.support.fake_backend import ServerThread


class FakeClock:
    """A clock that moves only when :meth:`advance` is called; waiters whose deadline a
    move reaches are woken at once."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self._now = start
        self._tick = asyncio.Event()

    def time(self) -> float:
        return self._now

    async def advance(self, seconds: float) -> None:
        self._now += seconds
        old, self._tick = self._tick, asyncio.Event()
        old.set()
        for _ in range(20):  # let the woken tasks run before the test goes on
            await asyncio.sleep(0)

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else self._now + timeout_s
        while not event.is_set() and (deadline is None or self._now < deadline):
            waits = {asyncio.ensure_future(event.wait()),
                     asyncio.ensure_future(self._tick.wait())}
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


def chat_answer(call: BatchCall) -> dict[str, Any]:
    return {"id": "cmpl-" + call.request_id, "object": "chat.completion", "created": 0,
            "model": call.body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": f"answer to {call.custom_id}"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


@dataclass
class FakeExecutor:
    """Answers batch items as each line's ``fake`` object says; records what it saw."""

    default_slots: int = 2
    slots_by_model: dict[str, int] = field(default_factory=dict)
    calls: list[BatchCall] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)   # per model
    max_in_flight: Counter[str] = field(default_factory=Counter)
    cancelled: list[str] = field(default_factory=list)          # request ids aborted
    hold_all: bool = False
    fail_ids: set[str] = field(default_factory=set)
    _release: asyncio.Event | None = None
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def open_gate(self, name: str) -> None:
        """Let the items waiting on gate ``name`` answer (and any that come later)."""
        self._gates.setdefault(name, asyncio.Event()).set()

    def slots(self, principal: Principal, model: str) -> int:
        return self.slots_by_model.get(model, self.default_slots)

    def release(self) -> None:
        """Let every held item (``"hold": true``) answer."""
        if self._release is None:
            self._release = asyncio.Event()
        self._release.set()

    @property
    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def answered(self, custom_id: str) -> int:
        return self.attempts[custom_id]

    async def execute(self, call: BatchCall) -> CallResult:
        self.calls.append(call)
        self.attempts[call.custom_id] += 1
        model = call.body["model"]
        self.in_flight[model] += 1
        self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])
        fake = call.body.get("fake") or {}
        try:
            if fake.get("hold") or self.hold_all:
                if self._release is None:
                    self._release = asyncio.Event()
                await self._release.wait()
            if fake.get("gate"):
                await self._gates.setdefault(fake["gate"], asyncio.Event()).wait()
            if fake.get("delay_s"):
                await asyncio.sleep(float(fake["delay_s"]))
            if fake.get("crash"):
                raise RuntimeError("executor bug")
            if fake.get("retry_after_s") is not None and \
                    self.attempts[call.custom_id] <= int(fake.get("retry_times", 1)):
                return CallResult(429, {"error": {"message": "slow down",
                                                  "type": "rate_limit_error", "param": None,
                                                  "code": "rate_limit_exceeded"}},
                                  retry_after_s=float(fake["retry_after_s"]))
            if fake.get("status") or call.custom_id in self.fail_ids:
                st = int(fake.get("status") or 400)
                return CallResult(st, {"error": {"message": f"fake {st}",
                                                 "type": "invalid_request_error",
                                                 "param": None, "code": None}})
            return CallResult(200, chat_answer(call))
        except asyncio.CancelledError:
            self.cancelled.append(call.request_id)
            raise
        finally:
            self.in_flight[model] -= 1


def line(custom_id: str, *, model: str = "m", url: str = "/v1/chat/completions",
         **fake: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model,
                            "messages": [{"role": "user", "content": custom_id}]}
    if fake:
        body["fake"] = fake
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def parse_jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


def settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {"data_dir": tmp_path, "batch_poll_interval_s": 0.05,
                            "batch_lease_s": 30.0}
    base.update(kw)
    return Settings(**base)


async def wait_for(cond: Any, timeout_s: float = 5.0, what: str = "condition", *,
                   clock: FakeClock | None = None, tick_s: float = 0.0) -> Any:
    """Await until ``cond()`` is truthy (``timeout_s`` of real time), yielding to other
    tasks meanwhile. With ``clock``, it is moved ``tick_s`` on each try: for what waits on
    a timer of the runner (its poll), which may start waiting after any single move."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)
        if clock is not None:
            await clock.advance(tick_s)


def key_authenticator(keys: KeyStore) -> Any:
    """An ``authenticate`` for :class:`BatchService`: Bearer or x-api-key, looked up in the
    key store (401 otherwise)."""

    async def authenticate(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        secret = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        secret = secret or request.headers.get("x-api-key")
        p = await asyncio.to_thread(keys.verify, secret) if secret else None
        if p is None:
            raise AuthenticationError("Invalid API key")
        return p

    return authenticate


@dataclass
class LiveApp:
    """A Batch API app served by uvicorn on loopback, with three keys."""

    url: str
    thread: ServerThread
    service: BatchService
    runner: BatchRunner
    executor: FakeExecutor
    keys: KeyStore
    alice: str
    bob: str
    root: str  # an admin key

    def call(self, aw: Any, timeout_s: float = 10.0) -> Any:
        return self.thread.call(aw, timeout_s)


def build_app(engine: Engine, s: Settings, executor: FakeExecutor,
              clock: Clock | None = None) -> tuple[Starlette, BatchService, BatchRunner]:
    keys = KeyStore(engine)
    files = FileStore(engine)
    runner = BatchRunner(engine, executor, keys, s, clock=clock, files=files)
    service = BatchService(authenticate=key_authenticator(keys), engine=engine, files=files,
                           runner=runner, settings=s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()

    async def models(request: Request) -> Response:  # what `teamgpu batch files` asks
        try:
            await service.authenticate(request)
        except GatewayError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    app = Starlette(routes=[*batch_routes(service), Route("/v1/models", models)],
                    lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)  # as the gateway's app does
    return app, service, runner


@contextlib.contextmanager
def live_app(engine: Engine, s: Settings, executor: FakeExecutor | None = None
             ) -> Iterator[LiveApp]:
    ex = executor or FakeExecutor()
    app, service, runner = build_app(engine, s, ex)
    keys = KeyStore(engine)
    alice, _ = keys.create("alice")
    bob, _ = keys.create("bob")
    root, _ = keys.create("root", admin=True)
    with ServerThread(app) as thread:
        yield LiveApp(url=thread.url, thread=thread, service=service, runner=runner,
                      executor=ex, keys=keys, alice=alice, bob=bob, root=root)
