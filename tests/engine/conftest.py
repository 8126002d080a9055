"""Fixtures for the engine tests: a fake vLLM that the supervisor's real command runs."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from teamgpu.engine.supervisor import EngineSpec, free_port

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")

SpecFactory = Callable[..., EngineSpec]


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """Folder where the fake engine records its launches and children."""
    folder = tmp_path / "records"
    folder.mkdir()
    return folder


@pytest.fixture
def fake_vllm(tmp_path: Path) -> Path:
    """A folder to put on PYTHONPATH, where ``vllm.entrypoints.openai.api_server`` is
    ``fake_engine.py``."""
    root = tmp_path / "fake-vllm"
    module = root / "vllm" / "entrypoints" / "openai" / "api_server.py"
    module.parent.mkdir(parents=True)
    shutil.copy(FAKE_ENGINE, module)
    return root


@pytest.fixture
def fake_env(fake_vllm: Path, records: Path) -> dict[str, str]:
    """Environment that makes the supervisor's real command line run the fake engine."""
    return {"PYTHONPATH": str(fake_vllm), "FAKE_ENGINE_DIR": str(records)}


@pytest.fixture
def make_spec(tmp_path: Path, fake_env: dict[str, str]) -> SpecFactory:
    """Build an EngineSpec whose ``python -m vllm...`` runs ``fake_engine.py``.

    Keyword arguments become ``FAKE_ENGINE_<NAME>`` variables (see fake_engine.py).
    """

    def factory(**fake_settings: str) -> EngineSpec:
        env = dict(fake_env)
        env.update({f"FAKE_ENGINE_{key.upper()}": value for key, value in fake_settings.items()})
        return EngineSpec(
            python=Path(sys.executable),
            model="fake-model",
            served_model_name="fake",
            port=free_port(),
            env=env,
            log_path=tmp_path / "engine.log",
        )

    return factory
