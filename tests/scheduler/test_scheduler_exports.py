"""The scheduler's public API is exactly what ``teamgpu.scheduler`` exports."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import teamgpu.scheduler
from teamgpu.scheduler import FairQueueConfig

DOCS = Path(__file__).resolve().parents[2] / "docs" / "scheduler.md"


def test_exported_members() -> None:
    assert sorted(teamgpu.scheduler.__all__) == [
        "Admission",
        "EngineLoad",
        "EngineLoadPoller",
        "FairQueue",
        "FairQueueConfig",
        "InvalidPriority",
        "Lease",
        "PriorityClass",
        "QueueFull",
        "QueueTimeout",
        "QueuedRequest",
        "SchedulerConfigError",
        "SchedulerError",
        "SchedulerStats",
        "UserQueueFull",
        "VirtualCounters",
        "fetch_engine_load",
        "parse_engine_load",
    ]
    for name in teamgpu.scheduler.__all__:
        assert getattr(teamgpu.scheduler, name).__module__.startswith("teamgpu.scheduler")


def test_every_setting_is_documented_with_its_default() -> None:
    text = DOCS.read_text()
    for field in dataclasses.fields(FairQueueConfig):
        row = re.search(rf"^\| `{field.name}` \|(.+)$", text, re.MULTILINE)
        assert row, f"{field.name} is not in the settings table of docs/scheduler.md"
        if field.name != "queue_timeout_s":
            default = getattr(FairQueueConfig(), field.name)
            assert f"`{default}`" in row.group(1), f"{field.name}: default {default} not shown"
