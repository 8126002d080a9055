"""What the observability tests (``/metrics``, the dashboard, ``teamgpu top``) look at
besides plain requests: a batch job running through a real gateway, submitted with the
official ``openai`` SDK, and a stand-in for ``teamgpu up``'s engine host.

The stand-in host only reports: models' engine states and on-demand starts, as
:class:`teamgpu.engine.host.FleetHost` does, for models declared on a backend where
nothing listens (no engine runs in these tests). It lets every request through.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import openai

from teamgpu.auth.keys import KeyStore
from tests.support.fake_backend import MODEL
from tests.support.harness import Harness, wait_until

__all__ = ["StandInHost", "batch_stats", "chat_lines", "paused_and_running_jobs", "sdk",
           "submit_batch"]


class StandInHost:
    """A :class:`~teamgpu.api.pipeline.ModelHost` that reports fixed states and starts.

    Args:
        states: model -> engine state (``sleeping``, ``stopped``, ...).
        starts: model -> ``{"count", "last_wait_s", "waiting"}``, for models that start
            on demand.
    """

    def __init__(self, states: dict[str, str],
                 starts: dict[str, dict[str, Any]] | None = None) -> None:
        self._states = states
        self._starts = starts or {}

    async def ensure_ready(self, served: str) -> None:
        return None

    def begin(self, served: str) -> None:
        return None

    def end(self, served: str) -> None:
        return None

    def states(self) -> dict[str, str]:
        return dict(self._states)

    def starts_json(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._starts.items()}


def chat_lines(n: int, *, tokens: int = 2, delay_s: float = 0.0,
               prefix: str = "item") -> list[dict[str, Any]]:
    """``n`` batch input lines for the fake backend; each item's answer takes
    ``tokens * delay_s`` seconds."""
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL, "max_tokens": 8,
                      "messages": [{"role": "user", "content": f"{prefix} {i}"}],
                      "fake": {"tokens": tokens, "delay_s": delay_s}}}
            for i in range(n)]


@contextlib.contextmanager
def sdk(h: Harness, key: str) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the gateway (no retries, no proxy from the env)."""
    c = openai.OpenAI(base_url=h.url + "/v1", api_key=key, max_retries=0,
                      http_client=openai.DefaultHttpxClient(trust_env=False, timeout=10.0))
    try:
        yield c
    finally:
        c.close()


def submit_batch(h: Harness, key: str, lines: list[dict[str, Any]]) -> str:
    """Upload ``lines`` and create a chat batch with them; returns the batch id."""
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    with sdk(h, key) as c:
        f = c.files.create(file=("in.jsonl", body), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    return b.id


def batch_stats(h: Harness, batch_id: str, *, timeout_s: float = 10.0,
                done_at_least: int = 0) -> dict[str, Any]:
    """The job's item of ``/stats`` ``batches``, once it is listed and has answered at
    least ``done_at_least`` items."""
    admin = h.client("admin")

    def find() -> dict[str, Any] | None:
        for j in admin.get("/stats").json()["batches"]:
            if j["id"] == batch_id and j["items"]["done"] >= done_at_least:
                return j  # type: ignore[no-any-return]
        return None

    return wait_until(find, timeout_s, f"batch {batch_id} in /stats")  # type: ignore[no-any-return]


def paused_and_running_jobs(h: Harness) -> tuple[str, str]:
    """Two batch jobs that stand still while a test looks at them; returns their ids.

    * erin's (a new key with a daily limit of 60 tokens): eight items, of which three are
      answered (0.1, 0.2, 0.3 s) before the limit pauses the job until midnight UTC;
    * alice's (``h.user_key``): three items of a minute each, all in flight.
    """
    erin_key, _ = KeyStore(h.gw.store).create("erin", limits={"daily_tokens": 60})
    paused = submit_batch(h, erin_key, [
        {**line, "body": {**line["body"], "fake": {"tokens": 2, "delay_s": 0.05 * (i + 1)}}}
        for i, line in enumerate(chat_lines(8, prefix="erin"))])
    wait_until(lambda: (j := batch_stats(h, paused))["paused_until"]
               and j["items"]["in_flight"] == 0, 15, "erin's job paused")
    running = submit_batch(h, h.user_key, chat_lines(3, tokens=2, delay_s=30.0))
    wait_until(lambda: batch_stats(h, running)["items"]["in_flight"] == 3, 15,
               "alice's three items in flight")
    return paused, running
