"""One admitted request's claims on shared capacity, and the one place that gives them back.

An admitted request holds three things that other requests wait for:

- its **limits reservation** (prompt + most output tokens in the key's TPM window and
  daily quota, and a concurrency slot), taken before it queues;
- its **scheduler lease** (an in-flight slot of the model's admission controller),
  taken when the fair queue admits it;
- its **backend slot** (``Backend.in_flight``, which load balancing reads), taken when
  it is sent.

:class:`InFlight` owns all three from admission to the last byte, and
:meth:`InFlight.finish` gives them back, exactly once. Who calls it has one answer: the
:meth:`teamgpu.api.pipeline.Pipeline.admitted` block that created it, when it ends
(answer, error or disconnect), unless the answer is a stream; then the stream relay,
when the stream ends (:meth:`InFlight.hand_to_stream`).
"""

from __future__ import annotations

from collections.abc import Callable

from teamgpu.limits import Reservation
from teamgpu.limits.policy import LimitPolicy
from teamgpu.scheduler import Lease
from teamgpu.upstream.backends import Backend
from teamgpu.upstream.usage import Usage

__all__ = ["InFlight"]


class InFlight:
    """The claims of one admitted request (see the module docstring).

    Args:
        limits: the policy the reservation is settled through.
        reservation: the limits reservation taken at admission.
        lease: the scheduler lease.
        on_finish: called when the claims are given back (the engine host counts the
            model's requests in flight).

    Attributes:
        usage: the usage to settle and charge when the request ends; the pipeline sets
            it from the answer (or the stream's account).
        backend: the backend the request was sent to, while it holds a slot there.
    """

    __slots__ = ("_backend_held", "_charged_output", "_finished", "_limit_floor", "_limits",
                 "_on_finish", "_reservation", "_settled", "_streaming", "backend", "lease",
                 "usage")

    def __init__(self, limits: LimitPolicy, reservation: Reservation, lease: Lease, *,
                 on_finish: Callable[[], None] | None = None) -> None:
        self._limits = limits
        self._on_finish = on_finish
        self._reservation = reservation
        self.lease = lease
        self.backend: Backend | None = None
        self.usage = Usage(0, 0)
        self._backend_held = False
        self._charged_output = 0
        self._limit_floor = 0
        self._settled = False
        self._finished = False
        self._streaming = False

    @property
    def streaming(self) -> bool:
        """A stream relay owns these claims (see :meth:`hand_to_stream`)."""
        return self._streaming

    def use_backend(self, backend: Backend) -> None:
        """Take a slot on ``backend`` (giving back one held on another: failover)."""
        self.release_backend()
        backend.in_flight += 1
        self.backend = backend
        self._backend_held = True

    def release_backend(self) -> None:
        """Give back the backend slot, if one is held (idempotent)."""
        if self._backend_held and self.backend is not None:
            self.backend.in_flight -= 1
        self._backend_held = False

    def abandoned(self, prompt_tokens: int) -> None:
        """The client left after the engine had the prompt: settle at least
        ``prompt_tokens`` against the limits (the tokens it produced are unknown; the
        prompt was processed)."""
        self._limit_floor = max(self._limit_floor, prompt_tokens)

    def charge_output(self, produced_total: int) -> None:
        """Charge output tokens to the user's fair share as they stream (VTC charges
        generated tokens as they are produced; Sheng et al., OSDI 2024).

        Args:
            produced_total: tokens produced so far by this request (a running count).
        """
        if produced_total > self._charged_output:
            self.lease.charge(completion_tokens=produced_total - self._charged_output)
            self._charged_output = produced_total

    def hand_to_stream(self) -> None:
        """From now on the stream relay owns the claims and calls :meth:`finish`."""
        self._streaming = True

    async def settle_limits(self) -> None:
        """Settle the limits reservation at :attr:`usage` now (idempotent). A stream calls
        this just before its last byte, so the client's next request finds its tokens and
        concurrency slot free."""
        if self._settled:
            return
        self._settled = True
        await self._limits.settle(self._reservation, max(self.usage.total, self._limit_floor))

    async def finish(self) -> None:
        """Give everything back, once: the backend slot, the fair-share charge of
        :attr:`usage` (the prompt's excess over the estimate charged at dispatch, and the
        output not yet charged), the lease, and the limits reservation."""
        if self._finished:
            return
        self._finished = True
        self.release_backend()
        self.lease.charge(prompt_tokens=self.usage.prompt_tokens,
                          completion_tokens=max(0, self.usage.completion_tokens
                                                - self._charged_output))
        self.lease.release()
        if self._on_finish is not None:
            self._on_finish()
        await self.settle_limits()
