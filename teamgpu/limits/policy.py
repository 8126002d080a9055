"""The team's limit policy: each key's limits (its own, else the team's defaults) applied
through the limiter (in process, or in Redis shared by replicas). See docs/limits.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from teamgpu.errors import TooManyRequests
from teamgpu.limits.base import Limiter
from teamgpu.limits.errors import LimiterUnavailable
from teamgpu.limits.models import KeyLimits, LimitStatus, Reservation

__all__ = ["KeyWithLimits", "LimitPolicy"]


class KeyWithLimits(Protocol):
    """What the policy reads of a key (a :class:`teamgpu.auth.keys.Principal`): its id,
    user and own limits (None: the team's default; 0: unlimited)."""

    @property
    def key_id(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_concurrent(self) -> int | None: ...
    @property
    def daily_tokens(self) -> int | None: ...


class LimitPolicy:
    """Limits per key, reserved at admission and settled at the end of a request.

    Args:
        limiter: where the limit state lives.
        defaults: the team's default limits (0 = unlimited), for keys without their own.
        on_refused: called as ``on_refused(user, limit)`` for each refusal (a metric).
    """

    def __init__(self, limiter: Limiter, defaults: KeyLimits, *,
                 on_refused: Callable[[str, str], None]) -> None:
        self.limiter = limiter
        self.defaults = defaults
        self._on_refused = on_refused

    def for_key(self, p: KeyWithLimits) -> KeyLimits:
        """The key's limits, the team's defaults where the key has none (0 = unlimited)."""
        d = self.defaults
        return KeyLimits(
            rpm=d.rpm if p.rpm is None else p.rpm,
            tpm=d.tpm if p.tpm is None else p.tpm,
            max_concurrent=d.max_concurrent if p.max_concurrent is None else p.max_concurrent,
            daily_tokens=d.daily_tokens if p.daily_tokens is None else p.daily_tokens,
        )

    async def reserve(self, p: KeyWithLimits, limits: KeyLimits, est_tokens: int
                      ) -> tuple[Reservation, LimitStatus]:
        """Reserve one request of ``est_tokens`` (prompt + most output tokens) against
        every limit of the key at once.

        Raises:
            RateLimited: 429 with Retry-After, a limit refuses now.
            RequestTooLarge: 400, the estimate alone exceeds the TPM or daily quota.
            LimiterUnavailable: 503, Redis is down and the limiter fails closed.
        """
        try:
            return await self.limiter.reserve(p.key_id, limits, est_tokens)
        except TooManyRequests as exc:
            self._on_refused(p.user, getattr(exc, "limit", "unknown"))
            raise

    async def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Replace the estimate by the tokens really used (idempotent; never raises)."""
        await self.limiter.settle(reservation, actual_tokens)

    async def headers(self, p: KeyWithLimits) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers of the key's standing, for answers refused
        before admission; ``{}`` without RPM and TPM or when the limit state cannot be read
        (Redis down and failing closed)."""
        limits = self.for_key(p)
        if not (limits.rpm or limits.tpm):
            return {}
        try:
            st = await self.limiter.status(p.key_id, limits)
        except LimiterUnavailable:
            return {}
        return st.headers()
