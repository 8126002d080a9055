"""Fixtures of the batch tests: the store on SQLite and on the real PostgreSQL at
127.0.0.1:5432 (database ``test``; each test gets a schema of its own, dropped after it;
tests fail, not skip, when PostgreSQL is down), keys, and a live app."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from teamgpu.auth.keys import KeyStore, Principal
from teamgpu.store.db import migrate, open_store
from tests.batch.fakes import LiveApp, live_app, settings

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

services = pytest.mark.services


def pg_engine(schema: str) -> Engine:
    """An engine on the test database whose tables live in ``schema``."""
    return create_engine(PG_URL, pool_pre_ping=True,
                         connect_args={"options": f"-csearch_path={schema}"})


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema in the test database, dropped (with its tables) afterwards."""
    schema = f"tg_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=services)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The store, migrated: each test using it runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        eng = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        yield eng
        eng.dispose()
        return
    schema = request.getfixturevalue("pg_schema")
    eng = pg_engine(schema)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def alice(engine: Engine) -> Principal:
    return KeyStore(engine).create("alice")[1]


@pytest.fixture
def app(sqlite_engine: Engine, tmp_path: Path) -> Iterator[LiveApp]:
    """The Batch API served on loopback (SQLite store, fast fake executor)."""
    with live_app(sqlite_engine, settings(tmp_path, batch_max_file_bytes=64 * 1024)) as a:
        yield a
