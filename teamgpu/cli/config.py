"""``teamgpu config show``."""

from __future__ import annotations

from typing import Any

import click

from teamgpu.cli.common import load_settings, print_json, settings_options


@click.group("config")
def config_group() -> None:
    """Inspect the effective settings."""


@config_group.command("show")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(_settings_overrides: dict[str, Any], as_json: bool) -> None:
    """Print the effective settings (file, TEAMGPU_* environment, flags), secrets masked."""
    s = load_settings(**_settings_overrides)
    data = s.masked()
    data["database"] = data.get("database_url") or s.db_url
    if as_json:
        print_json(data)
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        click.echo(f"{k.ljust(width)}  {v}")
