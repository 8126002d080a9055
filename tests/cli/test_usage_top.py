"""``teamgpu usage`` against a store filled with audit rows, and ``teamgpu top`` against
a running gateway on loopback."""

from __future__ import annotations

import csv
import importlib
import io
import json
import re
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, insert, text

from teamgpu.api import observability
from teamgpu.cli.top import top
from teamgpu.cli.usage import usage
from teamgpu.dashboard import routes as dashboard_routes
from teamgpu.metrics.usage_report import parse_since, usage_report
from teamgpu.store.db import open_store
from teamgpu.store.tables import usage as usage_table
from tests.support.fake_backend import MODEL, ServerThread
from tests.support.harness import Harness, start_gateway, wait_until
from tests.support.observed import (
    StandInHost,
    batch_stats,
    chat_lines,
    paused_and_running_jobs,
    submit_batch,
)

top_module = importlib.import_module("teamgpu.cli.top")  # the package exports the command `top`

NOW = datetime.now(UTC)
TODAY = datetime(NOW.year, NOW.month, NOW.day, tzinfo=UTC)


def row(ts: datetime, user: str | None, *, model: str | None = "m1", status: int = 200,
        prompt: int = 10, completion: int = 20, ttft_ms: float | None = 100.0,
        batch_id: str | None = None, endpoint: str = "chat/completions") -> dict[str, Any]:
    return {"request_id": secrets.token_hex(8), "ts": ts, "user": user, "key_id": None,
            "endpoint": endpoint, "model": model, "priority": "normal",
            "stream": False, "status": status, "outcome": "ok" if status < 400 else "error",
            "prompt_tokens": prompt, "completion_tokens": completion, "queue_ms": 0.0,
            "ttft_ms": ttft_ms, "total_ms": 500.0, "batch_id": batch_id}


def fill(engine: Any) -> None:
    """Today: alice 3 (one 500), bob 1 (model m2), one unauthenticated 401.
    Two days ago: alice 1. Ten days ago: carol 1."""
    t = TODAY + timedelta(minutes=1)
    rows = [
        row(t, "alice", ttft_ms=100.0),
        row(t, "alice", ttft_ms=300.0, prompt=5, completion=5),
        row(t, "alice", status=500, prompt=7, completion=0, ttft_ms=None),
        row(t, "bob", model="m2", prompt=100, completion=400, ttft_ms=50.0),
        row(t, None, model=None, status=401, prompt=0, completion=0, ttft_ms=None),
        row(TODAY - timedelta(days=2) + timedelta(hours=3), "alice", prompt=1, completion=2),
        row(TODAY - timedelta(days=10), "carol", model="m2", prompt=1000, completion=1),
    ]
    with engine.begin() as conn:
        conn.execute(insert(usage_table), rows)


