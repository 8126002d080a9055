"""The scheduler: priority classes, VTC fair share and work-conserving admission.

``FairQueue`` is the pure, synchronous data structure (it takes ``now``); ``Admission``
is the async shell the gateway awaits; ``EngineLoadPoller`` scrapes vLLM's ``/metrics``.
See docs/scheduler.md.
"""

from teamgpu.scheduler.admission import Admission, Lease
from teamgpu.scheduler.config import FairQueueConfig
from teamgpu.scheduler.engine_load import (
    EngineLoad,
    EngineLoadPoller,
    fetch_engine_load,
    parse_engine_load,
)
from teamgpu.scheduler.errors import (
    InvalidPriority,
    QueueFull,
    QueueTimeout,
    SchedulerConfigError,
    SchedulerError,
    UserQueueFull,
)
from teamgpu.scheduler.fair_queue import FairQueue, QueuedRequest, VirtualCounters
from teamgpu.scheduler.priority import PriorityClass
from teamgpu.scheduler.stats import SchedulerStats

__all__ = [
    "Admission",
    "EngineLoad",
    "EngineLoadPoller",
    "FairQueue",
    "FairQueueConfig",
    "InvalidPriority",
    "Lease",
    "PriorityClass",
    "QueueFull",
    "QueueTimeout",
    "QueuedRequest",
    "SchedulerConfigError",
    "SchedulerError",
    "SchedulerStats",
    "UserQueueFull",
    "VirtualCounters",
    "fetch_engine_load",
    "parse_engine_load",
]
