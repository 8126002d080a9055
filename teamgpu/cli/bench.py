"""``teamgpu bench URL --key KEY --users 1,5,10``: what a team would feel.

See :mod:`teamgpu.clientbench` for what is measured and how.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from teamgpu.clientbench import (
    BenchConfig,
    BenchError,
    RequestResult,
    markdown_table,
    normalize_base_url,
    run_bench,
)


def _users(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from exc
    if not levels or any(u < 1 for u in levels):
        raise click.BadParameter("every level must be 1 or more")
    return levels


@click.command("bench")
@click.argument("url", envvar="OPENAI_BASE_URL")
@click.option("--key", envvar="OPENAI_API_KEY", required=True,
              help="API key (env OPENAI_API_KEY).")
@click.option("--users", "users_", default="1,5,10", show_default=True,
              help="Concurrency levels, comma separated.")
@click.option("--model", default=None, help="Model (default: the first /v1/models lists).")
@click.option("--requests-per-user", type=click.IntRange(min=1), default=3, show_default=True,
              help="Requests each user sends, one after another.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="max_tokens of every request.")
@click.option("--prompt", default=None, help="The user message (default: a short story).")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Ask vLLM to always produce max_tokens tokens (comparable runs).")
@click.option("--extra-body", default=None,
              help="JSON object merged into every request body.")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="CA certificate to trust (e.g. Caddy's internal root.crt).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=300.0, show_default=True, help="Per-request read timeout, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def bench(url: str, key: str, users_: str, model: str | None, requests_per_user: int,
          max_tokens: int, prompt: str | None, ignore_eos: bool, extra_body: str | None,
          ca_cert: Path | None, timeout_s: float, as_json: bool) -> None:
    """Measure TTFT and tokens/s for 1, 5, 10... concurrent streaming users.

    URL is the OpenAI base URL, ending in /v1 (as in OPENAI_BASE_URL). For each level
    prints TTFT p50/p95, tokens/s per user and in total: a markdown table, or with --json
    one JSON document. Progress goes to stderr.
    """
    levels = _users(users_)
    extra: dict[str, Any] = {}
    if extra_body:
        try:
            extra = json.loads(extra_body)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--extra-body") from exc
        if not isinstance(extra, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--extra-body")
    try:
        base = normalize_base_url(url)
    except BenchError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from exc
    cfg = BenchConfig(
        base_url=base, key=key, model=model, users=levels,
        requests_per_user=requests_per_user, max_tokens=max_tokens,
        ignore_eos=ignore_eos, extra_body=extra, timeout_s=timeout_s,
        verify=str(ca_cert) if ca_cert else True,
        **({"prompt": prompt} if prompt else {}),
    )
    console = Console(stderr=True)
    total = sum(levels) * requests_per_user
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=as_json) as progress:
        task = progress.add_task("starting", total=total)

        def on_done(users: int, res: RequestResult) -> None:
            progress.update(task, advance=1,
                            description=f"{users} user{'s' if users > 1 else ''}")

        try:
            report = asyncio.run(run_bench(cfg, on_done))
        except BenchError as exc:
            raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(markdown_table(report))
    failed = sum(lv["errors"] for lv in report["levels"])
    if failed:
        first = next((lv.get("first_error") for lv in report["levels"] if lv.get("first_error")),
                     None)
        console.print(f"[yellow]{failed} request(s) failed[/]" + (f": {first}" if first else ""))
        raise SystemExit(1)
