"""Every setting has a description and a row in docs/configuration.md (datasette's habit:
an undocumented setting fails the build)."""

from pathlib import Path

import pytest

from teamgpu.settings import Settings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_setting_is_documented(name: str) -> None:
    field = Settings.model_fields[name]
    assert field.description, f"setting {name} has no description"
    assert f"| `{name}` | `TEAMGPU_{name.upper()}` |" in DOC, (
        f"{name} missing from docs/configuration.md: run scripts/gen_config_docs.py")
