"""deploy/systemd/teamgpu.service: the unit for ``teamgpu up`` on bare metal.

How it stops matters: ``teamgpu up`` stops vLLM's process group itself on SIGTERM and
flushes the audit log, so systemd must signal the main process only first
(``KillMode=mixed``), then SIGKILL whatever is left in the cgroup after the timeout.
``systemd-analyze verify`` checks the syntax where systemd is installed.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "teamgpu.service"


def unit() -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_runs_teamgpu_up_as_its_own_user() -> None:
    svc = unit()["Service"]
    assert svc["User"] == "teamgpu" and svc["Group"] == "teamgpu"
    assert svc["ExecStart"].split()[0].endswith("/bin/teamgpu")
    assert svc["ExecStart"].split()[1] == "up"
    assert svc["WorkingDirectory"].startswith("/var/lib/teamgpu")
    assert "TEAMGPU_DATA_DIR=/var/lib/teamgpu" in UNIT.read_text()


def test_stops_cleanly_and_restarts_on_failure() -> None:
    svc = unit()["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["KillMode"] == "mixed"      # SIGTERM to `up` only, SIGKILL to all at the end
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"].rstrip("s")) >= 30
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    r = subprocess.run(["systemd-analyze", "verify", str(UNIT)], check=False, capture_output=True,
                       text=True,
                       timeout=60)
    # the only complaint allowed: teamgpu itself is not installed at /opt/teamgpu here
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if line.strip() and "is not executable" not in line
                and "/opt/teamgpu" not in line]
    assert not problems, problems
