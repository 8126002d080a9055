"""Fixtures for the scheduler tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from teamgpu.scheduler import FairQueueConfig, PriorityClass, QueuedRequest

MakeRequest = Callable[..., QueuedRequest]


@pytest.fixture
def make_req() -> MakeRequest:
    """Build requests with unique ids: ``make_req("alice", "low", est_prompt_tokens=10)``."""
    serial = itertools.count(1)

    def make(
        user: str,
        priority: PriorityClass | str = PriorityClass.NORMAL,
        *,
        request_id: str | None = None,
        weight: float = 1.0,
        est_prompt_tokens: int = 0,
        est_output_tokens: int = 0,
    ) -> QueuedRequest:
        return QueuedRequest(
            request_id=request_id or f"{user}-{next(serial)}",
            user=user,
            priority=PriorityClass.parse(priority) if isinstance(priority, str) else priority,
            weight=weight,
            est_prompt_tokens=est_prompt_tokens,
            est_output_tokens=est_output_tokens,
        )

    return make


def _plain_config(**overrides: object) -> FairQueueConfig:
    values: dict[str, object] = {
        "reserved_slots_high": 0,
        "reserved_slots_normal": 0,
        "aging_s": math.inf,
        "queue_timeout_s": dict.fromkeys(PriorityClass, math.inf),
    }
    values.update(overrides)
    return FairQueueConfig(**values)  # type: ignore[arg-type]


@pytest.fixture
def plain_config() -> Callable[..., FairQueueConfig]:
    """No reserve, no aging, no timeouts unless overridden: isolates one behaviour."""
    return _plain_config
