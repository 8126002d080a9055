"""Reading deploy/compose.yaml as Docker Compose would, without Docker.

Compose interpolates ``${VAR}`` forms in the YAML values from the environment and ``.env``
(https://docs.docker.com/reference/compose-file/interpolation/): ``${VAR}``, ``$VAR``,
``${VAR:-default}`` / ``${VAR-default}``, ``${VAR:?error}`` / ``${VAR?error}``,
``${VAR:+alt}`` / ``${VAR+alt}``, and ``$$`` for a literal ``$``. This module implements
that subset (no nested forms, which the file does not use) to check the file the way the
engine would see it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"

VAR = re.compile(
    r"\$(?:(?P<esc>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def variables(text: str) -> set[str]:
    """Every variable name ``text`` refers to."""
    return {m["name"] or m["bare"] for m in VAR.finditer(text) if not m["esc"]}


def interpolate(text: str, env: dict[str, str]) -> str:
    """``text`` with every variable form replaced as Compose does."""

    def sub(m: re.Match[str]) -> str:
        if m["esc"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op is not None and op[0] == ":")
        if op in ("-", ":-"):
            return arg if (value is None if op == "-" else unset_or_empty) else str(value)
        if op in ("?", ":?"):
            if value is None if op == "?" else unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op in ("+", ":+"):
            return "" if (value is None if op == "+" else unset_or_empty) else arg
        return value or ""

    return VAR.sub(sub, text)


def interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string in a parsed YAML tree (keys stay as they are)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def parse_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a Compose ``.env`` file (quotes removed, comments skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def documented_variables(path: Path) -> dict[str, bool]:
    """Each variable set in ``path`` -> whether a comment precedes it in its paragraph."""
    out: dict[str, bool] = {}
    commented = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            commented = False
        elif line.startswith("#"):
            commented = True
        elif "=" in line:
            out[line.partition("=")[0].strip()] = commented
    return out


def load_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def load(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Compose model after interpolation with ``env`` (default: .env.example)."""
    return interpolate_tree(load_raw(), parse_env_file(ENV_EXAMPLE) if env is None else env)  # type: ignore[no-any-return]


def command_words(service: dict[str, Any]) -> list[str]:
    """A service's command as a list (Compose splits a string command like a shell)."""
    import shlex

    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