@pytest.fixture
def data_dir(clean_env: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    fill(open_store(f"sqlite:///{d / 'teamgpu.db'}"))
    return d


def run(cmd: Any, *args: str, ok: bool = True, env: dict[str, str] | None = None) -> Any:
    r = CliRunner().invoke(cmd, list(args), catch_exceptions=False,
                           env={"COLUMNS": "200", **(env or {})})
    if ok:
        assert r.exit_code == 0, r.output
    return r


def usage_json(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        run(usage, *args, "--json", "--data-dir", str(data_dir)).output)
    return rows


# --------------------------------------------------------------------------- usage


def test_usage_by_user_today_is_the_default(data_dir: Path) -> None:
    rows = usage_json(data_dir)
    assert [r["user"] for r in rows] == ["bob", "alice", "(unauthenticated)"]
    assert rows[1] == {"user": "alice", "requests": 3, "prompt_tokens": 22,
                       "completion_tokens": 25, "total_tokens": 47, "errors": 1,
                       "p50_ttft_ms": 100.0}
    assert rows[0]["p50_ttft_ms"] == 50.0
    assert rows[2] == {"user": "(unauthenticated)", "requests": 1, "prompt_tokens": 0,
                       "completion_tokens": 0, "total_tokens": 0, "errors": 1,
                       "p50_ttft_ms": None}


def test_usage_by_day_over_seven_days(data_dir: Path) -> None:
    rows = usage_json(data_dir, "--by", "day", "--since", "7d")
    two_days_ago = (TODAY - timedelta(days=2)).date().isoformat()
    assert [r["day"] for r in rows] == [two_days_ago, TODAY.date().isoformat()]
    assert rows[0]["requests"] == 1 and rows[0]["total_tokens"] == 3
    assert rows[1]["requests"] == 5


def test_usage_by_model_since_all(data_dir: Path) -> None:
    rows = {r["model"]: r for r in usage_json(data_dir, "--by", "model", "--since", "all")}
    assert set(rows) == {"m1", "m2", "(none)"}
    assert rows["m2"]["requests"] == 2 and rows["m2"]["prompt_tokens"] == 1100
    assert rows["m1"]["requests"] == 4


def test_usage_by_batch_tells_batch_items_apart(data_dir: Path) -> None:
    """Batch items are usage (by user, by model) and ``--by batch`` groups them per job;
    requests made directly are ``-``; the Batch API's own requests are not usage."""
    t = TODAY + timedelta(minutes=2)
    with open_store(f"sqlite:///{data_dir / 'teamgpu.db'}").begin() as conn:
        conn.execute(insert(usage_table), [
            row(t, "alice", batch_id="batch_a", prompt=3, completion=4),
            row(t, "alice", batch_id="batch_a", status=404, model=None, prompt=0,
                completion=0, ttft_ms=None),
            row(t, "bob", batch_id="batch_b", model="m2", prompt=1, completion=1),
            row(t, "bob", batch_id="batch_b", endpoint="batches.retrieve", prompt=0,
                completion=0, ttft_ms=None),
        ])
    rows = {r["batch"]: r for r in usage_json(data_dir, "--by", "batch", "--since", "all")}
    assert set(rows) == {"batch_a", "batch_b", "-"}
    assert rows["batch_a"] == {"batch": "batch_a", "requests": 2, "prompt_tokens": 3,
                               "completion_tokens": 4, "total_tokens": 7, "errors": 1,
                               "p50_ttft_ms": 100.0}
    assert rows["batch_b"]["requests"] == 1  # its batches.retrieve row is not usage
    assert rows["-"]["requests"] == 7  # the rows of fill()
    users = {r["user"]: r for r in usage_json(data_dir, "--by", "user")}
    assert users["alice"]["requests"] == 3 + 2 and users["bob"]["requests"] == 1 + 1
    models = {r["model"]: r for r in usage_json(data_dir, "--by", "model", "--since", "all")}
    assert models["m2"]["requests"] == 3 and models["(none)"]["requests"] == 2
    out = run(usage, "--by", "batch", "--since", "all", "--data-dir", str(data_dir)).output
    assert "usage by batch" in out and "batch_a" in out
    csv_out = run(usage, "--by", "batch", "--csv", "--data-dir", str(data_dir)).output
    assert csv_out.splitlines()[0].startswith("batch,requests,")


def test_usage_by_batch_and_model_after_a_real_batch(
        clean_env: Path, fake_server: ServerThread, tmp_path: Path) -> None:
    """A batch job through a real gateway: its items are audited with its id and counted
    as usage of the served model, beside a request made directly."""
    with start_gateway(tmp_path / "gw", [fake_server.url], batch_poll_interval_s=0.1) as h:
        lines = chat_lines(3, prefix="usage")
        lines.append({**lines[0], "custom_id": "bad",
                      "body": {**lines[0]["body"], "model": "no-such-model"}})
        batch_id = submit_batch(h, h.user_key, lines)
        assert h.client("user").post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}]}).status_code == 200
        wait_until(lambda: batch_stats(h, batch_id)["status"] == "completed", 20,
                   "the batch to complete")
        h.flush()
        data = str(h.data_dir)
    rows = {r["batch"]: r for r in usage_json(Path(data), "--by", "batch")}
    assert set(rows) == {batch_id, "-"}
    assert (rows[batch_id]["requests"], rows[batch_id]["errors"]) == (4, 1)
    assert rows["-"]["requests"] == 1
    models = {r["model"]: r for r in usage_json(Path(data), "--by", "model")}
    assert models[MODEL]["requests"] == 3 + 1
    assert sum(r["requests"] for r in models.values()) == 5  # the 404 item too


def test_usage_since_a_date_until_a_date(data_dir: Path) -> None:
    start = (TODAY - timedelta(days=11)).date().isoformat()
    end = (TODAY - timedelta(days=1)).date().isoformat()
    rows = usage_json(data_dir, "--since", start, "--until", end)
    assert [(r["user"], r["requests"]) for r in rows] == [("carol", 1), ("alice", 1)]


def test_usage_csv(data_dir: Path) -> None:
    out = run(usage, "--csv", "--data-dir", str(data_dir)).output
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["user", "requests", "prompt_tokens", "completion_tokens",
                             "total_tokens", "errors", "p50_ttft_ms"]
    assert rows[0]["user"] == "bob" and rows[0]["total_tokens"] == "500"


