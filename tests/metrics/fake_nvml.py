"""A stand-in for the ``pynvml`` module (``nvidia-ml-py``), for tests without a GPU.

It implements exactly the functions :class:`teamgpu.metrics.gpu.NvmlSampler` calls, with
the units and types the real binding returns: memory in bytes, power in milliwatts,
names as ``str`` (``bytes`` in old bindings: ``bytes_names=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    """Like ``pynvml.NVMLError``."""


@dataclass
class FakeGpu:
    name: str = "NVIDIA L4"
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    util_percent: int = 37
    mem_used: int = 12 * 1024**3
    mem_total: int = 24 * 1024**3
    temp_c: int = 61
    power_mw: int | None = 72_500  # None: "not supported"


@dataclass
class FakeNvml:
    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    init_error: Exception | None = None
    bytes_names: bool = False
    calls: dict[str, int] = field(default_factory=dict)
    NVML_TEMPERATURE_GPU: int = NVML_TEMPERATURE_GPU

    def _count(self, fn: str) -> None:
        self.calls[fn] = self.calls.get(fn, 0) + 1

    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._count("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: FakeGpu) -> Any:
        return h.name.encode() if self.bytes_names else h.name

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> Any:
        return h.uuid.encode() if self.bytes_names else h.uuid

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        return SimpleNamespace(gpu=h.util_percent, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(used=h.mem_used, total=h.mem_total,
                               free=h.mem_total - h.mem_used)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return h.temp_c

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        if h.power_mw is None:
            raise NVMLError("Not Supported")
        return h.power_mw
