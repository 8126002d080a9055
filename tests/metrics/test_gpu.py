"""NVML telemetry: nothing on a machine without a GPU, correct units with one."""

from __future__ import annotations

import logging

import pytest

from teamgpu.metrics.gpu import GpuSample, NvmlSampler

from .fake_nvml import FakeGpu, FakeNvml, NVMLError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_no_gpu_here_gives_an_empty_list_and_never_raises(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """This machine has no NVIDIA driver: the real pynvml fails to initialise."""
    caplog.set_level(logging.DEBUG, logger="teamgpu.metrics.gpu")
    s = NvmlSampler(cache_s=0)
    assert s.sample() == []
    assert s.sample() == []
    s.close()
    msgs = [r for r in caplog.records if r.name == "teamgpu.metrics.gpu"]
    assert len(msgs) == 1 and msgs[0].levelno == logging.DEBUG
    assert "no GPU telemetry" in msgs[0].getMessage()


def test_readings_and_units_from_nvml() -> None:
    nv = FakeNvml(gpus=[FakeGpu(), FakeGpu(name="NVIDIA A100", uuid="GPU-b", util_percent=99,
                                           mem_used=1000, mem_total=4000, temp_c=80,
                                           power_mw=300_000)])
    samples = NvmlSampler(nvml=nv).sample()
    assert samples == [
        GpuSample(index=0, name="NVIDIA L4", uuid="GPU-00000000-1111-2222-3333-444444444444",
                  utilization_percent=37.0, memory_used_bytes=12 * 1024**3,
                  memory_total_bytes=24 * 1024**3, temperature_c=61.0, power_w=72.5),
        GpuSample(index=1, name="NVIDIA A100", uuid="GPU-b", utilization_percent=99.0,
                  memory_used_bytes=1000, memory_total_bytes=4000, temperature_c=80.0,
                  power_w=300.0),
    ]
    assert samples[0].to_dict()["power_w"] == 72.5


def test_bytes_names_of_old_bindings_are_decoded() -> None:
    s = NvmlSampler(nvml=FakeNvml(bytes_names=True)).sample()[0]
    assert s.name == "NVIDIA L4" and s.uuid is not None and s.uuid.startswith("GPU-")


def test_an_unsupported_field_is_none_and_the_gpu_is_still_reported() -> None:
    s = NvmlSampler(nvml=FakeNvml(gpus=[FakeGpu(power_mw=None)])).sample()
    assert len(s) == 1 and s[0].power_w is None and s[0].temperature_c == 61.0


def test_samples_are_cached_for_one_second() -> None:
    nv, clock = FakeNvml(), Clock()
    s = NvmlSampler(nvml=nv, clock=clock)
    first = s.sample()
    nv.gpus[0].util_percent = 5
    clock.t += 0.5
    assert s.sample() == first and nv.calls["nvmlDeviceGetCount"] == 1
    clock.t += 0.6
    assert s.sample()[0].utilization_percent == 5.0
    assert nv.calls["nvmlDeviceGetCount"] == 2
    assert nv.calls["nvmlInit"] == 1


def test_init_failure_is_retried_only_after_retry_s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="teamgpu.metrics.gpu")
    nv, clock = FakeNvml(init_error=NVMLError("Driver Not Loaded")), Clock()
    s = NvmlSampler(nvml=nv, clock=clock, cache_s=0, retry_s=60)
    assert s.sample() == [] and s.sample() == []
    assert nv.calls["nvmlInit"] == 1
    nv.init_error = None
    clock.t += 61
    assert len(s.sample()) == 1
    assert nv.calls["nvmlInit"] == 2
    assert len([r for r in caplog.records if r.name == "teamgpu.metrics.gpu"]) == 1
    s.close()
    assert nv.calls["nvmlShutdown"] == 1


def test_a_failure_after_init_gives_an_empty_list() -> None:
    nv = FakeNvml()
    s = NvmlSampler(nvml=nv, cache_s=0)
    assert len(s.sample()) == 1

    def broken() -> int:
        raise NVMLError("GPU is lost")

    nv.nvmlDeviceGetCount = broken  # type: ignore[method-assign]
    assert s.sample() == []
