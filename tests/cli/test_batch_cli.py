"""``teamgpu batch`` with click's CliRunner against the Batch API served on loopback
(fake executor): submit, status, cancel, results, and ``files`` with its resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import teamgpu.cli.batch as batch_cli
from teamgpu.cli import main
from tests.batch.fakes import LiveApp, jsonl, line, live_app, settings
from tests.support.harness import wait_until


@pytest.fixture
def app(tmp_path: Path) -> Iterator[LiveApp]:
    from teamgpu.store.db import open_store

    engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    with live_app(engine, settings(tmp_path)) as a:
        yield a
    engine.dispose()


def run(app: LiveApp, *args: str, key: str | None = None, code: int = 0,
        env: dict[str, str | None] | None = None) -> Result:
    full = ["batch", *args]
    if env is None:
        full += ["--url", app.url + "/v1", "--key", key or app.alice]
    r = CliRunner(env={"OPENAI_BASE_URL": None, "OPENAI_API_KEY": None, **(env or {})}
                  ).invoke(main, full, catch_exceptions=False)
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    return r


def batches(app: LiveApp) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(run(app, "status", "--json", "--limit", "100").stdout)
    return out


def release(app: LiveApp) -> None:
    app.thread.loop.call_soon_threadsafe(app.executor.release)


def test_submit_wait_status_results(app: LiveApp, tmp_path: Path) -> None:
    src = tmp_path / "req.jsonl"
    src.write_bytes(jsonl([line("a"), line("b", status=422), line("c")]))
    r = run(app, "submit", str(src), "--wait", "--poll-interval", "0.01",
            "--metadata", "team=docs", code=0)
    batch_id = r.stdout.strip()
    assert batch_id.startswith("batch_") and "\n" not in batch_id
    assert f"batch {batch_id} completed: 2 of 3 completed, 1 failed" in r.stderr
    shown = run(app, "status", batch_id).stdout
    assert "completed" in shown and "2 completed, 1 failed, of 3" in shown
    obj = json.loads(run(app, "status", batch_id, "--json").stdout)
    assert obj["id"] == batch_id and obj["metadata"] == {"team": "docs"}
    assert batch_id in run(app, "status").stdout
    out = tmp_path / "results.jsonl"
    r = run(app, "results", batch_id, "--out", str(out))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(o["custom_id"] for o in lines) == ["a", "c"]
    errs = [json.loads(x) for x in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert errs[0]["custom_id"] == "b" and errs[0]["response"]["status_code"] == 422
    assert "2 output lines" in r.stderr and "1 error lines" in r.stderr
    both = run(app, "results", batch_id).stdout.splitlines()
    assert [json.loads(x)["custom_id"] for x in both] == ["a", "c", "b"]


def test_submit_takes_the_endpoint_from_the_first_line(app: LiveApp, tmp_path: Path) -> None:
    src = tmp_path / "emb.jsonl"
    src.write_bytes(jsonl([line("e1", url="/v1/embeddings")]))
    batch_id = run(app, "submit", str(src)).stdout.strip()
    assert json.loads(run(app, "status", batch_id, "--json").stdout)["endpoint"] == \
        "/v1/embeddings"


def test_cancel_and_results_before_the_end(app: LiveApp, tmp_path: Path) -> None:
    src = tmp_path / "req.jsonl"
    src.write_bytes(jsonl([line("a", hold=True), line("b")]))
    batch_id = run(app, "submit", str(src)).stdout.strip()
    wait_until(lambda: app.executor.total_in_flight, what="an item in flight")
    r = run(app, "results", batch_id, code=1)
    assert "in_progress" in r.stderr and "when it ends" in r.stderr
    assert run(app, "cancel", batch_id).stdout.strip() == f"{batch_id} cancelling"
    release(app)
    wait_until(lambda: json.loads(run(app, "status", batch_id, "--json").stdout)["status"]
               == "cancelled", what="cancelled")
    r = run(app, "cancel", batch_id, code=1)
    assert "409" in r.stderr and "no longer be cancelled" in r.stderr


def test_url_and_key_come_from_the_openai_variables(app: LiveApp) -> None:
    r = run(app, "status", env={"OPENAI_BASE_URL": app.url, "OPENAI_API_KEY": app.alice})
    assert r.exit_code == 0
    r = run(app, "status", env={"OPENAI_BASE_URL": app.url, "OPENAI_API_KEY": "tg-nope"},
            code=1)
    assert "401" in r.stderr and "Invalid API key" in r.stderr
    assert "--url" in run(app, "status", env={"OPENAI_API_KEY": "k"}, code=2).stderr


def ctrl_c(seconds: float) -> None:
    """Instead of the CLI's first pause between two polls: Ctrl-C."""
    raise KeyboardInterrupt


