"""``teamgpu batch``: batch jobs on the team's GPU through the Batch API (docs/batch.md).

    teamgpu batch submit requests.jsonl --wait     # upload, create, print the id
    teamgpu batch status [ID]                      # one batch, or a list
    teamgpu batch cancel ID
    teamgpu batch results ID --out results.jsonl   # output, and errors beside it
    teamgpu batch files ./src --glob '*.py' --out ./docs-out \\
        --prompt 'Write docstrings for: {content}'

Every command speaks HTTP to the gateway (httpx; the ``openai`` SDK is not a runtime
dependency). ``--url`` and ``--key`` default to ``OPENAI_BASE_URL`` and
``OPENAI_API_KEY``, as for ``teamgpu connect``. Progress and notes go to stderr, so
stdout carries only what a script wants (an id, JSON, result lines).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from teamgpu.batch.protocol import ENDPOINTS, TERMINAL_STATUSES
from teamgpu.cli.common import gateway_or_recorded
from teamgpu.clientbench import BenchError, normalize_base_url

STATE_FILE = ".teamgpu-batch.json"
STATE_VERSION = 1
CHAT = "/v1/chat/completions"


def _sleep(seconds: float) -> None:
    """Between two polls (tests replace it)."""
    time.sleep(seconds)


class BatchClient:
    """The Batch API over httpx. Every failure is a :class:`click.ClickException` with
    the gateway's message."""

    def __init__(self, base_url: str, key: str, *, ca_cert: Path | None = None,
                 timeout_s: float = 120.0) -> None:
        verify: Any = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, trust_env=False,
                                 verify=verify, headers={"Authorization": f"Bearer {key}"})

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach {self.base_url}{path}: {exc}") from exc
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = r.text[:300]
            raise click.ClickException(f"{method} {self.base_url}{path} answered "
                                       f"{r.status_code}: {msg}")
        return r

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = self._call(method, path, **kw).json()
        return out

    def upload(self, filename: str, data: bytes) -> dict[str, Any]:
        return self._json("POST", "/files", data={"purpose": "batch"},
                          files={"file": (filename, data, "application/jsonl")})

    def create(self, file_id: str, endpoint: str, window: str,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"input_file_id": file_id, "endpoint": endpoint,
                                "completion_window": window}
        if metadata:
            body["metadata"] = metadata
        return self._json("POST", "/batches", json=body)

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}")

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._json("GET", "/batches",
                                                params={"limit": limit})["data"]
        return data

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/batches/{batch_id}/cancel")

    def content(self, file_id: str) -> bytes:
        return self._call("GET", f"/files/{file_id}/content").content

    def first_model(self) -> str:
        data = self._json("GET", "/models").get("data") or []
        if not data:
            raise click.ClickException(f"{self.base_url}/models lists no model for this key")
        return str(data[0]["id"])


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--url``, ``--key`` and ``--ca-cert``; the command gets ``client``."""

    @click.option("--url", envvar="OPENAI_BASE_URL", default=None,
                  help="The team endpoint, e.g. https://gpu.example.com/v1 (env "
                       "OPENAI_BASE_URL; default: the server running on this machine).")
    @click.option("--key", envvar="OPENAI_API_KEY", required=True,
                  help="Your API key (env OPENAI_API_KEY).")
    @click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                  default=None, help="CA certificate to trust (e.g. Caddy's internal root).")
    @functools.wraps(fn)
    def wrapper(*args: Any, url: str | None, key: str, ca_cert: Path | None,
                **kw: Any) -> Any:
        try:
            base = normalize_base_url(gateway_or_recorded(url))
        except BenchError as exc:
            raise click.BadParameter(str(exc), param_hint="--url") from exc
        client = BatchClient(base, key, ca_cert=ca_cert)
        try:
            return fn(*args, client=client, **kw)
        finally:
            client.close()

    return wrapper


def _stderr() -> Console:
    return Console(stderr=True)


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _counts(b: dict[str, Any]) -> tuple[int, int, int]:
    c = b.get("request_counts") or {}
    return int(c.get("total", 0)), int(c.get("completed", 0)), int(c.get("failed", 0))


def wait_for_batch(client: BatchClient, batch_id: str, poll_s: float,
                   console: Console) -> dict[str, Any]:
    """Poll until the batch has ended, with a progress bar on ``console``.

    Raises:
        KeyboardInterrupt: Ctrl-C; the batch goes on running on the gateway.
    """
    columns = (TextColumn("[bold]{task.fields[batch]}[/] {task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("validating", total=None, batch=batch_id)
        while True:
            b = client.get(batch_id)
            total, done, failed = _counts(b)
            progress.update(task, total=total or None, completed=done + failed,
                            description=b["status"] + (f", {failed} failed" if failed else ""))
            if b["status"] in TERMINAL_STATUSES:
                return b
            _sleep(poll_s)


def _interrupted(batch_id: str, how_to_resume: str) -> click.exceptions.Exit:
    click.echo(f"\ninterrupted: batch {batch_id} goes on running on the gateway; "
               f"{how_to_resume}", err=True)
    return click.exceptions.Exit(130)


def _summary(b: dict[str, Any]) -> str:
    total, done, failed = _counts(b)
    return f"batch {b['id']} {b['status']}: {done} of {total} completed, {failed} failed"


def _endpoint_of(data: bytes) -> str:
    """The ``url`` of the first request line, or the chat endpoint."""
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                return CHAT
            return url if url in ENDPOINTS else CHAT
    return CHAT


def _metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise click.BadParameter(f"expected KEY=VALUE, got {p!r}", param_hint="--metadata")
        out[k] = v
    return out


@click.group("batch")
def batch_group() -> None:
    """Batch jobs through the OpenAI Batch API: run in the GPU's idle time at your key's
    batch class, with your fair share and limits (docs/batch.md)."""


@batch_group.command("submit")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--endpoint", type=click.Choice(ENDPOINTS), default=None,
              help="Endpoint of every line (default: the first line's url).")
@click.option("--window", default="24h", show_default=True,
              help="completion_window: '24h', or 'Nh' up to the gateway's batch_max_window_h.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Metadata (repeatable).")
@click.option("--wait", "wait", is_flag=True, help="Show progress until the batch ends.")
@click.option("--poll-interval", "poll_s", type=click.FloatRange(min=0.01), default=2.0,
              show_default=True, help="Seconds between status polls with --wait.")
@client_options
def submit(client: BatchClient, file: Path, endpoint: str | None, window: str,
           metadata: tuple[str, ...], wait: bool, poll_s: float) -> None:
    """Upload FILE (JSONL, one request per line) and create a batch; print its id."""
    data = file.read_bytes()
    meta = _metadata(metadata)
    f = client.upload(file.name, data)
    b = client.create(f["id"], endpoint or _endpoint_of(data), window, meta)
    click.echo(b["id"])
    if not wait:
        return
    try:
        b = wait_for_batch(client, b["id"], poll_s, _stderr())
    except KeyboardInterrupt:
        raise _interrupted(b["id"], f"see `teamgpu batch status {b['id']}`") from None
    click.echo(_summary(b), err=True)
    if b["status"] != "completed":
        raise SystemExit(1)


@batch_group.command("status")
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the batch object(s) as JSON.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True,
              help="Batches listed without an ID (newest first).")
@client_options
def status(client: BatchClient, batch_id: str | None, as_json: bool, limit: int) -> None:
    """Show one batch, or list your latest batches."""
    if batch_id is not None:
        b = client.get(batch_id)
        if as_json:
            click.echo(json.dumps(b, indent=2))
            return
        total, done, failed = _counts(b)
        rows = [("id", b["id"]), ("status", b["status"]), ("endpoint", b["endpoint"]),
                ("requests", f"{done} completed, {failed} failed, of {total}"),
                ("created", _when(b["created_at"])), ("expires", _when(b.get("expires_at"))),
                ("input file", b["input_file_id"]),
                ("output file", b.get("output_file_id") or "-"),
                ("error file", b.get("error_file_id") or "-")]
        for k in ("in_progress_at", "completed_at", "failed_at", "expired_at",
                  "cancelled_at"):
            if b.get(k):
                rows.append((k.removesuffix("_at").replace("_", " "), _when(b[k])))
        for e in ((b.get("errors") or {}).get("data") or []):
            where = f"line {e['line']}: " if e.get("line") else ""
            rows.append(("error", f"{where}{e['code']}: {e['message']}"))
        for k, v in rows:
            click.echo(f"{k:>12}  {v}")
        return
    batches = client.list(limit)
    if as_json:
        click.echo(json.dumps(batches, indent=2))
        return
    console = Console(width=None if os.isatty(1) else 160)
    wide = console.width >= 100  # the endpoint only where it fits beside a whole id
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("id", no_wrap=True)  # whole: ids are copied from here
    t.add_column("status", no_wrap=True)
    t.add_column("done", justify="right", no_wrap=True)
    t.add_column("failed", justify="right", no_wrap=True)
    t.add_column("created", no_wrap=True)
    if wide:
        t.add_column("endpoint", no_wrap=True)
    for b in batches:
        total, done, failed = _counts(b)
        row = [b["id"], b["status"], f"{done}/{total}", str(failed),
               _when(b["created_at"])[5:16]]
        t.add_row(*row, *([b["endpoint"].removeprefix("/v1/")] if wide else []))
    console.print(t)


@batch_group.command("cancel")
@click.argument("batch_id")
@client_options
def cancel(client: BatchClient, batch_id: str) -> None:
    """Cancel a batch: nothing more starts, items already running finish."""
    b = client.cancel(batch_id)
    click.echo(f"{b['id']} {b['status']}")


def _errors_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.errors{out.suffix or '.jsonl'}")


@batch_group.command("results")
@click.argument("batch_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write output lines here and error lines to OUT's name with .errors "
                   "(default: both to stdout).")
@client_options
def results(client: BatchClient, batch_id: str, out: Path | None) -> None:
    """Download the output and error lines of a batch that has ended."""
    b = client.get(batch_id)
    if b["status"] not in TERMINAL_STATUSES:
        raise click.ClickException(f"batch {batch_id} is {b['status']}: its results come "
                                   "when it ends (`teamgpu batch submit --wait` or "
                                   "`teamgpu batch status`)")
    output = client.content(b["output_file_id"]) if b.get("output_file_id") else b""
    errors = client.content(b["error_file_id"]) if b.get("error_file_id") else b""
    if out is None:
        click.echo(output + errors, nl=False)
    else:
        out.write_bytes(output)
        n_out, n_err = output.count(b"\n"), errors.count(b"\n")
        click.echo(f"{n_out} output lines in {out}", err=True)
        if errors:
            _errors_path(out).write_bytes(errors)
            click.echo(f"{n_err} error lines in {_errors_path(out)}", err=True)
    click.echo(_summary(b), err=True)


# --- teamgpu batch files: one chat request per source file ---------------------------
@dataclass
class RunState:
    """``OUT/.teamgpu-batch.json``: the batch under way and what was written.

    ``submitted`` and ``written`` map a file's relative path to the SHA-256 of its
    request line (model, prompt, max_tokens and the file's content), so a rerun knows
    whether a written result still matches the request it would make now.
    """

    batch_id: str | None = None
    url: str | None = None
    submitted: dict[str, str] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, out: Path) -> RunState:
        p = out / STATE_FILE
        if not p.exists():
            return cls()
        try:
            d = json.loads(p.read_text())
        except ValueError as exc:
            raise click.ClickException(f"{p} is not valid JSON; remove it to start "
                                       "afresh") from exc
        return cls(batch_id=d.get("batch_id"), url=d.get("url"),
                   submitted=dict(d.get("submitted") or {}),
                   written=dict(d.get("written") or {}))

    def save(self, out: Path) -> None:
        p = out / STATE_FILE
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "batch_id": self.batch_id,
                                   "url": self.url, "submitted": self.submitted,
                                   "written": self.written}, indent=1, sort_keys=True))
        tmp.replace(p)


def source_files(src: Path, pattern: str, out: Path) -> Iterator[tuple[str, Path]]:
    """``(relative path, path)`` of the files under ``src`` matching ``pattern`` (at any
    depth), sorted; hidden files and folders and everything under ``out`` are left out."""
    out_r = out.resolve()
    found = []
    for p in src.rglob(pattern):
        rel = p.relative_to(src)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if p.resolve().is_relative_to(out_r):
            continue
        found.append((rel.as_posix(), p))
    yield from sorted(found)


def request_line(rel: str, content: str, prompt: str, model: str,
                 max_tokens: int | None) -> bytes:
    """One chat request: ``{content}`` and ``{path}`` in the prompt are replaced (a prompt
    without ``{content}`` gets the content after a blank line)."""
    text = prompt.replace("{path}", rel)
    text = text.replace("{content}", content) if "{content}" in prompt else \
        f"{text}\n\n{content}"
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps({"custom_id": rel, "method": "POST", "url": CHAT, "body": body},
                      ensure_ascii=False).encode() + b"\n"


def _answer_text(body: dict[str, Any]) -> str:
    choice = (body.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    return str(msg.get("content") or choice.get("text") or "")


def _result_path(out: Path, rel: str) -> Path:
    """``out/rel.md``; raises for a path that would leave ``out``."""
    p = (out / f"{rel}.md").resolve()
    if not p.is_relative_to(out.resolve()):
        raise click.ClickException(f"refusing to write outside {out}: {rel!r}")
    return p


def write_results(client: BatchClient, b: dict[str, Any], out: Path, state: RunState
                  ) -> tuple[int, list[str]]:
    """Write each answered file to ``out`` (mirroring the source tree) and note it in
    ``state``. Returns ``(written, errors)``; files already written are skipped."""
    written = 0
    if b.get("output_file_id"):
        for raw in client.content(b["output_file_id"]).splitlines():
            if not raw.strip():
                continue
            o = json.loads(raw)
            rel = o.get("custom_id")
            h = state.submitted.get(rel) if isinstance(rel, str) else None
            resp = o.get("response") or {}
            if h is None or not 200 <= int(resp.get("status_code", 0)) < 300:
                continue
            if state.written.get(rel) == h:
                continue
            p = _result_path(out, rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(_answer_text(resp.get("body") or {}), encoding="utf-8")
            state.written[rel] = h
            written += 1
    errors = []
    if b.get("error_file_id"):
        for raw in client.content(b["error_file_id"]).splitlines():
            if raw.strip():
                e = json.loads(raw)
                resp = e.get("response") or {}
                err = e.get("error") or (resp.get("body") or {}).get("error") or {}
                code = resp.get("status_code") or err.get("code")
                errors.append(f"{e.get('custom_id')}: {code}: {err.get('message')}")
    return written, errors


@batch_group.command("files")
@click.argument("src", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--glob", "pattern", default="*", show_default=True,
              help="Which files under SRC, at any depth (e.g. '*.py').")
@click.option("--prompt", required=True,
              help="The request for each file; {content} is the file's text, {path} its "
                   "path under SRC.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the answers go, mirroring SRC (a/b.py -> OUT/a/b.py.md).")
@click.option("--model", default=None, help="Model (default: the first /v1/models lists).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="max_tokens of each request.")
@click.option("--window", default="24h", show_default=True, help="completion_window.")
@click.option("--poll-interval", "poll_s", type=click.FloatRange(min=0.01), default=2.0,
              show_default=True, help="Seconds between status polls.")
@client_options
def files(client: BatchClient, src: Path, pattern: str, prompt: str, out: Path,
          model: str | None, max_tokens: int | None, window: str, poll_s: float) -> None:
    """Ask the same question of every file under SRC as one batch; write the answers.

    Resumable: the batch id is kept in OUT/.teamgpu-batch.json, so after Ctrl-C the same
    command re-attaches to the batch instead of submitting again, and files already
    written are skipped. Changed files, a changed prompt or model start a new batch for
    what changed (and say so); files whose request failed are retried by a rerun.
    """
    console = _stderr()
    out.mkdir(parents=True, exist_ok=True)
    chosen = model or client.first_model()
    lines: dict[str, bytes] = {}
    for rel, p in source_files(src, pattern, out):
        lines[rel] = request_line(rel, p.read_text(encoding="utf-8", errors="replace"),
                                  prompt, chosen, max_tokens)
    if not lines:
        raise click.ClickException(f"no file under {src} matches {pattern!r}")
    hashes = {rel: hashlib.sha256(data).hexdigest() for rel, data in lines.items()}
    state = RunState.load(out)
    todo = {rel: h for rel, h in hashes.items() if state.written.get(rel) != h}
    if not todo:
        click.echo(f"all {len(lines)} files already written to {out}", err=True)
        return
    same_gateway = state.url in (None, client.base_url)
    if state.batch_id and same_gateway and all(
            state.submitted.get(r) == h for r, h in todo.items()):
        click.echo(f"re-attaching to batch {state.batch_id} ({len(todo)} of "
                   f"{len(lines)} files still to write)", err=True)
    else:
        if state.batch_id and not same_gateway:
            click.echo(f"batch {state.batch_id} was submitted to {state.url}, not "
                       f"{client.base_url}: starting a new batch", err=True)
        elif state.batch_id:
            click.echo(f"files, prompt or model changed since batch {state.batch_id}: "
                       f"starting a new batch (`teamgpu batch cancel {state.batch_id}` "
                       "stops the old one)", err=True)
        data = b"".join(lines[rel] for rel in todo)
        f = client.upload(f"{out.name or 'files'}.jsonl", data)
        b = client.create(f["id"], CHAT, window, {"teamgpu": "batch files"})
        state.batch_id, state.url, state.submitted = b["id"], client.base_url, dict(todo)
        state.save(out)
        skipped = len(lines) - len(todo)
        click.echo(f"submitted batch {b['id']}: {len(todo)} files"
                   + (f" ({skipped} already written)" if skipped else ""), err=True)
    batch_id = state.batch_id
    assert batch_id is not None
    try:
        b = wait_for_batch(client, batch_id, poll_s, console)
    except KeyboardInterrupt:
        raise _interrupted(batch_id, "run the same command again to re-attach") from None
    n, errors = write_results(client, b, out, state)
    state.batch_id, state.submitted = None, {}
    state.save(out)
    click.echo(f"{_summary(b)}; {n} files written to {out}", err=True)
    for e in errors[:20]:
        click.echo(f"  failed: {e}", err=True)
    missing = [rel for rel in hashes if state.written.get(rel) != hashes[rel]]
    if missing:
        click.echo(f"{len(missing)} files have no answer yet: run the same command again "
                   "to retry them", err=True)
        raise SystemExit(1)
