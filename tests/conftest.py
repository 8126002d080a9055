"""Shared fixtures: a fake vLLM and the real gateway, both served by uvicorn on loopback.

``gateway`` is one session-wide gateway with default settings in front of the session's
fake backend; tests that need other settings start their own with
:func:`tests.support.harness.start_gateway`, which takes a fraction of a second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fake_backend import FakeBackend, ServerThread, free_port
from tests.support.harness import Harness, start_gateway


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``TEAMGPU_*`` variable and no ``teamgpu.toml`` of the runner leak into a test:
    the environment is cleared of them and the working directory is a fresh one."""
    for k in list(os.environ):
        if k.startswith("TEAMGPU_"):
            monkeypatch.delenv(k)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="session")
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture(scope="session")
def fake_server(fake: FakeBackend) -> Iterator[ServerThread]:
    with ServerThread(fake) as t:
        yield t


@pytest.fixture(scope="session")
def gateway(fake_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    """The session's gateway in front of the session's fake backend (default settings).

    Its store holds two keys, an admin key (user ``root``) and a user key (user
    ``alice``); tests that create, expire, revoke or rotate keys, or need other settings,
    start their own gateway, so that this one stays as described for every test.
    """
    with start_gateway(tmp_path_factory.mktemp("gw"), [fake_server.url]) as h:
        yield h


@pytest.fixture
def client(gateway: Harness) -> Iterator[httpx.Client]:
    """A client of the session gateway with the user key (user ``alice``)."""
    with httpx.Client(base_url=gateway.url, timeout=10.0, trust_env=False,
                      headers={"Authorization": f"Bearer {gateway.user_key}"}) as c:
        yield c


@pytest.fixture
def closed_port_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
