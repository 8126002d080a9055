"""BackendPool's model names and backend choice, as a plain data structure (F12)."""

from __future__ import annotations

from typing import Any

from teamgpu.upstream.backends import BackendPool


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
    from tests.support.fake_backend import ServerThread, free_port
    from teamgpu.upstream import backends
    from teamgpu.upstream.client import UpstreamClient

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
