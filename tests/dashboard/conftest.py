"""A gateway on loopback with the observability routes and the dashboard installed
(in front of the app's own routes, as the lead's ``create_app`` will serve them)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_backend import ServerThread
from tests.support.harness import Harness, start_gateway


@contextlib.contextmanager
def dashboard_gateway(data_dir: Path, backends: list[str], **settings: Any) -> Iterator[Harness]:
    with start_gateway(data_dir, backends, **settings) as h:
        yield h


@pytest.fixture
def dash(fake_server: ServerThread, tmp_path: Path) -> Iterator[Harness]:
    with dashboard_gateway(tmp_path / "gw", [fake_server.url]) as h:
        yield h


def browser(h: Harness, **kw: Any) -> httpx.Client:
    """A cookie-keeping client without any API key, like a browser."""
    c = httpx.Client(base_url=h.url, timeout=10.0, trust_env=False, **kw)
    h._clients.append(c)
    return c


def sign_in(h: Harness, key: str | None = None) -> tuple[httpx.Client, str]:
    """A browser-like client signed in with ``key`` (default: the admin key), and the
    page's CSRF token."""
    c = browser(h)
    r = c.post("/dashboard/login", data={"key": key or h.admin_key})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard", r.text
    page = c.get("/dashboard")
    assert page.status_code == 200
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert m
    return c, m.group(1)
