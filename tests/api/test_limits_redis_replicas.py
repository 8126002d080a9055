"""Limits shared by gateway replicas through the real Redis at 127.0.0.1:6379 (issue 4).

Two ``teamgpu serve`` processes share one data directory (so one key store: a key works
on both) and one Redis key prefix, in front of the session's fake vLLM. Requests sent to
both, alternately or all at once, are admitted exactly as one gateway would admit them.
Then Redis outages, on a closed port: fail open (served, a warning logged) and fail
closed (503 with Retry-After).

Each module run uses its own ``redis_key_prefix`` (deleted afterwards) and each test its
own API key, so tests never see each other's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from teamgpu.auth.keys import KeyStore
from teamgpu.store.db import open_store
from tests.api.test_limits_http import PROMPT, chat, post  # one request shape for both
from tests.support.fake_backend import ServerThread, free_port
from tests.support.harness import assert_openai_error, start_gateway, wait_until

pytestmark = pytest.mark.services

REDIS_URL = "redis://127.0.0.1:6379/0"

BIN = Path(sys.executable).parent
CHAT_PATH = "/v1/chat/completions"


@dataclass
class Replicas:
    urls: list[str]
    keys: KeyStore
    prefix: str
    data_dir: Path

    def key(self, **limits: int | None) -> str:
        secret, _ = self.keys.create(f"u-{uuid.uuid4().hex[:10]}", limits=limits)
        return secret

    def client(self, i: int, secret: str | None, headers: dict[str, str] | None = None
               ) -> httpx.Client:
        """A client of gateway ``i % 2`` with the key ``secret`` (None: no key)."""
        h = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.Client(base_url=self.urls[i % 2], headers={**h, **(headers or {})},
                            timeout=30.0, trust_env=False)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    """The fake vLLM in its own process: 120 requests at once through two gateways must
    not wait for this process's GIL (a slow /health would mark the backend down)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.fake_backend",
                             "--port", str(port)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/health", proc), 30.0, "the fake backend")
        yield url
    finally:
        _stop([proc])


