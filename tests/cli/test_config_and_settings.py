"""Settings precedence (toml < env < init args), masking, and ``teamgpu config show``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from teamgpu.cli import main
from teamgpu.settings import Settings, mask_url

PG = "postgresql+psycopg://team:s3cr3t-pw@db.example:5432/teamgpu"


def test_defaults(clean_env: Path) -> None:
    s = Settings()
    assert (s.port, s.host, s.store_prompts) == (8080, "0.0.0.0", False)
    assert s.db_url == f"sqlite:///{s.data_dir / 'teamgpu.db'}"


def test_precedence_toml_then_env_then_init(clean_env: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / "teamgpu.toml").write_text(
        'port = 1111\nread_timeout_s = 7.5\nhost = "10.0.0.1"\n'
        '[model_aliases]\nsmall = "org/Small"\n')
    s = Settings()
    assert (s.port, s.read_timeout_s, s.host) == (1111, 7.5, "10.0.0.1")
    assert s.model_aliases == {"small": "org/Small"}
    monkeypatch.setenv("TEAMGPU_PORT", "2222")
    monkeypatch.setenv("TEAMGPU_STORE_PROMPTS", "true")
    s = Settings()
    assert (s.port, s.read_timeout_s, s.store_prompts) == (2222, 7.5, True)
    s = Settings(port=3333)
    assert (s.port, s.read_timeout_s, s.host) == (3333, 7.5, "10.0.0.1")


def test_config_file_from_env(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path) -> None:
    f = tmp_path / "other.toml"
    f.write_text("port = 4444\n")
    monkeypatch.setenv("TEAMGPU_CONFIG", str(f))
    assert Settings().port == 4444


def test_invalid_settings_are_refused(clean_env: Path) -> None:
    with pytest.raises(ValueError, match="backend URL must start with http"):
        Settings(backends=["localhost:8000"])
    with pytest.raises(ValueError, match="greater than or equal to 1024"):
        Settings(max_body_bytes=10)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Settings(no_such_setting=1)  # type: ignore[call-arg]


def test_backend_urls_are_normalised(clean_env: Path) -> None:
    assert Settings(backends=["http://h:1/v1/", "https://x/"]).backends == ["http://h:1",
                                                                          "https://x"]


def test_masked_hides_passwords(clean_env: Path) -> None:
    s = Settings(database_url=PG,  # type: ignore[arg-type]  # a str, as from a flag
                 redis_url="redis://:r3d1s-pw@cache:6379/0")  # type: ignore[arg-type]
    m = s.masked()
    text = json.dumps(m)
    assert "s3cr3t-pw" not in text and "r3d1s-pw" not in text
    assert m["database_url"] == "postgresql+psycopg://team:***@db.example:5432/teamgpu"
    assert m["redis_url"] == "redis://:***@cache:6379/0"
    assert s.db_url == PG  # the real value stays usable


@pytest.mark.parametrize(("url", "masked"), [
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_config_show_masks_the_database_password(clean_env: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("TEAMGPU_DATABASE_URL", PG)
    r = CliRunner().invoke(main, ["config", "show", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "s3cr3t-pw" not in r.output and "***" in r.output
    r = CliRunner().invoke(main, ["config", "show", "--json", "--data-dir", str(tmp_path / "d")])
    data = json.loads(r.output)
    assert "s3cr3t-pw" not in r.output
    assert data["data_dir"] == str(tmp_path / "d")


def test_config_show_reads_the_file_given_with_config(clean_env: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    # the command sets TEAMGPU_CONFIG in the process environment; make sure it is undone
    monkeypatch.setenv("TEAMGPU_CONFIG", "placeholder")
    monkeypatch.delenv("TEAMGPU_CONFIG")
    f = tmp_path / "c.toml"
    f.write_text(f'port = 5555\ndatabase_url = "{PG}"\n')
    r = CliRunner().invoke(main, ["config", "show", "--json", "--config", str(f)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["port"] == 5555 and "s3cr3t-pw" not in r.output
    r = CliRunner().invoke(main, ["config", "show", "--config", str(tmp_path / "missing.toml")])
    assert r.exit_code != 0
