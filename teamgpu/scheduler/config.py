"""Settings of the fair queue and the admission controller."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from teamgpu.scheduler.errors import SchedulerConfigError
from teamgpu.scheduler.priority import PriorityClass

__all__ = ["FairQueueConfig", "default_queue_timeouts_s"]


def default_queue_timeouts_s() -> dict[PriorityClass, float]:
    """Default per-class queue timeouts: high 60 s, normal 300 s, low 3600 s."""
    return {PriorityClass.HIGH: 60.0, PriorityClass.NORMAL: 300.0, PriorityClass.LOW: 3600.0}


@dataclass(frozen=True, slots=True)
class FairQueueConfig:
    """Settings of the fair queue (``FairQueue``) and its async shell (``Admission``).

    Every field is validated when the object is built; a bad value raises
    ``SchedulerConfigError`` naming the field and the value.

    Attributes:
        input_token_weight: Cost of one prompt token in the Virtual Token Counter (w_p in
            Sheng et al., OSDI 2024). Default 1.0; >= 0.
        output_token_weight: Cost of one generated token (w_q). Default 2.0; >= 0, and
            the two weights may not both be 0.
        aging_s: A waiting request is promoted one class for every ``aging_s`` seconds it
            has waited, so a ``low`` request competes as ``normal`` after ``aging_s`` and
            as ``high`` after ``2 * aging_s``. Promotion changes the order only: headroom
            and the engine hold-back follow the requested class, so an aged ``low``
            request still starts only while ``in_flight < capacity -
            reserved_slots_high - reserved_slots_normal``. Starvation bound: after
            ``2 * aging_s`` a ``low`` request is in the top class, where no class can
            overtake it; it starts at the first decision with a non-reserved slot free
            and the engine not saturated at which its user has the smallest counter
            there. That happens within ``2 * aging_s`` plus the longest remaining batch
            request, provided interactive requests (``high``, ``normal``) alone never fill
            the non-reserved slots, the engine is not saturated and its user's counter is
            the smallest; users with smaller counters go first by at most their counter
            gap plus one request's prompt cost each (charged at dispatch); if interactive
            requests alone keep every non-reserved slot busy, ``low`` requests do not
            start at all (docs/scheduler.md, "Aging and the starvation bound").
            Default 30.0 s; > 0; ``math.inf`` disables aging (and the bound).
        max_queued_per_user: Most requests one user may have waiting; one more is
            rejected with ``UserQueueFull`` (429). Default 256; >= 1.
        max_queued_total: Most requests waiting in all; one more is rejected with
            ``QueueFull`` (503). Default 4096; >= 1.
        queue_timeout_s: Longest wait per requested class, in seconds; past it the
            request leaves the queue with ``QueueTimeout`` (503). Default high 60,
            normal 300, low 3600; every class must be present, each > 0 (``math.inf``
            for no timeout).
        reserved_slots_high: In-flight slots only requests requested ``high`` may use:
            ``normal`` is admitted only while ``in_flight < capacity -
            reserved_slots_high``, however long it has waited. Default 2; >= 0.
        reserved_slots_normal: Further slots only requests requested ``normal`` and
            ``high`` may use: ``low`` is admitted only while
            ``in_flight < capacity - reserved_slots_high - reserved_slots_normal``,
            aged or not. Default 1; >= 0. The capacity must leave ``low`` at least one
            slot.
        kv_cache_high_watermark: Engine KV-cache usage (fraction 0..1, vLLM's
            ``vllm:kv_cache_usage_perc``) at or above which only requests requested
            ``high`` are admitted (aged ones included in the hold-back).
            Default 0.95; in (0, 1].
        engine_load_recheck_ms: While requests wait and the engine's load holds them
            back, re-check the load this often. Default 50 ms; > 0.
        position_report_interval_s: Shortest interval between two queue-position
            reports to one waiting request. Default 1.0 s; > 0.
        recent_waits_max_count: How many waits of recently admitted requests are kept
            per class for the p50/p95 in ``SchedulerStats``. Default 1024; >= 1.
        retry_after_max_s: Upper bound of the ``Retry-After`` hint in seconds.
            Default 60; >= 1.
    """

    input_token_weight: float = 1.0
    output_token_weight: float = 2.0
    aging_s: float = 30.0
    max_queued_per_user: int = 256
    max_queued_total: int = 4096
    queue_timeout_s: dict[PriorityClass, float] = field(default_factory=default_queue_timeouts_s)
    reserved_slots_high: int = 2
    reserved_slots_normal: int = 1
    kv_cache_high_watermark: float = 0.95
    engine_load_recheck_ms: float = 50.0
    position_report_interval_s: float = 1.0
    recent_waits_max_count: int = 1024
    retry_after_max_s: int = 60

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> SchedulerConfigError:
            return SchedulerConfigError(f"{name}={getattr(self, name)!r}: must be {rule}")

        if not (self.input_token_weight >= 0 and math.isfinite(self.input_token_weight)):
            raise bad("input_token_weight", "a finite number >= 0")
        if not (self.output_token_weight >= 0 and math.isfinite(self.output_token_weight)):
            raise bad("output_token_weight", "a finite number >= 0")
        if self.input_token_weight == 0 and self.output_token_weight == 0:
            raise SchedulerConfigError(
                "input_token_weight=0 and output_token_weight=0: at least one must be > 0"
            )
        if not self.aging_s > 0:
            raise bad("aging_s", "> 0 (math.inf disables aging)")
        for name in ("max_queued_per_user", "max_queued_total", "recent_waits_max_count",
                     "retry_after_max_s"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise bad(name, "an int >= 1")
        for name in ("reserved_slots_high", "reserved_slots_normal"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise bad(name, "an int >= 0")
        if not 0 < self.kv_cache_high_watermark <= 1:
            raise bad("kv_cache_high_watermark", "in (0, 1]")
        if not (self.engine_load_recheck_ms > 0 and math.isfinite(self.engine_load_recheck_ms)):
            raise bad("engine_load_recheck_ms", "a finite number > 0")
        if not (self.position_report_interval_s > 0
                and math.isfinite(self.position_report_interval_s)):
            raise bad("position_report_interval_s", "a finite number > 0")
        try:
            timeouts = {PriorityClass(k): float(v) for k, v in self.queue_timeout_s.items()}
        except (ValueError, TypeError) as exc:
            raise bad("queue_timeout_s", "a mapping of priority class to seconds") from exc
        missing = [c.name.lower() for c in PriorityClass if c not in timeouts]
        if missing:
            raise bad("queue_timeout_s", f"given for every class (missing: {missing})")
        if not all(t > 0 for t in timeouts.values()):
            raise bad("queue_timeout_s", "> 0 for every class (math.inf for none)")
        object.__setattr__(self, "queue_timeout_s", timeouts)

    @property
    def reserved_slots_total(self) -> int:
        """Slots ``low`` may never use: ``reserved_slots_high + reserved_slots_normal``."""
        return self.reserved_slots_high + self.reserved_slots_normal

    def check_capacity(self, capacity: int) -> None:
        """Check that ``capacity`` in-flight slots leave ``low`` at least one slot.

        Args:
            capacity: In-flight slots (e.g. vLLM's ``--max-num-seqs``).

        Raises:
            SchedulerConfigError: When ``capacity < 1`` or
                ``capacity - reserved_slots_high - reserved_slots_normal < 1``.
        """
        if not isinstance(capacity, int) or capacity < 1:
            raise SchedulerConfigError(f"capacity={capacity!r}: must be an int >= 1")
        if capacity - self.reserved_slots_total < 1:
            raise SchedulerConfigError(
                f"capacity={capacity} with reserved_slots_high={self.reserved_slots_high} and "
                f"reserved_slots_normal={self.reserved_slots_normal} leaves no slot for low: "
                "capacity must exceed the sum of the reserves"
            )

    def admission_limit(self, priority: PriorityClass, capacity: int) -> int:
        """In-flight count below which a request of class ``priority`` may start.

        Args:
            priority: The request's requested class (after the key's ceiling). Aging does
                not change it: an aged request keeps its requested class's headroom.
            capacity: In-flight slots.

        Returns:
            ``capacity`` for high, ``capacity - reserved_slots_high`` for normal,
            ``capacity - reserved_slots_high - reserved_slots_normal`` for low.
        """
        if priority is PriorityClass.HIGH:
            return capacity
        if priority is PriorityClass.NORMAL:
            return capacity - self.reserved_slots_high
        return capacity - self.reserved_slots_total

    def effective_priority(self, requested: PriorityClass, waited_s: float) -> PriorityClass:
        """The class a request competes in after waiting ``waited_s`` seconds.

        One class better per full ``aging_s`` waited, never above HIGH.
        """
        levels = 0
        while levels < requested and waited_s >= (levels + 1) * self.aging_s:
            levels += 1
        return requested.promoted(levels)
