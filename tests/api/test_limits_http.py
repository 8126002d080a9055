"""Rate limits and quotas through the real HTTP path (issue 4, fault rows F6 and F7).

A gateway on loopback in front of the fake vLLM; keys are made with limits. Every limit
is checked at its exact boundary, under 50 requests fired at once, streaming and not,
with disconnects; the answers (429 in OpenAI's shape, integer ``Retry-After``, OpenAI's
``x-ratelimit-*`` headers), the settling of reservations to the real usage, team
defaults, ``keys update`` on a running gateway, the failed-authentication throttle, and
the audit rows and metrics of refusals.

The fake answers ``/tokenize`` with the prompt count its usage will report, so the
reservations are exact: the chat below has :data:`PROMPT` prompt tokens, and a request
with ``max_tokens = m`` that the fake answers with ``m`` tokens reserves and uses exactly
``PROMPT + m``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import update

from teamgpu.auth.keys import Principal
from teamgpu.cli import main
from teamgpu.limits import KeyLimits, LimitStatus, memory
from teamgpu.limits.models import seconds_to_us
from teamgpu.store.tables import api_keys
from tests.support.fake_backend import MODEL, FakeBackend, ServerThread, prompt_token_count
from tests.support.harness import Harness, assert_openai_error, start_gateway, wait_until

CHAT_PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
#: The fake's prompt tokens for MESSAGES (what its /tokenize and its usage both say).
PROMPT = prompt_token_count({"messages": MESSAGES})
#: OpenAI's Go-style durations: 1m0s, 59.999s, 250ms, 0s.
RESET = re.compile(r"^(?:\d+h)?(?:\d+m)?(?:\d+(?:\.\d{1,3})?s|\d+ms)$")
FAMILIES = ("requests", "tokens")
N_AT_ONCE = 50


# --- helpers -----------------------------------------------------------------------------


def chat(max_tokens: int = 4, *, tokens: int | None = None, stream: bool = False,
         **fake: Any) -> dict[str, Any]:
    """A chat body: ``max_tokens`` reserved, ``tokens`` produced (default: all of them)."""
    body: dict[str, Any] = {
        "model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens,
        "fake": {"tokens": max_tokens if tokens is None else tokens, **fake},
    }
    if stream:
        body["stream"] = True
    return body


def new_key(h: Harness, **limits: int | None) -> tuple[str, Principal]:
    """A fresh key (its own limit state) with ``limits``; unnamed limits use the defaults."""
    return h.gw.keys.create(f"u-{uuid.uuid4().hex[:10]}", limits=limits)


def post(c: httpx.Client, body: dict[str, Any], **kw: Any) -> httpx.Response:
    """POST a chat; a stream is read to its end."""
    if body.get("stream"):
        with c.stream("POST", CHAT_PATH, json=body, **kw) as r:
            r.read()
        return r
    return c.post(CHAT_PATH, json=body, **kw)


def fire(h: Harness, secret: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send all ``bodies`` at once, each on its own connection; streams are read whole."""

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=h.url, timeout=30.0, trust_env=False,
                                     limits=limits,
                                     headers={"Authorization": f"Bearer {secret}"}) as c:
            async def one(body: dict[str, Any]) -> httpx.Response:
                async with c.stream("POST", CHAT_PATH, json=body) as r:
                    await r.aread()
                return r

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    return asyncio.run(run())


def status(h: Harness, p: Principal) -> LimitStatus:
    """The key's standing, read in the gateway's own event loop."""
    result: LimitStatus = h.thread.call(h.gw.limiter.status(p.key_id, h.gw.limits.for_key(p)))
    return result


def retry_after(r: httpx.Response) -> int:
    raw = r.headers["retry-after"]
    assert raw.isdigit(), f"Retry-After must be whole seconds, got {raw!r}"
    return int(raw)


def assert_limited(r: httpx.Response, limit_text: str, retry: tuple[int, int]) -> None:
    """``r`` is a 429 in OpenAI's shape naming ``limit_text``, Retry-After in ``retry``."""
    err = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert err["type"] == "rate_limit_error"
    assert limit_text in err["message"], err["message"]
    assert retry[0] <= retry_after(r) <= retry[1], (r.headers["retry-after"], retry)
    assert f"try again in {retry_after(r)}s" in err["message"]


