"""``teamgpu usage``: who used the team server, from the audit log.

Reads the store directly (the data directory's SQLite file, or ``database_url``), so it
works with or without a running gateway. Rows a running gateway has not written yet
(its writer batches for at most 50 ms) are not counted.

Examples::

    teamgpu usage                          # per user, today (UTC)
    teamgpu usage --by day --since 7d      # per UTC day, last 7 days
    teamgpu usage --by model --since 2026-11-01 --until 2026-12-01 --csv
    teamgpu usage --by batch --since 7d    # per batch job; "-": requests made directly
"""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from teamgpu.cli.common import load_settings, print_json, settings_options
from teamgpu.metrics.usage_report import GroupBy, UsageGroup, parse_since, usage_report
from teamgpu.store.db import open_store

__all__ = ["usage"]

COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "errors",
           "p50_ttft_ms")


def _when(value: str | None, param: str, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value, now)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


@click.command("usage")
@click.option("--by", "by", type=click.Choice(["user", "day", "model", "batch"]),
              default="user", show_default=True,
              help="Group by user, UTC day, served model or batch job (batch id; '-' for "
                   "requests not made by a batch job).")
@click.option("--since", default="today", show_default=True,
              help="Start: today, yesterday, all, 24h, 7d, 30m, YYYY-MM-DD or ISO date-time "
                   "(UTC).")
@click.option("--until", default=None, help="End (excluded), same forms; default: now.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per row.")
@settings_options
def usage(_settings_overrides: dict[str, Any], by: GroupBy, since: str, until: str | None,
          as_csv: bool, as_json: bool) -> None:
    """Requests, tokens, errors and median TTFT per user, day, model or batch job."""
    if as_csv and as_json:
        raise click.UsageError("--csv and --json exclude each other")
    now = datetime.now(UTC)
    start = _when(since, "--since", now)
    end = _when(until, "--until", now)
    settings = load_settings(**_settings_overrides)
    groups = usage_report(open_store(settings.db_url), by=by, since=start, until=end)
    rows = [g.to_dict(by) for g in groups]
    if as_json:
        print_json(rows)
    elif as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=[by, *COLUMNS], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        _table(by, groups, start, end or now)


def _table(by: str, groups: list[UsageGroup], start: datetime | None, end: datetime) -> None:
    span = f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC" if start else \
        f"everything to {end:%Y-%m-%d %H:%M} UTC"
    t = Table(title=f"usage by {by}, {span}", title_justify="left")
    t.add_column(by)
    for c in ("requests", "prompt tokens", "completion tokens", "total tokens", "errors",
              "p50 TTFT ms"):
        t.add_column(c, justify="right")
    for g in groups:
        t.add_row(g.key, f"{g.requests:,}", f"{g.prompt_tokens:,}", f"{g.completion_tokens:,}",
                  f"{g.total_tokens:,}", f"{g.errors:,}",
                  "–" if g.p50_ttft_ms is None else f"{g.p50_ttft_ms:,.0f}")
    if len(groups) > 1:
        t.add_section()
        t.add_row("total", f"{sum(g.requests for g in groups):,}",
                  f"{sum(g.prompt_tokens for g in groups):,}",
                  f"{sum(g.completion_tokens for g in groups):,}",
                  f"{sum(g.total_tokens for g in groups):,}",
                  f"{sum(g.errors for g in groups):,}", "")
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not groups:
        console.print(f"No requests {span}.")
        return
    console.print(t)
