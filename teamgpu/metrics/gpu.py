"""GPU telemetry from NVML (``nvidia-ml-py``, imported as ``pynvml``).

:class:`NvmlSampler` reads, per GPU: utilisation (%), memory used and total (bytes),
temperature (degrees Celsius) and power draw (watts). Samples are cached for
``cache_s`` seconds, so a Prometheus scrape, ``/stats`` and the dashboard polling at the
same time cost one NVML read.

Telemetry must never break the gateway: with no NVIDIA driver, no GPU, or an NVML error,
:meth:`NvmlSampler.sample` returns ``[]`` (logged once, at debug level) and never raises.
A field a GPU does not support (power on some boards, for example) is None; the GPU is
still reported.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger("teamgpu.metrics.gpu")

__all__ = ["GpuSample", "NvmlSampler"]


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant.

    Attributes:
        index: NVML device index (0-based).
        name: Product name, e.g. ``NVIDIA L4``.
        uuid: The GPU's UUID (``GPU-...``), stable across reboots, unlike the index.
        utilization_percent: Share of the last sample period in which a kernel ran, 0-100.
        memory_used_bytes: Device memory in use, bytes.
        memory_total_bytes: Device memory installed, bytes.
        temperature_c: Core temperature, degrees Celsius.
        power_w: Power draw, watts.
    """

    index: int
    name: str
    uuid: str | None
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_c: float | None
    power_w: float | None

    def to_dict(self) -> dict[str, Any]:
        """The sample as JSON-able data (the shape ``/stats`` reports under ``gpu``)."""
        return asdict(self)


class NvmlSampler:
    """Samples every GPU through NVML, cached; ``[]`` when there is none.

    Args:
        nvml: The NVML binding (default: ``import pynvml`` on first use). Tests pass a fake
            module with the same functions.
        cache_s: How long a sample is reused, seconds (default 1.0).
        retry_s: After NVML failed to initialise (no driver), how long to wait before
            trying again, seconds (default 60).
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        nvml: ModuleType | Any | None = None,
        cache_s: float = 1.0,
        retry_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._cache_s = cache_s
        self._retry_s = retry_s
        self._clock = clock
        self._initialised = False
        self._next_init_at = -float("inf")
        self._logged = False
        self._cached: list[GpuSample] = []
        self._cached_at = -float("inf")

    def sample(self) -> list[GpuSample]:
        """Every GPU's current readings, or ``[]`` without a GPU or driver. Never raises."""
        now = self._clock()
        if now - self._cached_at < self._cache_s:
            return self._cached
        self._cached = self._read(now)
        self._cached_at = now
        return self._cached

    def close(self) -> None:
        """Shut NVML down if it was initialised. Never raises."""
        if self._initialised and self._nvml is not None:
            with contextlib.suppress(Exception):  # telemetry never breaks shutdown
                self._nvml.nvmlShutdown()
        self._initialised = False

    # ------------------------------------------------------------------ internals

    def _read(self, now: float) -> list[GpuSample]:
        if not self._initialised and not self._init(now):
            return []
        nv = self._nvml
        assert nv is not None
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001 -- any NVML failure: no GPU data
            self._note(f"NVML device count failed: {exc!r}")
            return []
        out = []
        for i in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception as exc:  # noqa: BLE001 -- that GPU is skipped, the others read
                self._note(f"NVML handle of GPU {i} failed: {exc!r}")
                continue
            out.append(self._device(nv, i, handle))
        return out

    def _init(self, now: float) -> bool:
        if now < self._next_init_at:
            return False
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 -- ImportError, NVMLError_LibraryNotFound...
            self._next_init_at = now + self._retry_s
            self._note(f"no GPU telemetry (NVML unavailable: {exc!r})")
            return False
        self._initialised = True
        return True

    def _note(self, message: str) -> None:
        """Log the first failure at debug level, then stay quiet."""
        if not self._logged:
            self._logged = True
            log.debug(message)

    @staticmethod
    def _device(nv: Any, index: int, handle: Any) -> GpuSample:
        def field(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:  # noqa: BLE001 -- an unsupported field is None
                return None

        name = field(lambda: _text(nv.nvmlDeviceGetName(handle))) or f"GPU {index}"
        uuid = field(lambda: _text(nv.nvmlDeviceGetUUID(handle)))
        util = field(lambda: float(nv.nvmlDeviceGetUtilizationRates(handle).gpu))
        mem = field(lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        temp_sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        temp = field(lambda: float(nv.nvmlDeviceGetTemperature(handle, temp_sensor)))
        power_mw = field(lambda: float(nv.nvmlDeviceGetPowerUsage(handle)))
        return GpuSample(
            index=index,
            name=name,
            uuid=uuid,
            utilization_percent=util,
            memory_used_bytes=int(mem.used) if mem is not None else None,
            memory_total_bytes=int(mem.total) if mem is not None else None,
            temperature_c=temp,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
        )


def _text(value: Any) -> str:
    """NVML strings are ``bytes`` in old bindings and ``str`` in new ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