def assert_headers(r: httpx.Response, *, rpm: int | None = None, tpm: int | None = None,
                   remaining: dict[str, int] | None = None) -> None:
    """OpenAI's three headers per limited family (and none for an unlimited one)."""
    for family, limit in zip(FAMILIES, (rpm, tpm), strict=True):
        names = [f"x-ratelimit-{x}-{family}" for x in ("limit", "remaining", "reset")]
        if limit is None:
            assert not [n for n in names if n in r.headers], dict(r.headers)
            continue
        assert r.headers[names[0]] == str(limit), dict(r.headers)
        left = r.headers[names[1]]
        assert left.isdigit() and 0 <= int(left) <= limit, dict(r.headers)
        assert RESET.match(r.headers[names[2]]), dict(r.headers)
        if remaining is not None and family in remaining:
            assert int(left) == remaining[family], (family, dict(r.headers))


def seconds_to_utc_midnight(now: float) -> float:
    return 86_400 - now % 86_400


@pytest.fixture(scope="module")
def h(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """This module's gateway; client addresses come from X-Forwarded-For, so the
    failed-auth tests can act as several clients, and 5 failures block an address."""
    with start_gateway(tmp_path_factory.mktemp("limits"), [fake_server.url],
                       trust_forwarded_for=True, auth_failures_per_minute=5) as gw:
        yield gw


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The in-process limiter's clock, under the test's control: set ``clock["t"]``."""
    c = {"t": time.time()}
    monkeypatch.setattr(memory, "wall_clock_us",
                        lambda now: seconds_to_us(c["t"] if now is None else now))
    return c


# --- each limit at its exact boundary -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_rpm_admits_exactly_n_then_429(h: Harness, fake: FakeBackend, stream: bool) -> None:
    secret, _ = new_key(h, rpm=5)
    c = h.client(secret)
    for i in range(5):
        r = post(c, chat(stream=stream))
        assert r.status_code == 200, r.text
        assert_headers(r, rpm=5, remaining={"requests": 4 - i})
        assert r.headers["x-ratelimit-reset-requests"] == "1m0s"  # the window just got an entry
    r = post(c, chat(stream=stream))
    assert_limited(r, "requests per min (RPM): Limit 5, Used 5", (59, 60))
    assert_headers(r, rpm=5, remaining={"requests": 0})
    rid = r.headers["x-request-id"]
    assert not [q for q in fake.requests if q["request_id"] == rid]  # never reached the engine


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_tpm_admits_exactly_the_limit_then_429(h: Harness, stream: bool) -> None:
    per = PROMPT + 13  # reserved and used by each request
    secret, _ = new_key(h, tpm=5 * per)
    c = h.client(secret)
    for i in range(5):
        r = post(c, chat(13, stream=stream))
        assert r.status_code == 200, r.text
        assert_headers(r, tpm=5 * per, remaining={"tokens": (4 - i) * per})
    r = post(c, chat(13, stream=stream))
    assert_limited(r, f"tokens per min (TPM): Limit {5 * per}, Used {5 * per}, Requested {per}",
                   (59, 60))
    # one token less would not fit either; nothing is left
    assert_limited(post(c, chat(1, stream=stream)), "TPM", (59, 60))


def test_max_concurrent_with_long_streams(h: Harness) -> None:
    secret, p = new_key(h, max_concurrent=3)
    c = h.client(secret)
    short, long = chat(10, stream=True, delay_s=0.05), chat(200, stream=True, delay_s=0.05)
    with contextlib.ExitStack() as stack:
        open_ = [stack.enter_context(c.stream("POST", CHAT_PATH, json=b))
                 for b in (short, long, long)]  # 0.5 s, 10 s, 10 s
        assert [r.status_code for r in open_] == [200] * 3
        assert status(h, p).in_flight == 3
        for body in (chat(), chat(stream=True)):
            assert_limited(post(c, body), "concurrent requests: Limit 3, In flight 3", (1, 1))
        open_[0].read()  # one stream ends ...
        r = stack.enter_context(c.stream("POST", CHAT_PATH, json=long))  # ... its slot is free
        assert r.status_code == 200, r.text
        assert_limited(post(c, chat()), "concurrent requests: Limit 3, In flight 3", (1, 1))
    # the other two were closed mid-way: their slots are freed too
    wait_until(lambda: status(h, p).in_flight == 0, 5.0, "the slots of disconnected streams")
    assert post(c, chat()).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_sequential_requests_never_trip_max_concurrent_1(h: Harness, stream: bool) -> None:
    """A client that waits for each answer before the next never has two in flight: the
    slot must be free before the client can see the end of the answer."""
    secret, _ = new_key(h, max_concurrent=1)
    c = h.client(secret)
    codes = Counter(post(c, chat(stream=stream)).status_code for _ in range(100))
    assert codes == {200: 100}


def test_daily_quota_boundary(h: Harness, clock: dict[str, float]) -> None:
    per = PROMPT + 10
    secret, p = new_key(h, daily_tokens=3 * per)
    c = h.client(secret)
    for _ in range(3):
        assert post(c, chat(10)).status_code == 200
    r = post(c, chat(10))
    expected = math.ceil(seconds_to_utc_midnight(clock["t"]))
    assert_limited(r, f"tokens per day (UTC): Limit {3 * per}, Used {3 * per}",
                   (expected - 2, expected + 1))
    assert "resets at 00:00 UTC" in r.json()["error"]["message"]
    assert status(h, p).remaining_daily_tokens == 0
    # no rpm/tpm on this key: no OpenAI header family
    assert_headers(r)


def test_daily_quota_resets_at_utc_midnight(h: Harness, clock: dict[str, float]) -> None:
    midnight = (time.time() // 86_400 + 1) * 86_400
    clock["t"] = midnight - 100.0
    per = PROMPT + 10
    secret, _ = new_key(h, daily_tokens=2 * per)
    c = h.client(secret)
    assert [post(c, chat(10)).status_code for _ in range(2)] == [200, 200]
    assert_limited(post(c, chat(10)), "tokens per day", (100, 100))
    clock["t"] = midnight - 0.5
    assert_limited(post(c, chat(10)), "tokens per day", (1, 1))
    clock["t"] = midnight
    assert post(c, chat(10)).status_code == 200


def test_retry_after_is_when_the_request_is_really_admitted(
    h: Harness, clock: dict[str, float]
) -> None:
    """F7: Retry-After is consistent with the real refill: refused one moment before,
    admitted at exactly that moment."""
    t0, per = clock["t"], PROMPT + 10
    secret, _ = new_key(h, rpm=2, tpm=3 * per)
    c = h.client(secret)
    assert post(c, chat(10)).status_code == 200  # t0
    clock["t"] = t0 + 10
    assert post(c, chat(10)).status_code == 200  # t0 + 10
    clock["t"] = t0 + 20.25
    r = post(c, chat(10))
    assert_limited(r, "RPM", (40, 40))  # the entry of t0 leaves at t0 + 60
    assert r.headers["x-ratelimit-reset-requests"] == "49.75s"  # the window is empty then
    clock["t"] = t0 + 59.999
    assert_limited(post(c, chat(10)), "RPM", (1, 1))
    clock["t"] = t0 + 60
    r = post(c, chat(10))
    assert r.status_code == 200, r.text
    assert_headers(r, rpm=2, tpm=3 * per, remaining={"requests": 0, "tokens": per})
    # tokens: the requests of t0 + 100 and t0 + 110 hold 2/3 of the TPM; one that needs
    # 2/3 waits until the older one leaves, at t0 + 160
    secret, _ = new_key(h, tpm=3 * per)
    c = h.client(secret)
    clock["t"] = t0 + 100
    assert post(c, chat(10)).status_code == 200
    clock["t"] = t0 + 110
    assert post(c, chat(10)).status_code == 200
    clock["t"] = t0 + 120
    assert_limited(post(c, chat(10 + per)), f"TPM): Limit {3 * per}, Used {2 * per}", (40, 40))
    clock["t"] = t0 + 159.5
    assert_limited(post(c, chat(10 + per)), "TPM", (1, 1))
    clock["t"] = t0 + 160
    assert post(c, chat(10 + per)).status_code == 200


def test_zero_means_unlimited(h: Harness) -> None:
    secret, _ = new_key(h, rpm=0, tpm=0, max_concurrent=0, daily_tokens=0)
    rs = fire(h, secret, [chat(1000)] * 30)
    assert [r.status_code for r in rs] == [200] * 30
    for r in rs:
        assert_headers(r)  # no limit, no header family


# --- 50 requests at once ---------------------------------------------------------------------

CASES = {
    # limit: (key limits, body, admitted, text of the 429)
    "rpm": ({"rpm": 10}, chat(), 10, "RPM"),
    "tpm": ({"tpm": 10 * (PROMPT + 6)}, chat(6), 10, "TPM"),
    "daily": ({"daily_tokens": 10 * (PROMPT + 6)}, chat(6), 10, "tokens per day"),
    "concurrent": ({"max_concurrent": 7}, chat(20, delay_s=0.1), 7, "concurrent"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_fifty_at_once_admit_exactly_the_limit(h: Harness, fake: FakeBackend, case: str,
                                               stream: bool) -> None:
    limits, body, admitted, text = CASES[case]
    secret, _ = new_key(h, **limits)
    body = {**body, "stream": True} if stream else body
    rs = fire(h, secret, [body] * N_AT_ONCE)
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: admitted, 429: N_AT_ONCE - admitted}, codes
    for r in rs:
        if r.status_code == 429:
            assert_limited(r, text, (1, 1) if case == "concurrent" else (1, 86_400))
    ok = {r.headers["x-request-id"] for r in rs if r.status_code == 200}
    reached = {q["request_id"] for q in fake.requests if q["path"] == CHAT_PATH} & {
        r.headers["x-request-id"] for r in rs}
    assert reached == ok  # the refused ones never reached the engine
    if "rpm" in limits:
        remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in rs
                           if r.status_code == 200)
        assert remaining == list(range(admitted))  # each admission took exactly one


# --- headers on every response -------------------------------------------------------------


def test_ratelimit_headers_on_every_response(h: Harness) -> None:
    secret, _ = new_key(h, rpm=6, tpm=1000)
    c = h.client(secret)
    answers = {
        "200": post(c, chat(10)),
        "200 stream": post(c, chat(10, stream=True)),
        "400 from the engine": post(c, chat(10, status=400)),
        "400 too large": post(c, chat(2000)),
        "404 model": c.post(CHAT_PATH, json={**chat(), "model": "no-such-model"}),
        "400 bad json": c.post(CHAT_PATH, content=b"{",
                               headers={"content-type": "application/json"}),
    }
    assert [r.status_code for r in answers.values()] == [200, 200, 400, 400, 404, 400]
    while (r := post(c, chat(10))).status_code == 200:
        pass
    answers["429"] = r
    for what, r in answers.items():
        try:
            assert_headers(r, rpm=6, tpm=1000)
        except (AssertionError, KeyError) as exc:
            raise AssertionError(f"{what}: {dict(r.headers)}") from exc
    assert answers["429"].headers["x-ratelimit-remaining-requests"] == "0"


# --- F6 and exact accounting -----------------------------------------------------------------


@pytest.mark.parametrize(("max_tokens", "admitted"), [(100 - PROMPT, 1), (100, 0), (None, 0)],
                         ids=["estimate-fits", "estimate-over", "default-max-tokens"])
def test_f6_five_concurrent_chats_against_100_tpm(h: Harness, max_tokens: int | None,
                                                  admitted: int) -> None:
    """F6: the token limit is checked with an estimate before the tokens are known, so
    five concurrent chats that could each use 100 tokens cannot spend more than 100."""
    secret, p = new_key(h, tpm=100)
    body = chat(max_tokens or 100, tokens=100)
    if max_tokens is None:
        del body["max_tokens"]  # the gateway reserves default_max_tokens (512)
    rs = fire(h, secret, [body] * 5)
    codes = Counter(r.status_code for r in rs)
    if admitted:
        assert codes == {200: 1, 429: 4}, codes
        for r in rs:
            if r.status_code == 429:
                assert_limited(r, "TPM): Limit 100, Used 100", (59, 60))
    else:  # the estimate alone is over the limit: no wait can help, so 400, not 429
        assert codes == {400: 5}, codes
        for r in rs:
            err = assert_openai_error(r, 400, code="request_too_large", param="max_tokens")
            assert "Limit 100" in err["message"] and "waiting will not help" in err["message"]
            assert "retry-after" not in r.headers
    h.flush()
    rows = [h.wait_row(r.headers["x-request-id"]) for r in rs]
    used = sum(row["prompt_tokens"] + row["completion_tokens"] for row in rows)
    assert used <= 100
    assert 100 - status(h, p).remaining_tokens == used


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_settle_refunds_what_was_not_used(h: Harness, stream: bool) -> None:
    secret, p = new_key(h, tpm=100)
    c = h.client(secret)
    r = post(c, chat(100 - PROMPT, tokens=2, stream=stream))  # reserves 100, uses PROMPT + 2
    assert r.status_code == 200
    assert_headers(r, tpm=100, remaining={"tokens": 0})  # at admission: all reserved
    assert status(h, p).remaining_tokens == 100 - (PROMPT + 2)  # settled when it ended
    r = post(c, chat(100 - 2 * PROMPT - 2, stream=stream))  # exactly the refund
    assert r.status_code == 200, r.text
    assert_headers(r, tpm=100, remaining={"tokens": 0})
    assert_limited(post(c, chat(1, stream=stream)), "TPM): Limit 100, Used 100", (59, 60))


def test_stream_disconnect_is_charged_the_tokens_produced(h: Harness, fake: FakeBackend) -> None:
    secret, p = new_key(h, tpm=1000)
    c = h.client(secret)
    aborted = fake.aborted
    with c.stream("POST", CHAT_PATH, json=chat(500, stream=True, delay_s=0.02)) as r:
        assert r.status_code == 200
        assert_headers(r, tpm=1000, remaining={"tokens": 1000 - PROMPT - 500})
        rid = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                break
    row = h.wait_row(rid)
    assert row["outcome"] == "client_disconnected"
    assert 5 <= row["completion_tokens"] < 100
    assert row["prompt_tokens"] == PROMPT
    wait_until(lambda: fake.aborted > aborted, 5.0, "the engine to abort")
    st = status(h, p)
    assert st.in_flight == 0
    assert st.remaining_tokens == 1000 - PROMPT - row["completion_tokens"]


def test_plain_disconnect_after_dispatch_is_charged_the_prompt(
    h: Harness, fake: FakeBackend
) -> None:
    """A non-streaming client that leaves while the engine works: the tokens produced are
    unknown, but the prompt was processed, so at least the prompt is charged."""
    secret, p = new_key(h, tpm=1000)
    aborted = fake.aborted
    with pytest.raises(httpx.ReadTimeout):
        h.client(secret, timeout_s=0.5).post(CHAT_PATH, json=chat(50, delay_s=0.1))
    wait_until(lambda: fake.aborted > aborted, 5.0, "the engine to abort")
    wait_until(lambda: status(h, p).in_flight == 0, 5.0, "the settle")
    assert status(h, p).remaining_tokens == 1000 - PROMPT


def test_estimate_without_tokenize_is_conservative_then_settled(tmp_path: Path) -> None:
    """An engine without /tokenize: the gateway reserves its documented estimate (one
    token per 2 bytes of the prompt's JSON) and settles to the engine's real count."""
    fake = FakeBackend(tokenize=False)
    with ServerThread(fake) as fs, start_gateway(tmp_path, [fs.url]) as gw:
        secret, p = new_key(gw, tpm=1000)
        r = post(gw.client(secret), chat(10))
        assert r.status_code == 200
        estimate = len(orjson.dumps(MESSAGES)) // 2
        assert estimate > PROMPT
        assert_headers(r, tpm=1000, remaining={"tokens": 1000 - estimate - 10})
        assert r.json()["usage"]["prompt_tokens"] == PROMPT
        assert status(gw, p).remaining_tokens == 1000 - PROMPT - 10


def test_tokenize_on_a_dropped_keep_alive_connection_is_retried(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine closed a pooled connection as it was reused: /tokenize is asked again,
    so the reservation stays exact instead of falling back to the estimate."""
    real = h.gw.client.post_json
    calls: list[str] = []

    async def flaky(url: str, obj: Any, timeout_s: float) -> tuple[int, Any]:
        calls.append(url)
        if len(calls) == 1:
            raise aiohttp.ServerDisconnectedError()
        return await real(url, obj, timeout_s)

    monkeypatch.setattr(h.gw.client, "post_json", flaky)
    secret, _ = new_key(h, tpm=1000)
    r = post(h.client(secret), chat(10))
    assert r.status_code == 200
    assert_headers(r, tpm=1000, remaining={"tokens": 1000 - PROMPT - 10})
    assert len(calls) == 2 and calls[0].endswith("/tokenize")


# --- settings and the CLI ------------------------------------------------------------------


def test_team_defaults_apply_to_keys_without_their_own(fake_server: ServerThread,
                                                       tmp_path: Path) -> None:
    with start_gateway(tmp_path, [fake_server.url], default_rpm=3, default_tpm=1000,
                       default_max_concurrent=2, default_daily_tokens=100_000) as gw:
        plain, p = new_key(gw)
        assert gw.gw.limits.for_key(p) == KeyLimits(3, 1000, 2, 100_000)
        c = gw.client(plain)
        for i in range(3):
            r = post(c, chat(10))
            assert r.status_code == 200
            assert_headers(r, rpm=3, tpm=1000, remaining={"requests": 2 - i})
        assert_limited(post(c, chat(10)), "RPM): Limit 3", (59, 60))

        own, _ = new_key(gw, rpm=5, max_concurrent=0)  # own RPM, unlimited concurrency
        rs = fire(gw, own, [chat(10, delay_s=0.05)] * 5)
        assert [r.status_code for r in rs] == [200] * 5
        for r in rs:
            assert_headers(r, rpm=5, tpm=1000)

        conc, _ = new_key(gw, rpm=0)
        rs = fire(gw, conc, [chat(10, delay_s=0.1)] * 5)
        assert Counter(r.status_code for r in rs) == {200: 2, 429: 3}  # the default of 2
        assert_headers(rs[0], tpm=1000)  # rpm 0: no requests family

        free, _ = new_key(gw, rpm=0, tpm=0, max_concurrent=0, daily_tokens=0)
        rs = fire(gw, free, [chat(10)] * 10)
        assert [r.status_code for r in rs] == [200] * 10
        assert_headers(rs[0])


def test_keys_update_takes_effect_at_once(h: Harness, clean_env: Path) -> None:
    def cli(*args: str) -> str:
        r = CliRunner().invoke(main, [*args, "--data-dir", str(h.data_dir)],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    created = orjson.loads(cli("keys", "create", f"cli-{uuid.uuid4().hex[:8]}", "--rpm", "2",
                             "--json"))
    c = h.client(created["key"])
    assert [post(c, chat()).status_code for _ in range(2)] == [200, 200]
    assert_limited(post(c, chat()), "RPM): Limit 2", (59, 60))
    cli("keys", "update", created["id"], "--rpm", "4")
    r = post(c, chat())  # no restart, no wait
    assert r.status_code == 200
    assert_headers(r, rpm=4, remaining={"requests": 1})  # the last 60 s still count
    cli("keys", "update", created["id"], "--rpm", "1")
    assert_limited(post(c, chat()), "RPM): Limit 1, Used 3", (59, 60))
    cli("keys", "update", created["id"], "--rpm", "0")
    r = post(c, chat())
    assert r.status_code == 200
    assert_headers(r)


# --- failed authentication ------------------------------------------------------------------


def _from(addr: str) -> dict[str, str]:
    return {"X-Forwarded-For": addr}


def test_failed_auth_is_throttled_per_address(h: Harness) -> None:
    """5 failures per minute (this gateway's setting) block the address that made them,
    for every request from it, a valid key included (otherwise guessing would go on at
    full speed and a right guess would get in); other addresses are not affected."""
    guesser, neighbour = "198.51.100.7", "198.51.100.8"
    anon = h.client(None)
    for i in range(5):
        r = anon.post(CHAT_PATH, json=chat(), headers={**_from(guesser),
                                                       "Authorization": f"Bearer tg-guess{i}"})
        assert_openai_error(r, 401, code="invalid_api_key")
    r = anon.post(CHAT_PATH, json=chat(), headers={**_from(guesser),
                                                   "Authorization": "Bearer tg-guess5"})
    err = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert "failed authentication" in err["message"]
    assert 59 <= retry_after(r) <= 60
    # a valid key from the blocked address is refused too, without being checked
    r = h.client("user").post(CHAT_PATH, json=chat(), headers=_from(guesser))
    assert r.status_code == 429 and 59 <= retry_after(r) <= 60
    # the same key from another address works; a failure there is a plain 401
    assert h.client("user").post(CHAT_PATH, json=chat(), headers=_from(neighbour)).status_code \
        == 200
    r = anon.post(CHAT_PATH, json=chat(), headers={**_from(neighbour),
                                                   "Authorization": "Bearer tg-nope"})
    assert_openai_error(r, 401)


def test_a_key_in_use_from_a_blocked_address_keeps_working(h: Harness) -> None:
    """A colleague behind the same NAT with a truncated key (a request per keystroke)
    blocks the address for new keys, not for a key that already worked from it: a
    guesser has no such key."""
    office = "198.51.100.20"
    assert h.client("user").post(CHAT_PATH, json=chat(), headers=_from(office)) \
        .status_code == 200
    anon = h.client(None)
    for i in range(6):
        anon.post(CHAT_PATH, json=chat(), headers={**_from(office),
                                                   "Authorization": f"Bearer tg-trunc{i}"})
    r = anon.post(CHAT_PATH, json=chat(), headers={**_from(office),
                                                   "Authorization": "Bearer tg-trunc"})
    assert_openai_error(r, 429, code="rate_limit_exceeded")
    r = h.client("user").post(CHAT_PATH, json=chat(), headers=_from(office))
    assert r.status_code == 200, r.text  # in use from here before the block
    r = h.client("admin").post(CHAT_PATH, json=chat(), headers=_from(office))
    assert r.status_code == 429  # never used from here: refused as any other key


def test_forged_forwarded_for_cannot_lock_out_another_address(h: Harness) -> None:
    """The gateway takes the rightmost X-Forwarded-For entry (the one its proxy added):
    a guesser that writes a victim's address in front only blocks itself."""
    victim, attacker = "203.0.113.50", "203.0.113.66"
    anon = h.client(None)
    for i in range(7):
        anon.post(CHAT_PATH, json=chat(), headers={
            "X-Forwarded-For": f"{victim}, {attacker}", "Authorization": f"Bearer tg-x{i}"})
    r = h.client("user").post(CHAT_PATH, json=chat(), headers=_from(f"{attacker}"))
    assert r.status_code == 429
    r = h.client("user").post(CHAT_PATH, json=chat(), headers=_from(victim))
    assert r.status_code == 200, r.text


# --- audit rows and metrics ----------------------------------------------------------------


def _metric(h: Harness, user: str, limit: str) -> float:
    text = h.client(None).get("/metrics").text
    labels = f'limit="{limit}",user="{user}"'  # prometheus_client sorts no labels: both orders
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == "teamgpu_rate_limited_total":
            got, _, value = rest.rpartition("} ")
            if sorted(got.split(",")) == sorted(labels.split(",")):
                return float(value)
    return 0.0


@pytest.mark.parametrize(("limit", "limits", "body"), [
    ("requests", {"rpm": 1}, chat()),
    ("tokens", {"tpm": PROMPT + 4}, chat()),
    ("daily_tokens", {"daily_tokens": PROMPT + 4}, chat()),
])
def test_429_leaves_an_audit_row_and_moves_the_metric(h: Harness, limit: str,
                                                      limits: dict[str, int],
                                                      body: dict[str, Any]) -> None:
    secret, p = new_key(h, **limits)
    c = h.client(secret)
    assert post(c, body).status_code == 200
    before = _metric(h, p.user, limit)
    r = post(c, body)
    assert r.status_code == 429
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["user"], row["key_id"]) == (
        429, "rate_limited", p.user, p.key_id)
    assert row["prompt_tokens"] == row["completion_tokens"] == 0
    assert _metric(h, p.user, limit) == before + 1


def test_concurrency_and_auth_refusals_are_audited_and_counted(h: Harness) -> None:
    secret, p = new_key(h, max_concurrent=1)
    c = h.client(secret)
    before = _metric(h, p.user, "concurrent")
    with c.stream("POST", CHAT_PATH, json=chat(20, stream=True, delay_s=0.05)) as s:
        assert s.status_code == 200
        r = post(c, chat())
    assert r.status_code == 429
    assert h.wait_row(r.headers["x-request-id"])["outcome"] == "rate_limited"
    assert _metric(h, p.user, "concurrent") == before + 1

    addr = "192.0.2.99"
    before = _metric(h, "anonymous", "auth_failures")
    anon = h.client(None)
    for _ in range(5):
        anon.post(CHAT_PATH, json=chat(), headers={**_from(addr), "x-api-key": "tg-bad"})
    r = anon.post(CHAT_PATH, json=chat(), headers={**_from(addr), "x-api-key": "tg-bad"})
    assert r.status_code == 429
    row = h.wait_row(r.headers["x-request-id"])
    assert (row["status"], row["outcome"], row["user"], row["client_addr"]) == (
        429, "rate_limited", None, addr)
    assert _metric(h, "anonymous", "auth_failures") == before + 1


def test_a_stale_key_does_not_lock_out_its_address(h: Harness) -> None:
    """Revoked and expired keys (and requests without a key) get 401 but are not guesses:
    an IDE still set up with an old key cannot lock out the valid keys of everyone
    behind the same address. A never-issued key still counts."""
    addr = "198.51.100.40"
    revoked, r = new_key(h)
    h.gw.keys.revoke(r.key_id)
    expired, p = new_key(h)
    with h.gw.store.begin() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == p.key_id).values(
            expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    anon = h.client(None)
    for _ in range(4):  # 12 refusals, against a limit of 5 failures per minute
        for headers in ({"Authorization": f"Bearer {revoked}"},
                        {"Authorization": f"Bearer {expired}"}, {}):
            assert anon.post(CHAT_PATH, json=chat(),
                             headers={**_from(addr), **headers}).status_code == 401
    assert h.client("user").post(CHAT_PATH, json=chat(), headers=_from(addr)).status_code \
        == 200
    for i in range(5):  # guesses still count
        anon.post(CHAT_PATH, json=chat(),
                  headers={**_from(addr), "Authorization": f"Bearer tg-stale-guess{i}"})
    guess = anon.post(CHAT_PATH, json=chat(),
                      headers={**_from(addr), "Authorization": "Bearer tg-stale-guess"})
    assert guess.status_code == 429
    # a key never used from this address is refused; the one in use from it is not
    # (test_a_key_in_use_from_a_blocked_address_keeps_working)
    assert h.client("admin").post(CHAT_PATH, json=chat(), headers=_from(addr)).status_code \
        == 429


def test_the_reservation_reads_max_tokens_and_n_as_the_engine_does(h: Harness) -> None:
    """Found by an adversarial trial: /v1/completions has no max_completion_tokens (vLLM
    reads max_tokens there), and n sequences produce up to n times max_tokens. Reserving
    less would let concurrent requests pass a TPM limit many times over."""
    secret, _ = new_key(h, tpm=1000)
    c = h.client(secret)
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 600,
                                        "max_completion_tokens": 1, "fake": {"tokens": 1}})
    assert r.status_code == 200, r.text
    # reserved 600 + the prompt, not 1 + the prompt
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < 400
    secret, _ = new_key(h, tpm=1000)
    r = h.client(secret).post(CHAT_PATH, json={**chat(400), "n": 3})
    err = assert_openai_error(r, 400, code="request_too_large", param="max_tokens")
    assert "Limit 1000" in err["message"]  # 3 x 400 alone is over the limit
