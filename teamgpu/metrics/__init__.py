"""Observability: Prometheus export, GPU telemetry (NVML), TTFT window, usage reports.

Only :mod:`teamgpu.metrics.prometheus` imports ``prometheus_client``. See
docs/observability.md.
"""

from teamgpu.metrics.gpu import GpuSample, NvmlSampler
from teamgpu.metrics.prometheus import GatewayMetrics
from teamgpu.metrics.ttft import MinutePoint, TtftSummary, TtftWindow
from teamgpu.metrics.usage_report import UsageGroup, parse_since, usage_report

__all__ = [
    "GatewayMetrics",
    "GpuSample",
    "MinutePoint",
    "NvmlSampler",
    "TtftSummary",
    "TtftWindow",
    "UsageGroup",
    "parse_since",
    "usage_report",
]
