"""The in-process limiter, for a single gateway."""

from __future__ import annotations

from teamgpu.limits.base import (
    check_actual,
    check_estimate,
    new_reservation_id,
    refusal,
    status_from_usage,
    wall_clock_us,
)
from teamgpu.limits.models import KeyLimits, LimitStatus, Reservation
from teamgpu.limits.window import KeyState


class MemoryLimiter:
    """:class:`~teamgpu.limits.base.Limiter` with all state in this process.

    Every method runs without awaiting, so on one event loop each call is atomic. Not
    thread-safe: use it from the gateway's event loop only. The clock is the wall clock
    (``time.time()``), because the daily quota follows UTC days.
    """

    def __init__(self) -> None:
        self._keys: dict[str, KeyState] = {}

    @property
    def redis_errors_total(self) -> int:
        """Always 0: no Redis here."""
        return 0

    def _state(self, key_id: str) -> KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = KeyState()
        return state

    async def reserve(
        self, key_id: str, limits: KeyLimits, est_tokens: int, now: float | None = None
    ) -> tuple[Reservation, LimitStatus]:
        """See :meth:`teamgpu.limits.base.Limiter.reserve` (raises RateLimited 429,
        RequestTooLarge 400)."""
        check_estimate(limits, est_tokens)
        now_us = wall_clock_us(now)
        state = self._state(key_id)
        state.prune(now_us)
        waits = state.waits(now_us, limits, est_tokens)
        if not waits.admitted:
            raise refusal(limits, est_tokens, waits, state.usage(now_us))
        rid = new_reservation_id()
        state.admit(now_us, rid, est_tokens)
        reservation = Reservation(
            key_id=key_id,
            tokens=est_tokens,
            reservation_id=rid,
            admitted_at_us=now_us,
            day=state.day,
        )
        return reservation, status_from_usage(limits, state.usage(now_us))

    async def settle(
        self, reservation: Reservation, actual_tokens: int, now: float | None = None
    ) -> None:
        """See :meth:`teamgpu.limits.base.Limiter.settle`."""
        check_actual(actual_tokens)
        if reservation.settled:
            return
        reservation.settled = True
        state = self._state(reservation.key_id)
        state.settle(
            wall_clock_us(now),
            reservation.reservation_id,
            reservation.tokens,
            actual_tokens,
            reservation.day,
        )

    async def status(self, key_id: str, limits: KeyLimits, now: float | None = None) -> LimitStatus:
        """See :meth:`teamgpu.limits.base.Limiter.status`."""
        now_us = wall_clock_us(now)
        state = self._state(key_id)
        state.prune(now_us)
        return status_from_usage(limits, state.usage(now_us))

    async def close(self) -> None:
        """Nothing to release."""