def test_usage_table(data_dir: Path) -> None:
    out = run(usage, "--by", "user", "--since", "7d", "--data-dir", str(data_dir)).output
    assert "usage by user" in out
    for word in ("alice", "bob", "(unauthenticated)", "total", "p50 TTFT ms"):
        assert word in out
    empty = run(usage, "--since", "1s", "--data-dir", str(data_dir)).output
    assert "No requests" in empty


def test_usage_rejects_bad_input(data_dir: Path) -> None:
    r = run(usage, "--since", "last tuesday", "--data-dir", str(data_dir), ok=False)
    assert r.exit_code == 2 and "cannot read 'last tuesday'" in r.output
    r = run(usage, "--csv", "--json", "--data-dir", str(data_dir), ok=False)
    assert r.exit_code == 2
    r = run(usage, "--by", "key", "--data-dir", str(data_dir), ok=False)
    assert r.exit_code == 2


def test_parse_since_forms() -> None:
    now = datetime(2026, 11, 29, 13, 45, tzinfo=UTC)
    assert parse_since("today", now) == datetime(2026, 11, 29, tzinfo=UTC)
    assert parse_since("yesterday", now) == datetime(2026, 11, 28, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 11, 28, 13, 45, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2026, 11, 22, 13, 45, tzinfo=UTC)
    assert parse_since("30m", now) == datetime(2026, 11, 29, 13, 15, tzinfo=UTC)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T08:00", now) == datetime(2026, 11, 1, 8, tzinfo=UTC)
    assert parse_since("all", now) is None
    with pytest.raises(ValueError, match="cannot read '7 days' as a time"):
        parse_since("7 days", now)


@pytest.mark.services
def test_usage_report_by_day_on_postgresql() -> None:
    """The day grouping is dialect-specific: check it on the real PostgreSQL too."""
    schema = "tg_usage_" + secrets.token_hex(4)
    base = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        engine = open_store(f"{base}?options=-csearch_path%3D{schema}")
        fill(engine)
        days = usage_report(engine, by="day", since=TODAY - timedelta(days=7))
        assert [(g.key, g.requests) for g in days] == [
            ((TODAY - timedelta(days=2)).date().isoformat(), 1), (TODAY.date().isoformat(), 5)]
        users = {g.key: g for g in usage_report(engine, by="user", since=TODAY)}
        assert users["alice"].p50_ttft_ms == 100.0 and users["alice"].errors == 1
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


# --------------------------------------------------------------------------- top


@pytest.fixture
def gw(fake_server: ServerThread, tmp_path: Path) -> Iterator[Harness]:
    with start_gateway(tmp_path / "gw", [fake_server.url]) as h:
        h.app.router.routes[0:0] = [*observability.starlette_routes(),
                                    *dashboard_routes.starlette_routes()]
        yield h


def test_top_once_shows_queue_users_ttft_gpu_and_backends(gw: Harness,
                                                         fake_server: ServerThread) -> None:
    c = gw.client("user")
    for _ in range(3):
        assert c.post("/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
                      ).status_code == 200
    stats = gw.client("admin").get("/stats").json()
    out = run(top, "--url", gw.url, "--key", gw.admin_key, "--once").output
    assert "teamgpu top" in out
    for word in ("queue", "high", "normal", "low", "in flight", "TTFT 5 min",
                 "top users today", "backends", fake_server.url, MODEL):
        assert word in out, word
    alice = next(line for line in out.splitlines() if "alice" in line)
    u = stats["users_today"]["alice"]
    assert str(u["requests"]) in alice and f"{u['total_tokens']:,}" in alice
    assert "GPU: none found" in out


def test_top_key_from_the_environment(gw: Harness) -> None:
    out = run(top, "--url", gw.url, "--once", env={"TEAMGPU_ADMIN_KEY": gw.admin_key}).output
    assert "top users today" in out


def test_top_takes_the_openai_variables_and_a_v1_url(gw: Harness) -> None:
    """The same OPENAI_BASE_URL (with /v1) and OPENAI_API_KEY as batch, connect, doctor."""
    out = run(top, "--once", env={"OPENAI_BASE_URL": gw.url + "/v1",
                                  "OPENAI_API_KEY": gw.admin_key}).output
    assert "top users today" in out


def test_top_refuses_a_user_key_and_an_unreachable_gateway(gw: Harness,
                                                           closed_port_url: str) -> None:
    r = run(top, "--url", gw.url, "--key", gw.user_key, "--once", ok=False)
    assert r.exit_code == 1 and "refused the key (403)" in r.output
    r = run(top, "--url", closed_port_url, "--key", gw.admin_key, "--once", ok=False)
    assert r.exit_code == 1 and "cannot reach" in r.output