def _answers(url: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
    try:
        return httpx.get(url, timeout=1.0, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def replicas(fake_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("replicas")
    data_dir = tmp / "data"
    data_dir.mkdir()
    prefix = f"teamgpu:test:{uuid.uuid4().hex}"
    keys = KeyStore(open_store(f"sqlite:///{data_dir / 'teamgpu.db'}"))
    keys.create("root", admin=True)  # the store is migrated, and no first-run key is made
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEAMGPU_")}
    env.update(TEAMGPU_REDIS_KEY_PREFIX=prefix, TEAMGPU_LOG_LEVEL="warning",
               TEAMGPU_TRUST_FORWARDED_FOR="true", TEAMGPU_AUTH_FAILURES_PER_MINUTE="5")
    ports = [free_port(), free_port()]
    procs = []
    for i, port in enumerate(ports):
        with open(tmp / f"gateway-{i}.log", "wb") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(
                [str(BIN / "teamgpu"), "serve", "--backend", fake_url, "--host", "127.0.0.1",
                 "--port", str(port), "--redis-url", REDIS_URL, "--data-dir", str(data_dir)],
                env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
            ))
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_until(functools.partial(_answers, f"{url}/readyz", proc), 30.0, f"gateway {url}")
        yield Replicas(urls, keys, prefix, data_dir)
    finally:
        _stop(procs)
        with redis.Redis.from_url(REDIS_URL) as r:
            stale = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if stale:
                r.delete(*stale)


def fire(rep: Replicas, secret: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send all ``bodies`` at once, alternately to the two gateways."""

    async def run() -> list[httpx.Response]:
        clients = [
            httpx.AsyncClient(base_url=url, timeout=30.0, trust_env=False,
                              headers={"Authorization": f"Bearer {secret}"},
                              limits=httpx.Limits(max_connections=len(bodies),
                                                  max_keepalive_connections=0))
            for url in rep.urls
        ]

        async def one(i: int, body: dict[str, Any]) -> httpx.Response:
            async with clients[i % 2].stream("POST", CHAT_PATH, json=body) as r:
                await r.aread()
            return r

        try:
            return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))
        finally:
            for c in clients:
                await c.aclose()

    return asyncio.run(run())


# --- two gateways, one limit -------------------------------------------------------------------

CASES = {
    "rpm": ({"rpm": 20}, chat(), 20),
    "tpm": ({"tpm": 20 * (PROMPT + 6)}, chat(6), 20),
    "daily": ({"daily_tokens": 20 * (PROMPT + 6)}, chat(6), 20),
    "concurrent": ({"max_concurrent": 9}, chat(20, delay_s=0.1), 9),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_replicas_together_admit_exactly_the_limit(replicas: Replicas, case: str,
                                                       stream: bool) -> None:
    limits, body, admitted = CASES[case]
    secret = replicas.key(**limits)
    body = {**body, "stream": True} if stream else body
    rs = fire(replicas, secret, [body] * 60)
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: admitted, 429: 60 - admitted}, (
        codes, {r.text for r in rs if r.status_code not in (200, 429)})
    # each gateway alone got more requests than the limit: enforced separately, they
    # would have admitted twice as many
    assert min(Counter(i % 2 for i in range(len(rs))).values()) > admitted
    for r in rs:
        if r.status_code == 429:
            assert_openai_error(r, 429, code="rate_limit_exceeded")
            assert r.headers["retry-after"].isdigit()
    if case == "rpm":
        left = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in rs
                      if r.status_code == 200)
        assert left == list(range(admitted))


def test_alternating_requests_count_down_one_shared_window(replicas: Replicas) -> None:
    secret = replicas.key(rpm=6, tpm=6 * (PROMPT + 4))
    clients = [replicas.client(i, secret) for i in range(2)]
    try:
        for i in range(6):
            r = post(clients[i % 2], chat(4, stream=i % 3 == 0))
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-remaining-requests"] == str(5 - i)
            assert r.headers["x-ratelimit-remaining-tokens"] == str((5 - i) * (PROMPT + 4))
        for c in clients:
            r = post(c, chat(4))
            err = assert_openai_error(r, 429, code="rate_limit_exceeded")
            assert "Limit 6, Used 6" in err["message"]
            assert 59 <= int(r.headers["retry-after"]) <= 60
    finally:
        for c in clients:
            c.close()


def test_settle_on_one_replica_frees_room_on_the_other(replicas: Replicas) -> None:
    secret = replicas.key(tpm=100)
    a, b = replicas.client(0, secret), replicas.client(1, secret)
    try:
        r = post(a, chat(100 - PROMPT, tokens=2))  # reserves 100, uses PROMPT + 2
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        r = post(b, chat(100 - 2 * PROMPT - 2, stream=True))  # exactly the refund
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        assert post(a, chat(1)).status_code == 429
    finally:
        a.close()
        b.close()


def test_stream_disconnect_on_one_replica_is_charged_for_both(replicas: Replicas) -> None:
    secret = replicas.key(tpm=1000, max_concurrent=1)
    a, b = replicas.client(0, secret), replicas.client(1, secret)
    try:
        with a.stream("POST", CHAT_PATH, json=chat(500, stream=True, delay_s=0.02)) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                next(events)
            assert post(b, chat(1)).status_code == 429  # the slot is held across replicas
        # the slot is free again and only the tokens produced stay charged
        wait_until(lambda: post(b, chat(1)).status_code == 200, 5.0,
                   "the slot of the disconnected stream")
        left = int(post(b, chat(1)).headers["x-ratelimit-remaining-tokens"])
        charged = 1000 - left - 2 * (PROMPT + 1)
        assert PROMPT + 3 <= charged < PROMPT + 100, charged
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sequential_requests_across_replicas_never_trip_max_concurrent_1(
    replicas: Replicas, stream: bool
) -> None:
    secret = replicas.key(max_concurrent=1)
    clients = [replicas.client(i, secret) for i in range(2)]
    try:
        codes = Counter(post(clients[i % 2], chat(stream=stream)).status_code
                        for i in range(60))
        assert codes == {200: 60}
    finally:
        for c in clients:
            c.close()


def test_failed_auth_throttle_is_shared(replicas: Replicas) -> None:
    addr = f"198.51.100.{uuid.uuid4().int % 200 + 20}"
    clients = [replicas.client(i, None, headers={"X-Forwarded-For": addr}) for i in range(2)]
    try:
        for i in range(5):
            r = clients[i % 2].post(CHAT_PATH, json=chat(), headers={"x-api-key": f"tg-{i}"})
            assert r.status_code == 401
        for c in clients:
            r = c.post(CHAT_PATH, json=chat(), headers={"x-api-key": "tg-more"})
            assert_openai_error(r, 429, code="rate_limit_exceeded")
            assert 59 <= int(r.headers["retry-after"]) <= 60
    finally:
        for c in clients:
            c.close()


def test_state_lives_under_the_configured_prefix(replicas: Replicas) -> None:
    secret = replicas.key(rpm=100)
    with replicas.client(0, secret) as c:
        assert post(c, chat()).status_code == 200
    key_id = replicas.keys.verify(secret).key_id  # type: ignore[union-attr]
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as r:
        mine = set(r.scan_iter(match=f"{replicas.prefix}:{{{key_id}}}:*", count=1000))
        assert f"{replicas.prefix}:{{{key_id}}}:req" in mine
        assert not list(r.scan_iter(match=f"teamgpu:lim:{{{key_id}}}:*", count=1000))


# --- Redis outage -----------------------------------------------------------------------------


def _closed_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_redis_outage_fails_open_with_a_warning(fake_server: ServerThread, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="teamgpu.limits")
    with start_gateway(tmp_path, [fake_server.url], redis_url=_closed_redis_url()) as gw:
        secret, _ = gw.gw.keys.create("outage", limits={"rpm": 2, "tpm": 1000})
        c = gw.client(secret)
        rs = [post(c, chat(stream=i % 2 == 1)) for i in range(5)]  # more than the RPM
        assert [r.status_code for r in rs] == [200] * 5
        # the headers say the configured limits (the state could not be read)
        assert rs[0].headers["x-ratelimit-limit-requests"] == "2"
        assert_openai_error(gw.client("tg-wrong").post(CHAT_PATH, json=chat()), 401)
        assert gw.gw.limiter.redis_errors_total >= 1
        # the operator sees the outage in /metrics
        text = gw.client(None).get("/metrics").text
        errors = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^teamgpu_redis_errors_total\{component="(\w+)"\} (\S+)$', text, re.MULTILINE)}
        assert errors["limiter"] == gw.gw.limiter.redis_errors_total >= 1
        assert errors["auth_throttle"] >= 1
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "teamgpu.limits"]
    assert any("Redis unavailable" in m and "fail open" in m for m in warnings), warnings


def test_redis_outage_fails_closed_with_503(fake_server: ServerThread, tmp_path: Path) -> None:
    with start_gateway(tmp_path, [fake_server.url], redis_url=_closed_redis_url(),
                       redis_failure_mode="closed") as gw:
        c = gw.client("user")
        for body in (chat(), chat(stream=True)):
            r = post(c, body)
            err = assert_openai_error(r, 503, code="rate_limiter_unavailable")
            assert "unavailable" in err["message"]
            assert r.headers["retry-after"] == "5"
        row = gw.wait_row(r.headers["x-request-id"])
        assert (row["status"], row["outcome"]) == (503, "unavailable")
        # the auth throttle cannot be read either: no key is checked while it is down
        assert_openai_error(gw.client("tg-wrong").post(CHAT_PATH, json=chat()), 503)
