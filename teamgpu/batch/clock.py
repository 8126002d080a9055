"""Time for the batch runner: a real clock, and a fake one tests move by hand.

The runner reads the time (Unix seconds) and waits for "an event, or a deadline" only
through a :class:`Clock`, so expiry at ``created_at + completion_window``, pauses for
``retry_after_s`` and lease renewals are tested without real waits (the tests' fake
clock is ``tests.batch.fakes.FakeClock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Now, in Unix seconds."""
        ...

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> None:
        """Return when ``event`` is set or ``timeout_s`` (clock seconds) has passed,
        whichever comes first; ``None`` waits for the event alone."""
        ...


class SystemClock:
    """Wall-clock time and asyncio's timers."""

    def time(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> None:
        if timeout_s is not None and timeout_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
