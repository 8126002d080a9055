"""What every command shares: building the settings from flags, printing JSON."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from teamgpu.cli.server_record import read_record
from teamgpu.settings import Settings


def settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--data-dir`` and ``--config`` to a command."""

    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Where all state lives (env TEAMGPU_DATA_DIR).")
    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="Settings file (default ./teamgpu.toml; env TEAMGPU_CONFIG).")
    @functools.wraps(fn)
    def wrapper(*args: Any, data_dir: Path | None, config_file: Path | None, **kw: Any) -> Any:
        overrides: dict[str, Any] = kw.pop("_overrides", {}) if "_overrides" in kw else {}
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        if config_file is not None:
            if not config_file.exists():
                raise click.UsageError(f"settings file {config_file} does not exist")
            os.environ["TEAMGPU_CONFIG"] = str(config_file)
        return fn(*args, _settings_overrides=overrides, **kw)

    return wrapper


def load_settings(**overrides: Any) -> Settings:
    """Settings from file and environment with ``overrides`` (CLI flags; None = not given)
    on top. Invalid settings print the errors and exit with status 2."""
    clean = {k: v for k, v in overrides.items() if v is not None and v != () and v != []}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        click.echo("error: invalid settings:", err=True)
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            click.echo(f"  {loc}: {e['msg']} (got {e.get('input')!r})", err=True)
        sys.exit(2)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def gateway_or_recorded(url: str | None, *, api: bool = True) -> str:
    """``url`` when given (``--url`` or ``OPENAI_BASE_URL``), else the gateway recorded in
    the data directory by a running ``teamgpu up`` or ``serve`` (``server.json``), with
    ``/v1`` when ``api``.

    Raises:
        click.UsageError: no URL given and no running server recorded (exit status 2).
    """
    if url:
        return url
    data_dir = load_settings().data_dir
    record, note = read_record(data_dir)
    if record is None:
        raise click.UsageError(
            "give --url (or set OPENAI_BASE_URL): no running teamgpu server is recorded in "
            f"{data_dir}" + (f" ({note})" if note else ""))
    return record.gateway_url + ("/v1" if api else "")