def test_top_live_polls_until_interrupted(gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = []

    def fake_sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(top_module.time, "sleep", fake_sleep)
    polls = []
    real_fetch = top_module.fetch_stats

    def counting_fetch(*a: Any) -> Any:
        polls.append(1)
        return real_fetch(*a)

    monkeypatch.setattr(top_module, "fetch_stats", counting_fetch)
    r = run(top, "--url", gw.url, "--key", gw.admin_key, "--interval", "0.5")
    assert sleeps == [0.5, 0.5, 0.5] and len(polls) == 3
    assert r.exit_code == 0
    # no terminal here (a pipe): each poll printed a frame instead of a blank screen
    assert r.output.count("top users today") == 3


def test_top_fits_an_80_column_terminal(gw: Harness) -> None:
    from rich.console import Console

    stats = gw.client("admin").get("/stats").json()
    console = Console(width=80, record=True, color_system=None)
    console.print(top_module.render_stats(stats, gw.url, 80))
    text = console.export_text()
    assert f"today {stats['today']['date']}" in text  # the whole date, not cut
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.fixture
def busy_gw(fake_server: ServerThread, closed_port_url: str, tmp_path: Path
            ) -> Iterator[tuple[Harness, str, str]]:
    """A gateway serving the fake's model, ``sleepy`` (reported sleeping by a stand-in
    engine host, two on-demand starts) and ``gone`` (down), with a paused and a running
    batch job; yields it and the two jobs' ids."""
    host = StandInHost({"sleepy": "sleeping"},
                       {"sleepy": {"count": 2, "last_wait_s": 4.2, "waiting": 0}})
    with start_gateway(tmp_path / "gw", [fake_server.url], host=host,
                       declared={closed_port_url: ["sleepy", "gone"]},
                       batch_poll_interval_s=0.1) as h:
        paused, running = paused_and_running_jobs(h)
        yield h, paused, running


def line_of(out: str, word: str) -> str:
    return next(line for line in out.splitlines() if word in line)


def test_top_shows_the_models_and_the_batch_jobs(busy_gw: tuple[Harness, str, str]) -> None:
    h, paused, running = busy_gw
    out = run(top, "--url", h.url, "--key", h.admin_key, "--once").output
    models = out[out.index("models"):out.index("batch jobs")]
    ready = line_of(models, MODEL)
    assert "ready" in ready and ready.split("│")[4].strip() == "3"  # in flight: the items
    assert "sleeping" in line_of(models, "sleepy") and "2 (4.2 s)" in line_of(models, "sleepy")
    assert "down" in line_of(models, "gone")
    jobs = out[out.index("batch jobs"):]
    p = [c.strip() for c in line_of(jobs, paused).split("│")]
    assert p[1:4] == [paused, "erin", "paused to 00:00 UTC"]
    assert p[4] == "████░░░░░░"  # 3 of 8 done, to the nearest tenth
    assert p[5:7] == ["0", "5"] and re.fullmatch(r"\d+h\d\dm", p[7]), p  # ETA: the pause
    assert "3/8 done" in jobs
    r = [c.strip() for c in line_of(jobs, running).split("│")]
    assert r[1:4] == [running, "alice", "in_progress"] and r[5:8] == ["3", "0", "–"], r
    assert "0/3 done" in jobs


def test_top_models_and_batch_jobs_fit_80_columns(busy_gw: tuple[Harness, str, str]) -> None:
    from rich.console import Console

    h, paused, _ = busy_gw
    stats = h.client("admin").get("/stats").json()
    console = Console(width=80, record=True, color_system=None)
    console.print(top_module.render_stats(stats, h.url, 80))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    jobs = text[text.index("batch jobs"):]
    header = line_of(jobs, "job, user")  # the user goes under the id, cut short
    for c in ("status", "progress", "in flight", "queued", "ETA"):
        assert c in header, c
    assert paused[:10] in jobs and paused not in jobs
    assert "sleeping" in text and "roles" not in text  # no room for the roles


def test_top_without_batch_jobs_or_from_an_older_gateway(gw: Harness) -> None:
    stats = gw.client("admin").get("/stats").json()
    out = run(top, "--url", gw.url, "--key", gw.admin_key, "--once").output
    assert "batch jobs: none running or ended in the last hour" in out
    assert "models" in out and MODEL in line_of(out[out.index("models"):], MODEL)
    older = {k: v for k, v in stats.items() if k not in ("models", "batches")}
    from rich.console import Console

    console = Console(width=120, record=True, color_system=None)
    console.print(top_module.render_stats(older, gw.url, 120))
    text = console.export_text()
    assert "top users today" in text and "batch jobs" not in text