def make_tree(root: Path) -> Path:
    src = root / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / ".venv").mkdir()
    (src / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (src / "pkg" / "sub" / "x.py").write_text("X = 'ü'\n")
    (src / "README.md").write_text("not python\n")
    (src / ".venv" / "lib.py").write_text("hidden\n")
    return src


def files_args(src: Path, out: Path, prompt: str = "Write docstrings for: {content}"
               ) -> list[str]:
    return ["files", str(src), "--glob", "*.py", "--prompt", prompt, "--out", str(out),
            "--max-tokens", "50", "--poll-interval", "0.01"]


def test_files_writes_one_answer_per_source_file(app: LiveApp, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    out = tmp_path / "docs-out"
    r = run(app, *files_args(src, out))
    assert (out / "pkg" / "mod.py.md").read_text() == "answer to pkg/mod.py"
    assert (out / "pkg" / "sub" / "x.py.md").read_text() == "answer to pkg/sub/x.py"
    assert not (out / "README.md.md").exists() and not (out / ".venv").exists()
    assert "2 files written" in r.stderr
    bodies = {c.custom_id: c.body for c in app.executor.calls}
    assert set(bodies) == {"pkg/mod.py", "pkg/sub/x.py"}
    assert bodies["pkg/mod.py"]["model"] == "m"  # the first /v1/models lists
    assert bodies["pkg/mod.py"]["max_tokens"] == 50
    assert bodies["pkg/sub/x.py"]["messages"] == [
        {"role": "user", "content": "Write docstrings for: X = 'ü'\n"}]
    state = json.loads((out / ".teamgpu-batch.json").read_text())
    assert state["batch_id"] is None and set(state["written"]) == set(bodies)
    # a rerun has nothing to do
    r = run(app, *files_args(src, out))
    assert "all 2 files already written" in r.stderr and len(batches(app)) == 1


def test_files_resumes_after_ctrl_c_and_notices_changes(
        app: LiveApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path)
    out = tmp_path / "docs-out"
    app.executor.hold_all = True

    monkeypatch.setattr(batch_cli, "_sleep", ctrl_c)
    r = run(app, *files_args(src, out), code=130)
    assert "run the same command again to re-attach" in r.stderr
    state = json.loads((out / ".teamgpu-batch.json").read_text())
    first = state["batch_id"]
    assert first and len(state["submitted"]) == 2
    monkeypatch.setattr(batch_cli, "_sleep", lambda s: None)
    release(app)
    r = run(app, *files_args(src, out))
    assert f"re-attaching to batch {first}" in r.stderr
    assert [b["id"] for b in batches(app)] == [first]  # not submitted again
    assert (out / "pkg" / "mod.py.md").exists()
    # a new file: a new batch for that file only, and it says so
    (src / "pkg" / "new.py").write_text("Y = 2\n")
    calls = len(app.executor.calls)
    r = run(app, *files_args(src, out))
    assert "submitted batch" in r.stderr and "(2 already written)" in r.stderr
    assert [c.custom_id for c in app.executor.calls[calls:]] == ["pkg/new.py"]
    # a new prompt: every file again
    calls = len(app.executor.calls)
    r = run(app, *files_args(src, out, prompt="Summarise {path}: {content}"))
    assert "3 files written" in r.stderr and len(app.executor.calls) - calls == 3
    assert len(batches(app)) == 3


def test_files_changed_while_interrupted_start_a_new_batch(
        app: LiveApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_tree(tmp_path)
    out = tmp_path / "docs-out"
    app.executor.hold_all = True
    monkeypatch.setattr(batch_cli, "_sleep", ctrl_c)
    run(app, *files_args(src, out), code=130)
    first = json.loads((out / ".teamgpu-batch.json").read_text())["batch_id"]
    monkeypatch.setattr(batch_cli, "_sleep", lambda s: None)
    release(app)
    r = run(app, *files_args(src, out, prompt="Explain: {content}"))
    assert f"changed since batch {first}: starting a new batch" in r.stderr
    assert len(batches(app)) == 2
    assert (out / "pkg" / "mod.py.md").exists()


def test_files_that_failed_are_retried_by_a_rerun(app: LiveApp, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    out = tmp_path / "docs-out"
    app.executor.fail_ids = {"pkg/mod.py"}
    r = run(app, *files_args(src, out), code=1)
    assert "failed: pkg/mod.py: 400" in r.stderr and "run the same command again" in r.stderr
    assert not (out / "pkg" / "mod.py.md").exists() and (out / "pkg" / "sub" / "x.py.md").exists()
    app.executor.fail_ids = set()
    calls = len(app.executor.calls)
    run(app, *files_args(src, out))
    assert [c.custom_id for c in app.executor.calls[calls:]] == ["pkg/mod.py"]
    assert (out / "pkg" / "mod.py.md").read_text() == "answer to pkg/mod.py"


def test_files_with_no_match(app: LiveApp, tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    r = run(app, "files", str(src), "--glob", "*.rs", "--prompt", "x", "--out",
            str(tmp_path / "o"), code=1)
    assert "no file under" in r.stderr
