"""Every setting has a description and a row in docs/configuration.md (datasette's habit:
an undocumented setting fails the build)."""

from pathlib import Path

import pytest

from teamgpu.settings import ModelConfig, Settings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_setting_is_documented(name: str) -> None:
    field = Settings.model_fields[name]
    assert field.description, f"setting {name} has no description"
    assert f"| `{name}` | `TEAMGPU_{name.upper()}` |" in DOC, (
        f"{name} missing from docs/configuration.md: run scripts/gen_config_docs.py")


@pytest.mark.parametrize("name", list(ModelConfig.model_fields))
def test_model_set_field_is_documented(name: str) -> None:
    """The fields of a [[models]] table have their own section (gen_config_docs.py writes
    only the Settings table; keep that section when regenerating)."""
    field = ModelConfig.model_fields[name]
    assert field.description, f"model field {name} has no description"
    section = DOC[DOC.index("## The model set: `[[models]]`"):]
    assert f"| `{name}` |" in section and field.description in section, (
        f"model field {name} missing from the [[models]] section of docs/configuration.md")
