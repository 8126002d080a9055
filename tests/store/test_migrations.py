"""Migrations create exactly the schema that teamgpu/store/tables.py describes."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from teamgpu.store.db import migrate, open_store
from teamgpu.store.tables import metadata


def test_migrations_create_the_schema_of_the_tables_module(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    insp = inspect(engine)
    assert set(insp.get_table_names()) >= {"api_keys", "usage", "alembic_version"}
    for table in metadata.sorted_tables:
        cols = {c["name"]: c for c in insp.get_columns(table.name)}
        assert set(cols) == set(table.columns.keys()), table.name
        for c in table.columns:
            assert cols[c.name]["nullable"] == c.nullable, (table.name, c.name)
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        assert {i.name for i in table.indexes} <= indexes, table.name


def test_migrating_twice_is_a_no_op(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    engine = open_store(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO usage (request_id, ts, endpoint, stream, status, "
                             "outcome, prompt_tokens, completion_tokens, total_ms) VALUES "
                             "('r', '2024-01-01 00:00:00', 'e', 0, 200, 'ok', 1, 2, 3.0)")
    migrate(engine)
    engine2 = open_store(url)
    with engine2.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM usage").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()


def test_the_store_runs_in_wal_mode(tmp_path: Path) -> None:
    engine = open_store(f"sqlite:///{tmp_path / 'sub' / 'm.db'}")  # parent dir is made
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"


def test_downgrade_to_base_removes_the_tables(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine)
    from alembic import command
    from alembic.config import Config

    from teamgpu.store.db import MIGRATIONS_DIR

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}


def test_0002_adds_batch_tables_and_keeps_usage_rows(tmp_path: Path) -> None:
    """A store made at 0001 with audit rows in it migrates to head: the rows stay, their
    batch_id is NULL, the batch tables exist; a downgrade to 0001 takes them away again."""
    engine = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    migrate(engine, "0001")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO usage (request_id, ts, endpoint, stream, status, "
                             "outcome, prompt_tokens, completion_tokens, total_ms) VALUES "
                             "('r', '2024-01-01 00:00:00', 'e', 0, 200, 'ok', 1, 2, 3.0)")
    migrate(engine)
    insp = inspect(engine)
    assert {"batch_files", "batch_file_chunks", "batches", "batch_items"} <= set(
        insp.get_table_names())
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT request_id, batch_id FROM usage").all() == [
            ("r", None)]
    from alembic import command
    from alembic.config import Config

    from teamgpu.store.db import MIGRATIONS_DIR

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    insp = inspect(engine)
    assert "batches" not in insp.get_table_names()
    assert "batch_id" not in {c["name"] for c in insp.get_columns("usage")}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM usage").scalar_one() == 1
