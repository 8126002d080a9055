"""F4: when the client goes away, the upstream request is closed at once (the backend
aborts the generation) and the audit row records what was produced."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.fake_backend import MODEL, FakeBackend, ServerThread
from tests.support.harness import Harness, start_gateway, wait_until


@dataclass
class Setup:
    fake: FakeBackend
    gateway: Harness


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Its own fake backend, so that its counters see only this module's requests."""
    fake = FakeBackend()
    with ServerThread(fake) as ft, start_gateway(tmp_path_factory.mktemp("f4"), [ft.url]) as gw:
        yield Setup(fake, gw)


def idle(s: Setup) -> bool:
    return s.fake.active == 0 and s.gateway.gw.pool.backends[0].in_flight == 0


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "write a novel"}]}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
def test_f4_stream_client_disconnect_aborts_the_generation(setup: Setup, path: str,
                                                           body: dict[str, object]) -> None:
    fake, gw = setup.fake, setup.gateway
    wait_until(lambda: idle(setup), what="an idle backend")
    aborted = fake.aborted
    req = {"model": MODEL, "stream": True, "max_tokens": 1500,
           "fake": {"tokens": 1500, "delay_s": 0.1}, **body}
    with gw.client().stream("POST", path, json=req) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        chunks = r.iter_raw()  # keep a reference: dropping it closes the connection
        first = next(chunks)
        assert first.startswith(b"data: ")
        assert fake.active == 1
    # the client closed the connection after the first chunk
    wait_until(lambda: fake.aborted == aborted + 1 and fake.active == 0, 1.0,
               "the backend to abort the generation")
    wait_until(lambda: gw.gw.pool.backends[0].in_flight == 0, 1.0, "the backend slot")
    row = gw.wait_row(rid)
    assert row["outcome"] == "client_disconnected"
    assert row["status"] == 499
    assert row["stream"] == 1
    assert 1 <= row["completion_tokens"] <= 20  # the chunks produced, not max_tokens
    assert row["prompt_tokens"] >= 1


def test_f4_non_streaming_client_gives_up(setup: Setup) -> None:
    fake, gw = setup.fake, setup.gateway
    wait_until(lambda: idle(setup), what="an idle backend")
    aborted = fake.aborted
    rid = "f4-non-stream-give-up"
    req = {"model": MODEL, "messages": [{"role": "user", "content": "slow"}],
           "max_tokens": 100, "fake": {"tokens": 100, "delay_s": 0.1}}  # 10 s to answer
    c = gw.client(timeout_s=0.5)
    with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=req, headers={"x-request-id": rid})
    c.close()
    wait_until(lambda: fake.aborted == aborted + 1 and fake.active == 0, 1.0,
               "the upstream request to be closed")
    wait_until(lambda: gw.gw.pool.backends[0].in_flight == 0, 1.0, "the backend slot")
    row = gw.wait_row(rid)
    assert (row["outcome"], row["status"]) == ("client_disconnected", 499)


def test_f4_disconnect_before_the_first_token(setup: Setup) -> None:
    fake, gw = setup.fake, setup.gateway
    wait_until(lambda: idle(setup), what="an idle backend")
    aborted = fake.aborted
    rid = "f4-before-first-token"
    req = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}],
           "max_tokens": 100, "fake": {"tokens": 100, "delay_s": 5}}
    c = gw.client(timeout_s=0.5)
    with pytest.raises(httpx.ReadTimeout), c.stream("POST", "/v1/chat/completions", json=req,
                                                   headers={"x-request-id": rid}) as r:
        r.read()
    c.close()
    wait_until(lambda: fake.aborted == aborted + 1 and fake.active == 0, 1.0,
               "the upstream request to be closed")
    row = gw.wait_row(rid)
    assert (row["outcome"], row["status"], row["completion_tokens"]) == (
        "client_disconnected", 499, 0)


def test_the_backend_is_still_usable_after_disconnects(setup: Setup) -> None:
    r = setup.gateway.client().post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
