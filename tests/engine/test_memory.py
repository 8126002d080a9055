"""The memory plan: GPU fractions and CPU bytes, checked before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from teamgpu.engine.errors import MemoryPlanError
from teamgpu.engine.memory import (
    CPU_ENGINE_OVERHEAD_BYTES,
    CPU_RESERVE_BYTES,
    GiB,
    estimate_weight_bytes,
    mem_available_bytes,
    plan_memory,
)
from teamgpu.settings import ModelConfig

ENGINE = CPU_ENGINE_OVERHEAD_BYTES


def m(name: str, model: str | None = None, **fields: Any) -> ModelConfig:
    return ModelConfig(name=name, model=model or f"/nonexistent/{name}", **fields)


# --- GPU ----------------------------------------------------------------------------


def test_gpu_fractions_that_sum_above_the_bound_are_refused_naming_each() -> None:
    with pytest.raises(MemoryPlanError) as caught:
        plan_memory([m("coder", gpu_memory_utilization=0.6),
                     m("chat", gpu_memory_utilization=0.4)], "cuda")
    message = str(caught.value)
    assert "do not fit on the GPU" in message
    assert "coder  0.60 of the GPU" in message and "chat   0.40 of the GPU" in message
    assert "total 1.00 of the GPU; at most 0.95" in message
    assert "Lower gpu_memory_utilization" in message


def test_gpu_models_without_a_fraction_share_what_is_left() -> None:
    plan = plan_memory([m("a", gpu_memory_utilization=0.5), m("b"), m("c"),
                        ModelConfig(name="far", backends=["http://h:1"])], "cuda")
    assert {n: s.gpu_fraction for n, s in plan.shares.items()} == {"a": 0.5, "b": 0.2, "c": 0.2}


def test_gpu_fractions_that_leave_nothing_for_the_others_are_refused() -> None:
    with pytest.raises(MemoryPlanError, match=r"nothing is left of 0\.90 for b: give them"):
        plan_memory([m("a", gpu_memory_utilization=0.9), m("b")], "cuda")


def test_on_demand_models_count_when_they_would_start() -> None:
    # 0.5 + 0.4 + 0.4 > 0.95, but the on-demand models need not be awake together.
    plan = plan_memory([m("main", gpu_memory_utilization=0.5),
                        m("b", gpu_memory_utilization=0.4, on_demand=True),
                        m("c", gpu_memory_utilization=0.4, on_demand=True)], "cuda")
    assert plan.always_on() == ["main"]
    assert plan.fits(["main", "b"]) and not plan.fits(["main", "b", "c"])
    assert plan.fits(["main", "c"], sleeping=["b"])  # 0.5 + 0.4 + 0.05
    assert not plan.fits(["main", "c"], sleeping=["b", "x"])


def test_an_on_demand_model_that_could_never_start_is_refused() -> None:
    with pytest.raises(MemoryPlanError, match=r"on-demand model 'big' could never start"):
        plan_memory([m("main", gpu_memory_utilization=0.5),
                     m("big", gpu_memory_utilization=0.6, on_demand=True)], "cuda")


# --- CPU ----------------------------------------------------------------------------


def test_cpu_shares_are_kv_cache_plus_weights_plus_engine_overhead(tmp_path: Path) -> None:
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    plan = plan_memory([m("chat", model=str(folder), kv_cache_gib=2),
                        m("minilm", roles=["embed"]), m("other")], "cpu",
                       mem_available=100 * GiB)
    chat, minilm, other = plan.shares.values()
    assert chat.cpu_bytes == 2 * GiB + 1000 + ENGINE
    assert minilm.kv_cache_gib == 0 and minilm.cpu_bytes == ENGINE  # pooling: no KV cache
    assert other.kv_cache_gib == 1 and other.weight_bytes == 0  # no folder: unknown weights
    assert plan.budget == 100 * GiB - CPU_RESERVE_BYTES


def test_a_cpu_set_larger_than_mem_available_is_refused_naming_each_share() -> None:
    with pytest.raises(MemoryPlanError) as caught:
        plan_memory([m("a", kv_cache_gib=4), m("b", kv_cache_gib=4)], "cpu",
                    mem_available=lambda: 10 * GiB)
    message = str(caught.value)
    assert "do not fit in the CPU's memory" in message
    assert "a  5.75 GiB = KV cache 4 GiB + weights unknown + engine 1.75 GiB" in message
    assert "total 11.50 GiB; available 9.00 GiB" in message
    assert "Lower kv_cache_gib" in message


def test_cpu_fits_also_checks_what_is_free_now() -> None:
    plan = plan_memory([m("a", on_demand=True)], "cpu", mem_available=100 * GiB)
    assert plan.fits(["a"], new="a", mem_available=10 * GiB)
    assert not plan.fits(["a"], new="a", mem_available=3 * GiB)  # 2.75 GiB + 1 GiB kept


def test_mem_available_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert mem_available_bytes(meminfo) == 20000000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    with pytest.raises(MemoryPlanError, match="no MemAvailable"):
        mem_available_bytes(meminfo)
    assert mem_available_bytes() > 0  # this machine's


# --- weights ------------------------------------------------------------------------


def model_folder(tmp_path: Path, dtype: str | None, files: dict[str, int]) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"torch_dtype": dtype} if dtype else {}))
    for name, size in files.items():
        (folder / name).write_bytes(b"\0" * size)
    return folder


def test_weights_are_the_safetensors_files(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "bfloat16", {"model-00001.safetensors": 300,
                                                 "model-00002.safetensors": 200,
                                                 "pytorch_model.bin": 999, "tokenizer.json": 50})
    assert estimate_weight_bytes(str(folder)) == 500
    assert estimate_weight_bytes(str(folder), ["--dtype", "float32"]) == 1000  # widened
    assert estimate_weight_bytes(str(folder), ["--dtype=bfloat16"]) == 500
    assert estimate_weight_bytes("Qwen/Qwen2.5-7B-Instruct") == 0


def test_weights_fall_back_to_other_formats(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "float32", {"pytorch_model.bin": 800})
    assert estimate_weight_bytes(str(folder), ["--dtype", "half"]) == 400


def test_the_demo_chat_model_is_planned_as_float32_on_the_cpu() -> None:
    """The demo model's files are bf16 and it is served as float32 (teamgpu.engine.demo)."""
    demo = Path.home() / ".cache" / "teamgpu" / "models" / "SmolLM2-135M-Instruct"
    if not (demo / "model.safetensors").is_file():
        pytest.skip("demo model not prepared")
    size = (demo / "model.safetensors").stat().st_size
    assert estimate_weight_bytes(str(demo), ["--dtype", "float32"]) == 2 * size
