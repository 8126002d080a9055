"""build_command and free_port: the vLLM command line, without running anything."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from teamgpu.engine.errors import EngineConfigError
from teamgpu.engine.supervisor import EngineSpec, build_command, free_port

PYTHON = Path("/venv/bin/python")


def spec(*args: str, device: str = "cpu") -> EngineSpec:
    return EngineSpec(python=PYTHON, model="/models/demo", served_model_name="demo",
                      port=8123, args=args, device=device)


def value_of(command: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``, in order (argparse keeps the last one)."""
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


def test_command_runs_the_openai_server_module_on_loopback() -> None:
    command = build_command(spec())
    assert command[:3] == [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server"]
    assert value_of(command, "--model") == ["/models/demo"]
    assert value_of(command, "--host") == ["127.0.0.1"]
    assert value_of(command, "--port") == ["8123"]
    assert value_of(command, "--served-model-name") == ["demo"]
    assert value_of(command, "--scheduling-policy") == ["priority"]


def test_cpu_defaults_context_and_batch() -> None:
    command = build_command(spec())
    assert value_of(command, "--max-model-len") == ["2048"]
    assert value_of(command, "--max-num-seqs") == ["16"]


def test_cuda_keeps_vllm_defaults_but_priority_scheduling() -> None:
    command = build_command(spec(device="cuda"))
    assert "--max-model-len" not in command
    assert "--max-num-seqs" not in command
    assert value_of(command, "--scheduling-policy") == ["priority"]


@pytest.mark.parametrize(
    "args",
    [
        ("--max-num-seqs", "32"),
        ("--max-num-seqs=32",),
        ("--max_num_seqs", "32"),
    ],
)
def test_args_override_a_default_instead_of_repeating_it(args: tuple[str, ...]) -> None:
    command = build_command(spec(*args))
    assert "16" not in value_of(command, "--max-num-seqs")
    assert command[-len(args):] == list(args)
    assert value_of(command, "--max-model-len") == ["2048"]


def test_args_can_choose_another_scheduling_policy() -> None:
    command = build_command(spec("--scheduling-policy", "fcfs"))
    assert value_of(command, "--scheduling-policy") == ["fcfs"]


def test_extra_args_come_last_verbatim() -> None:
    command = build_command(spec("--enforce-eager", "--dtype", "bfloat16"))
    assert command[-3:] == ["--enforce-eager", "--dtype", "bfloat16"]


@pytest.mark.parametrize("flag", ["--port", "--host=0.0.0.0", "--model", "--served_model_name"])
def test_args_may_not_set_flags_the_supervisor_owns(flag: str) -> None:
    with pytest.raises(EngineConfigError, match="may not set"):
        build_command(spec(flag, "x"))


def test_unknown_device_is_refused() -> None:
    with pytest.raises(EngineConfigError, match="device"):
        build_command(spec(device="tpu"))


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_cpu_runs_eager_unless_told_otherwise(tmp_path: Path) -> None:
    """vLLM 0.32 CPU's compiled graphs gave the demo model wrong greedy answers; the CPU
    default is eager mode, and either spelling of the flag in the args wins."""
    base: dict[str, Any] = {"python": tmp_path / "python", "model": "m",
                            "served_model_name": "m", "port": 8000}
    assert "--enforce-eager" in build_command(EngineSpec(**base))
    compiled = build_command(EngineSpec(**base, args=("--no-enforce-eager",)))
    assert "--enforce-eager" not in compiled and "--no-enforce-eager" in compiled
    eager = build_command(EngineSpec(**base, args=("--enforce-eager",)))
    assert eager.count("--enforce-eager") == 1
    assert "--enforce-eager" not in build_command(EngineSpec(**base, device="cuda"))
