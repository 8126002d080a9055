"""The gateway's Dockerfile and .dockerignore, checked statically (no Docker engine here):
multi-stage, slim pinned base, non-root user, a health check, every COPY source present,
no secret in build arguments or environment, and a build context without secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def args() -> dict[str, str]:
    return {k: v for ins, rest in instructions() if ins == "ARG" and "=" in rest
            for k, _, v in [rest.partition("=")]}


def test_multi_stage_with_a_slim_pinned_base() -> None:
    froms = [rest for ins, rest in instructions() if ins == "FROM"]
    assert len(froms) >= 2
    assert all(re.search(r"\bAS\s+\w+", f, re.IGNORECASE) for f in froms)
    base = args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    assert ":latest" not in DOCKERFILE.read_text()
    final = stages()[-1]
    assert any(ins == "COPY" and rest.startswith("--from=build") for ins, rest in final)
    # nothing but the venv comes from the build stage: no compiler, no sources
    assert not any(ins == "COPY" and not rest.startswith("--from=") for ins, rest in final)


def test_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # and the user exists: made in the same stage
    assert any(ins == "RUN" and "useradd" in rest and user in rest for ins, rest in final)
    assert [ins for ins, _ in final].index("USER") > [ins for ins, _ in final].index("RUN")


def test_health_check_and_entrypoint() -> None:
    final = dict(stages()[-1])
    assert "/healthz" in final["HEALTHCHECK"] and "--interval" in final["HEALTHCHECK"]
    assert final["ENTRYPOINT"] == '["teamgpu"]'
    assert final["CMD"].startswith('["serve"')
    assert "8080" in final["EXPOSE"]


def test_copy_sources_exist() -> None:
    for ins, rest in instructions():
        if ins != "COPY" or rest.startswith("--from="):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert (REPO / src).exists(), src


def test_no_secret_in_build_args_or_env() -> None:
    secret = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY|HF_", re.IGNORECASE)
    for ins, rest in instructions():
        if ins in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]
            assert not any(secret.search(n) for n in names), rest
    assert "--mount=type=secret" not in DOCKERFILE.read_text()  # none is needed at all


@pytest.mark.parametrize("pattern", [".env", "**/.env", ".git", ".venv", "deploy", "tests",
                                     "*.db", "teamgpu.toml"])
def test_dockerignore_keeps_secrets_and_clutter_out(pattern: str) -> None:
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert pattern in lines


def test_package_files_the_image_needs_are_not_ignored() -> None:
    lines = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "teamgpu"):
        assert needed not in lines
