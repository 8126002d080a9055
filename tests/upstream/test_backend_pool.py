"""BackendPool's model names, backend choice (least-loaded or by prefix affinity) and
draining, as a plain data structure (F12; issue 12, point 5)."""

from __future__ import annotations

from typing import Any

import pytest

from teamgpu.upstream.backends import BackendPool
from teamgpu.upstream.routing import RoutingKey, routing_key


def pool(aliases: dict[str, str] | None = None) -> BackendPool:
    p = BackendPool(["http://a", "http://b"], client=None, aliases=aliases)  # type: ignore[arg-type]
    a, b = p.backends
    a.models = {"org/Big-Model": {"id": "org/Big-Model", "root": "/models/Big-Model"}}
    b.models = {"org/Big-Model": {"id": "org/Big-Model"},
                "small": {"id": "small", "root": "/srv/weights/small-v2/"}}
    a.mark(True)
    b.mark(True)
    return p


def test_resolve() -> None:
    p = pool({"big": "org/Big-Model", "ghost": "not-served"})
    assert p.resolve("org/Big-Model") == "org/Big-Model"
    assert p.resolve("big") == "org/Big-Model"  # alias
    assert p.resolve("Big-Model") == "org/Big-Model"  # last path component
    assert p.resolve("small-v2") == "small"  # last component of the model's root
    assert p.resolve("ghost") is None  # alias to a name nobody serves
    assert p.resolve("nope") is None


def test_names_for_clients_are_served_names_then_aliases() -> None:
    p = pool({"big": "org/Big-Model", "ghost": "not-served", "small": "small"})
    assert p.served_names() == ["org/Big-Model", "small"]
    assert p.names_for_clients() == ["org/Big-Model", "small", "big"]


def test_pick_prefers_the_least_loaded_up_backend() -> None:
    p = pool()
    a, b = p.backends
    a.in_flight = 3
    assert p.pick("org/Big-Model") is b
    b.mark(False, "gone")
    assert p.pick("org/Big-Model") is a
    assert p.pick("small") is None  # known, but its only backend is down
    assert p.resolve("small") == "small"  # still known: 503, not 404
    assert p.any_up()
    a.mark(False)
    assert not p.any_up()


def long_chat(turns: int, system: str = "You are the build bot. " * 120) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in range(turns):
        if t:
            msgs.append({"role": "assistant", "content": f"answer {t}"})
        msgs.append({"role": "user", "content": f"question {t}?"})
    return {"model": "org/Big-Model", "messages": msgs}


def route_key(turns: int) -> RoutingKey:
    k = routing_key("chat/completions", long_chat(turns))
    assert k is not None
    return k


def test_pick_with_a_key_follows_the_prefix_unless_much_busier() -> None:
    p = pool()
    a, b = p.backends
    m = "org/Big-Model"
    first = p.pick(m, route_key(1))
    assert first is a  # no match, equal loads: the first in round-robin order
    p.record(m, route_key(1), a)
    a.in_flight, b.in_flight = 2, 0
    assert p.pick(m, route_key(2)) is a  # its prefix is on a, 2 more is within the slack
    assert p.pick(m) is b  # without a key: least-loaded, as before
    a.in_flight = 3
    assert p.pick(m, route_key(2)) is b  # 3 more than an idle backend: too busy
    p.record(m, None, b)  # no key: nothing to record
    assert p.router.match(m, route_key(2)) == {a.url: len(route_key(1))}


def test_least_loaded_routing_ignores_keys() -> None:
    p = pool()
    p.routing = "least_loaded"
    a, b = p.backends
    m = "org/Big-Model"
    p.record(m, route_key(1), b)
    assert len(p.router) == 0
    p.router.record(m, route_key(1), b.url)
    assert p.pick(m, route_key(2)) is a  # b holds the prefix, but load alone decides


