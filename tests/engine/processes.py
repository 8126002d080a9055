"""Helpers for engine tests: is a process alive, what did the fake engine record."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; zombies count as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


async def wait_until_dead(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """The pids still alive after up to ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if process_alive(pid)]
        if not alive:
            return []
        await asyncio.sleep(0.05)
    return [pid for pid in pids if process_alive(pid)]


def launches(records: Path) -> list[dict[str, object]]:
    """One dict per fake-engine launch: ``pid``, ``argv``, ``env`` (its VLLM_* variables)."""
    path = records / "starts"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def child_of(records: Path, pid: int) -> int:
    """The pid of the child (the "engine core") the fake engine ``pid`` spawned."""
    return int((records / f"child-{pid}").read_text())


def controls(records: Path) -> list[dict[str, str]]:
    """The sleep and wake-up calls the fake engines got, in order: ``served`` (the model
    name) and ``path``."""
    path = records / "control"
    if not path.exists():
        return []
    return [{k: str(v) for k, v in json.loads(line).items()}
            for line in path.read_text().splitlines()]
