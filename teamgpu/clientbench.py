"""What a team would feel: concurrent streaming users against an OpenAI-compatible URL.

Used by ``teamgpu bench``. For each concurrency level ``u`` in ``users``, ``u`` simulated
users each send ``requests_per_user`` streaming chat requests one after another (a user
waits for an answer before asking again), all users at once. Every request asks for
``stream_options.include_usage`` so the completion token count comes from the server's own
``usage`` chunk, not from counting chunks (one chunk may carry several tokens).

Per request we record:

- TTFT (time to first token), seconds: from sending the request to the first chunk that
  carries content (a role-only first chunk does not count);
- completion tokens (``usage.completion_tokens``);
- total time, seconds: from sending to the end of the stream.

Per level we report TTFT p50/p95, the per-user speed (median over requests of
``completion_tokens / total time``: what one developer waits for, queueing included) and
the total throughput (all completion tokens of the level divided by the level's wall
time: what the server delivers). Percentiles interpolate linearly between order
statistics (type 7 of Hyndman and Fan, 1996; numpy's default).

Only httpx is used: the gateway's own dependencies, no OpenAI SDK.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

__all__ = [
    "BenchConfig",
    "BenchError",
    "LevelResult",
    "RequestResult",
    "first_model",
    "markdown_table",
    "normalize_base_url",
    "percentile",
    "run_bench",
    "summarize",
]

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


class BenchError(Exception):
    """The benchmark cannot run (server unreachable, key rejected, no model served)."""


def normalize_base_url(url: str) -> str:
    """The OpenAI base URL, ending in ``/v1`` and without a trailing slash.

    ``https://h`` and ``https://h/v1/`` both become ``https://h/v1``.
    """
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise BenchError(f"URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        base_url: the OpenAI base URL, ending in ``/v1``.
        key: the API key (sent as ``Authorization: Bearer``).
        model: model name; None = the first one ``GET /v1/models`` lists.
        users: concurrency levels, e.g. ``(1, 5, 10)``.
        requests_per_user: requests each user sends, one after another.
        max_tokens: ``max_tokens`` of every request.
        prompt: the user message.
        ignore_eos: send vLLM's ``ignore_eos`` so every answer has ``max_tokens`` tokens
            (comparable runs); other servers may reject the field.
        extra_body: further fields merged into every request body.
        timeout_s: per-request read timeout.
        verify: TLS verification (True, False, or a CA bundle path).
    """

    base_url: str
    key: str
    model: str | None = None
    users: tuple[int, ...] = (1, 5, 10)
    requests_per_user: int = 3
    max_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 300.0
    verify: bool | str = True


@dataclass(frozen=True)
class RequestResult:
    """One streamed request. Times in seconds; ``error`` set when it failed."""

    ttft_s: float | None
    total_s: float
    completion_tokens: int
    error: str | None = None
    usage_reported: bool = True


@dataclass(frozen=True)
class LevelResult:
    """The summary of one concurrency level (times in seconds, speeds in tokens/s)."""

    users: int
    requests: int
    errors: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tokens_per_s_per_user_p50: float | None
    tokens_per_s_total: float
    completion_tokens: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(users: int, results: Sequence[RequestResult], wall_s: float) -> LevelResult:
    """Reduce the requests of one level to its :class:`LevelResult`."""
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    speeds = [r.completion_tokens / r.total_s for r in ok if r.total_s > 0]
    tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        users=users,
        requests=len(results),
        errors=len(results) - len(ok),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        tokens_per_s_per_user_p50=percentile(speeds, 50),
        tokens_per_s_total=tokens / wall_s if wall_s > 0 else 0.0,
        completion_tokens=tokens,
        wall_s=wall_s,
    )


def _verify(verify: bool | str) -> bool | ssl.SSLContext:
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    if verify:
        # the system trust store, where `caddy trust` or an admin puts an internal CA
        return ssl.create_default_context()
    return False


def make_client(cfg: BenchConfig, concurrency: int = 1) -> httpx.AsyncClient:
    """An HTTP client with the key, the TLS settings and a pool for ``concurrency``."""
    limits = httpx.Limits(max_connections=max(concurrency, 1) + 2,
                          max_keepalive_connections=max(concurrency, 1) + 2)
    return httpx.AsyncClient(
        base_url=cfg.base_url,
        headers={"Authorization": f"Bearer {cfg.key}"},
        timeout=httpx.Timeout(cfg.timeout_s, connect=10.0),
        limits=limits,
        verify=_verify(cfg.verify),
        trust_env=False,
    )


