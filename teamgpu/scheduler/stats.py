"""A snapshot of the scheduler's state, for the metrics exporter and ``/stats``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from teamgpu.scheduler.priority import PriorityClass

__all__ = ["SchedulerStats"]


def _per_class_zero() -> dict[PriorityClass, int]:
    return dict.fromkeys(PriorityClass, 0)


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """Scheduler state at one instant. Plain data: the metrics module exports it.

    Attributes:
        queued: Waiting requests per requested class.
        queued_effective: Waiting requests per effective class (after aging).
        oldest_wait_s: Wait so far of the oldest waiting request per requested class,
            in seconds (0.0 when the class is empty).
        queued_by_user: Waiting requests per user (users with none are left out).
        user_counters: Virtual token counter per user (weighted tokens / user weight),
            for every user seen since start.
        recent_waits_s: Queue waits in seconds of the most recently admitted requests,
            per requested class, oldest first (at most ``recent_waits_max_count`` each).
        admitted_total: Requests admitted since start.
        expired_total: Requests that left the queue on their class's queue timeout.
        removed_total: Requests removed while queued (client disconnected).
        rejected_user_queue_full_total: Pushes rejected with ``UserQueueFull`` (429).
        rejected_queue_full_total: Pushes rejected with ``QueueFull`` (503).
        in_flight: Requests admitted and not yet released (filled by ``Admission``).
        capacity: In-flight slots (filled by ``Admission``).
        engine_held: True when the engine's own load (waiting requests, KV cache) last
            held back the lower classes (filled by ``Admission``).
    """

    queued: dict[PriorityClass, int] = field(default_factory=_per_class_zero)
    queued_effective: dict[PriorityClass, int] = field(default_factory=_per_class_zero)
    oldest_wait_s: dict[PriorityClass, float] = field(
        default_factory=lambda: dict.fromkeys(PriorityClass, 0.0)
    )
    queued_by_user: dict[str, int] = field(default_factory=dict)
    user_counters: dict[str, float] = field(default_factory=dict)
    recent_waits_s: dict[PriorityClass, tuple[float, ...]] = field(
        default_factory=lambda: dict.fromkeys(PriorityClass, ())
    )
    admitted_total: int = 0
    expired_total: int = 0
    removed_total: int = 0
    rejected_user_queue_full_total: int = 0
    rejected_queue_full_total: int = 0
    in_flight: int = 0
    capacity: int = 0
    engine_held: bool = False

    @property
    def queued_total(self) -> int:
        """Waiting requests in all classes."""
        return sum(self.queued.values())

    def wait_quantile_s(self, q: float, priority: PriorityClass | None = None) -> float | None:
        """A quantile of the recent queue waits (nearest-rank).

        Args:
            q: The quantile in [0, 1], e.g. 0.5 for p50, 0.95 for p95.
            priority: One requested class, or None for all classes together.

        Returns:
            The wait in seconds, or None when no request was admitted yet.

        Raises:
            ValueError: When ``q`` is outside [0, 1].
        """
        if not 0 <= q <= 1:
            raise ValueError(f"q={q!r}: must be in [0, 1]")
        if priority is None:
            waits = sorted(w for ws in self.recent_waits_s.values() for w in ws)
        else:
            waits = sorted(self.recent_waits_s.get(priority, ()))
        if not waits:
            return None
        rank = max(1, math.ceil(q * len(waits)))
        return waits[rank - 1]
