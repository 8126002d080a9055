"""A gateway on loopback serving ``/metrics``, ``/stats`` and the dashboard, as
``create_app`` builds them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_backend import ServerThread
from tests.support.harness import Harness, start_gateway


@contextlib.contextmanager
def observed_gateway(data_dir: Path, backends: list[str], **settings: Any) -> Iterator[Harness]:
    with start_gateway(data_dir, backends, **settings) as h:
        yield h


@pytest.fixture
def obs(fake_server: ServerThread, tmp_path: Path) -> Iterator[Harness]:
    """A fresh gateway (default settings) in front of the session's fake backend."""
    with observed_gateway(tmp_path / "gw", [fake_server.url]) as h:
        yield h