async def first_model(client: httpx.AsyncClient) -> str:
    """The first model ``GET /v1/models`` lists.

    Raises:
        BenchError: unreachable, rejected key (401), or an empty list.
    """
    try:
        r = await client.get("/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {client.base_url}: {exc}") from exc
    if r.status_code != 200:
        raise BenchError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
    data = r.json().get("data") or []
    if not data:
        raise BenchError("GET /v1/models lists no model")
    return str(data[0]["id"])


def _body(cfg: BenchConfig, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": cfg.prompt}],
        "max_tokens": cfg.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    """Send one streaming chat request and time it. Never raises for HTTP failures."""
    start = time.perf_counter()
    ttft: float | None = None
    tokens: int | None = None
    chunks_with_content = 0
    try:
        async with client.stream("POST", "/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                return RequestResult(None, time.perf_counter() - start, 0,
                                     error=f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    return RequestResult(ttft, time.perf_counter() - start, 0,
                                         error=f"stream error: {event['error']}")
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or choice.get("text"):
                        chunks_with_content += 1
                        if ttft is None:
                            ttft = time.perf_counter() - start
                usage = event.get("usage")
                if usage:
                    tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(ttft, time.perf_counter() - start, 0,
                             error=f"{type(exc).__name__}: {exc}")
    total = time.perf_counter() - start
    if tokens is None:
        return RequestResult(ttft, total, chunks_with_content, usage_reported=False)
    return RequestResult(ttft, total, tokens)


async def run_level(client: httpx.AsyncClient, cfg: BenchConfig, model: str, users: int,
                    on_done: Callable[[RequestResult], None] | None = None
                    ) -> tuple[list[RequestResult], float]:
    """Run one concurrency level; returns every request's result and the wall time (s)."""
    body = _body(cfg, model)
    results: list[RequestResult] = []

    async def user() -> None:
        for _ in range(cfg.requests_per_user):
            res = await one_request(client, body)
            results.append(res)
            if on_done is not None:
                on_done(res)

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(users)))
    return results, time.perf_counter() - start


async def run_bench(cfg: BenchConfig,
                    on_done: Callable[[int, RequestResult], None] | None = None
                    ) -> dict[str, Any]:
    """Run every level of ``cfg`` and return one JSON-able report.

    Args:
        cfg: what to measure.
        on_done: called after each request with the level's user count and the result
            (progress display).

    Returns:
        ``{"url", "model", "max_tokens", "requests_per_user", "prompt", "ignore_eos",
        "started_at", "levels": [LevelResult.as_dict(), ...], "usage_reported"}``.

    Raises:
        BenchError: the server cannot be reached, rejects the key, or lists no model.
    """
    started = datetime.now(UTC).isoformat(timespec="seconds")
    async with make_client(cfg, max(cfg.users)) as client:
        model = cfg.model or await first_model(client)
        levels = []
        usage_reported = True
        for u in cfg.users:
            def done(res: RequestResult, u: int = u) -> None:
                if on_done is not None:
                    on_done(u, res)

            results, wall = await run_level(client, cfg, model, u, done)
            usage_reported &= all(r.usage_reported for r in results if r.error is None)
            levels.append(summarize(u, results, wall).as_dict())
            errors = [r.error for r in results if r.error]
            if errors and len(errors) == len(results):
                levels[-1]["first_error"] = errors[0]
    return {
        "url": cfg.base_url,
        "model": model,
        "max_tokens": cfg.max_tokens,
        "requests_per_user": cfg.requests_per_user,
        "prompt": cfg.prompt,
        "ignore_eos": cfg.ignore_eos,
        "started_at": started,
        "usage_reported": usage_reported,
        "levels": levels,
    }


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report's levels as a markdown table (one row per concurrency level)."""
    lines = [
        (f"Model `{report['model']}` at {report['url']}, max_tokens {report['max_tokens']}, "
        f"{report['requests_per_user']} request(s) per user, streaming."),
        "",
        ("| users | requests | errors | TTFT p50 (s) | TTFT p95 (s) | tok/s per user (p50) "
        "| tok/s total |"),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['users']} | {lv['requests']} | {lv['errors']} | "
            f"{_fmt(lv['ttft_p50_s'], 3)} | {_fmt(lv['ttft_p95_s'], 3)} | "
            f"{_fmt(lv['tokens_per_s_per_user_p50'], 1)} | {lv['tokens_per_s_total']:.1f} |"
        )
    if not report.get("usage_reported", True):
        lines += ["", "Note: the server sent no usage chunk; tokens were counted as chunks."]
    return "\n".join(lines)