def test_pick_skips_draining_and_excluded_backends() -> None:
    p = pool()
    a, b = p.backends
    m = "org/Big-Model"
    p.record(m, route_key(1), a)
    assert p.pick(m, route_key(2), exclude={a.url}) is b  # a failover retry
    assert p.pick(m, exclude={a.url, b.url}) is None
    a.in_flight = 1
    assert p.drain("http://a/") is a and a.draining and not a.drained
    assert p.pick(m, route_key(2)) is b
    assert p.pick(m) is b
    assert p.pick("small") is b
    p.drain(b.url)
    assert p.pick(m, route_key(2)) is None and p.pick(m) is None  # 503 until one is back
    a.in_flight = 0
    assert a.drained
    assert p.undrain(a.url) is a and not a.draining and not a.drained
    assert p.pick(m, route_key(2)) is a  # its prefix entries were kept while draining
    with pytest.raises(KeyError):
        p.drain("http://nowhere")


def test_a_backend_that_goes_down_is_skipped_and_forgotten() -> None:
    p = pool()
    a, b = p.backends
    m = "org/Big-Model"
    p.record(m, route_key(3), a)
    p.report_failure(a, "connection refused")
    assert p.pick(m, route_key(4)) is b
    assert p.router.match(m, route_key(4)) == {}
    a.mark(True)  # back, with an empty cache: load decides until it serves the prefix
    b.in_flight = 1
    assert p.pick(m, route_key(4)) is a


class DownClient:
    """An UpstreamClient stand-in whose every request is refused."""

    async def get_text(self, url: str, timeout_s: float) -> tuple[int, str]:
        raise ConnectionRefusedError(url)


async def test_a_failed_health_poll_forgets_the_backends_prefixes() -> None:
    p = BackendPool(["http://a", "http://b"], client=DownClient())  # type: ignore[arg-type]
    a, b = p.backends
    a.models = b.models = {"m": {"id": "m"}}
    a.mark(True)
    b.mark(True)
    p.record("m", route_key(2), a)
    await p.poll(a)
    assert not a.up and p.router.match("m", route_key(2)) == {}


def test_card() -> None:
    p = pool()
    card: dict[str, Any] = p.card("small")
    assert card["id"] == "small"
    assert p.card("unknown") == {"id": "unknown", "object": "model"}


class SlowHealthServer:
    """A vLLM stand-in whose /health answers after ``delay_s``; refuses nothing."""

    def __init__(self) -> None:
        self.delay_s = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        import orjson

        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await asyncio.sleep(self.delay_s)
            body = b""
        else:
            body = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_a_slow_health_check_is_not_a_dead_engine(monkeypatch: Any) -> None:
    """A busy engine answering /health late keeps serving: one or two slow polls leave
    it up; SLOW_POLLS_BEFORE_DOWN in a row mark it down; a refused connection at once."""
    from teamgpu.upstream import backends
    from teamgpu.upstream.client import UpstreamClient
    from tests.support.fake_backend import ServerThread, free_port

    monkeypatch.setattr(backends, "HEALTH_TIMEOUT_S", 0.2)
    app = SlowHealthServer()
    client = UpstreamClient(connect_timeout_s=1.0, read_timeout_s=5.0)
    try:
        with ServerThread(app) as srv:
            p = BackendPool([srv.url, f"http://127.0.0.1:{free_port()}"], client)
            b, refused = p.backends
            await p.poll_all()
            assert b.up and b.models.keys() == {"m"}
            assert not refused.up  # nothing listens there: down at once
            app.delay_s = 0.5
            for n in range(1, backends.SLOW_POLLS_BEFORE_DOWN):
                await p.poll(b)
                assert b.up and b.slow_polls == n
            app.delay_s = 0.0
            await p.poll(b)  # it answers in time again: the count starts over
            assert b.up and b.slow_polls == 0
            app.delay_s = 0.5
            for _ in range(backends.SLOW_POLLS_BEFORE_DOWN):
                await p.poll(b)
            assert not b.up and "timed out" in (b.last_error or "")
            app.delay_s = 0.0
            await p.poll(b)
            assert b.up
    finally:
        await client.close()
