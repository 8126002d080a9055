"""A request that meets a dead engine (issue 9, point 3): 503 with Retry-After in the
gateway's own words, never the engine's internal text; with another backend serving the
model, the request goes there instead (nothing was sent to the client yet)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_backend import ENGINE_DEAD_MESSAGE, MODEL, FakeBackend, ServerThread
from tests.support.harness import assert_openai_error, start_gateway, wait_until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def dying() -> Iterator[tuple[FakeBackend, ServerThread]]:
    fake = FakeBackend()
    with ServerThread(fake) as t:
        yield fake, t


@pytest.mark.parametrize("stream", [False, True])
def test_a_dead_engine_is_503_in_the_gateways_words(
        tmp_path: Path, dying: tuple[FakeBackend, ServerThread], stream: bool) -> None:
    fake, server = dying
    with start_gateway(tmp_path / "gw", [server.url], health_interval_s=60) as h:
        r = h.client().post("/v1/chat/completions",
                            json={**CHAT, "stream": stream, "fake": {"engine_dead": True}})
        err = assert_openai_error(r, 503, code="backend_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        assert err["message"] == (f"the engine serving {MODEL!r} stopped (it is being "
                                  "restarted); try again in 5 s")
        assert "EngineCore" not in r.text
        row = h.wait_row(r.headers["x-request-id"])
        assert (row["status"], row["outcome"]) == (503, "unavailable")
        # marked down at once (not at the next health poll, 60 s away): the next request
        # is refused before it reaches the engine
        sent = len(fake.requests)
        r = h.client().post("/v1/chat/completions", json=CHAT)
        assert_openai_error(r, 503, code="backend_unavailable")
        assert len(fake.requests) == sent


def test_a_dead_engine_fails_over_to_another_backend(
        tmp_path: Path, dying: tuple[FakeBackend, ServerThread]) -> None:
    dead, dead_server = dying
    alive = FakeBackend()
    with ServerThread(alive) as alive_server, \
            start_gateway(tmp_path / "gw", [dead_server.url, alive_server.url],
                          health_interval_s=60) as h:
        # the engine core of the first dies between two health polls; the request goes to
        # the backend with fewer requests in flight: the first, on a tie
        dead.engine_dead = True
        r = h.client().post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert len(dead.requests) == 1 and len(alive.requests) == 1
        row = h.wait_row(r.headers["x-request-id"])
        assert (row["outcome"], row["backend"]) == ("ok", alive_server.url)


def test_a_live_backends_500_stays_502(tmp_path: Path,
                                       dying: tuple[FakeBackend, ServerThread]) -> None:
    """A 500 from an engine that still passes its health check is the backend's failure
    of this request (502), and the backend stays up."""
    _fake, server = dying
    with start_gateway(tmp_path / "gw", [server.url], health_interval_s=60) as h:
        r = h.client().post("/v1/chat/completions", json={**CHAT, "fake": {"status": 500}})
        assert_openai_error(r, 502, code="backend_error")
        assert h.gw.pool.backends[0].up
        wait_until(lambda: h.client().get("/readyz").status_code == 200, 5, "ready")
        assert ENGINE_DEAD_MESSAGE not in r.text
