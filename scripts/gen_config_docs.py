"""Regenerate docs/configuration.md from teamgpu.settings.Settings.

    .venv/bin/python scripts/gen_config_docs.py > docs/configuration.md
"""

from teamgpu.settings import Settings

print("# Configuration\n")
print("Every setting of `teamgpu.settings.Settings`. Sources, later ones winning: defaults,")
print("`teamgpu.toml` (working directory, or the file named by `--config` / `TEAMGPU_CONFIG`),")
print("`TEAMGPU_<NAME>` environment variables (upper case; lists and tables as JSON), and the")
print("command's flags. `teamgpu config show` prints the effective values, secrets masked.")
print("Units are in the names (`_s` seconds, `_ms` milliseconds, `_bytes` bytes).\n")
print("| setting | environment | default | meaning |")
print("|---|---|---|---|")
for name, f in Settings.model_fields.items():
    if f.default_factory is not None:
        d = "(computed)" if name == "data_dir" else repr(f.default_factory())
    else:
        d = repr(f.default)
    desc = (f.description or "").replace("|", "\\|")
    print(f"| `{name}` | `TEAMGPU_{name.upper()}` | `{d}` | {desc} |")
print("\n`data_dir` defaults to `$XDG_DATA_HOME/teamgpu` or `~/.local/share/teamgpu`.")
