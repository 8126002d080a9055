"""The engine fleet as the gateway sees it: models that start on demand, and engine states
that move the backend pool.

:class:`FleetHost` is what ``teamgpu up`` gives the gateway (the pipeline's
:class:`~teamgpu.api.pipeline.ModelHost`). For a request to a model of the fleet,
:meth:`FleetHost.ensure_ready` starts an on-demand model that is stopped (or asleep) and
waits for it, up to ``model_start_timeout_s`` (the wait counts in the request's TTFT); a
model whose engine crashed and restarts answers 503 with ``Retry-After`` at once.
:meth:`FleetHost.on_state` follows the fleet's engine states: ready puts the model's
backend up (a health poll at once), restarting or failed takes it down, stopped or
sleeping parks it (the pool keeps its model names, so the next request starts it instead
of getting 404).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from teamgpu.engine.errors import ModelStartTimeout, ModelUnavailableError, NoRoomError
from teamgpu.engine.fleet import EngineFleet
from teamgpu.engine.supervisor import EngineState
from teamgpu.errors import ServiceUnavailable
from teamgpu.settings import ModelConfig
from teamgpu.upstream.backends import Backend, BackendPool

__all__ = ["FleetHost", "ModelStarts"]

log = logging.getLogger("teamgpu.engine.host")


@dataclass
class ModelStarts:
    """Starts of one on-demand model by requests, for ``/stats``.

    Attributes:
        count: requests that found the model stopped or asleep and started it.
        last_wait_s: the wait of the last such request, in seconds.
        waiting: requests waiting for a start now.
    """

    count: int = 0
    last_wait_s: float | None = None
    waiting: int = 0


@dataclass(eq=False)
class FleetHost:
    """The fleet behind the gateway.

    Args:
        fleet: the engines.
        pool: the gateway's backends (one per engine, at its base URL); None until the
            gateway is open (states before that move nothing).
        start_timeout_s: the longest a request waits for an on-demand model to start.
        retry_after_s: the ``Retry-After`` of a 503 while a model cannot serve.
        clock: seconds, for the waits reported in ``/stats``.
        models: the model set (which models start on demand).
    """

    fleet: EngineFleet
    pool: BackendPool | None  # the gateway's, once its services are open
    start_timeout_s: float
    retry_after_s: int
    clock: Callable[[], float] = time.monotonic
    models: list[ModelConfig] = field(default_factory=list)
    starts: dict[str, ModelStarts] = field(default_factory=dict)

    def states(self) -> dict[str, str]:
        """Each local model's engine state (``starting``, ``ready``, ``sleeping``,
        ``stopped``, ``restarting``, ``failed``)."""
        return {name: str(state) for name, state in self.fleet.states().items()}

    def starts_json(self) -> dict[str, dict[str, Any]]:
        """Per model started by requests: ``{"count", "last_wait_s", "waiting"}``."""
        return {name: {"count": st.count, "last_wait_s": st.last_wait_s,
                       "waiting": st.waiting} for name, st in self.starts.items()}

    async def ensure_ready(self, served: str) -> None:
        if served not in self.fleet.names():
            return  # a remote model: the pool's health checks decide
        state = self.fleet.state(served)
        if state is EngineState.READY:
            return
        if state in (EngineState.RESTARTING, EngineState.FAILED):
            raise ServiceUnavailable(
                f"the engine serving {served!r} stopped (it is being restarted); try again "
                f"in {self.retry_after_s} s", retry_after_s=self.retry_after_s,
                code="backend_unavailable")
        starts = self.starts.setdefault(served, ModelStarts())
        started = self.clock()
        starts.waiting += 1
        try:
            url = await self.fleet.ensure_ready(served, self.start_timeout_s)
        except ModelStartTimeout:
            raise ServiceUnavailable(
                f"model {served!r} is starting; it was not ready within "
                f"{self.start_timeout_s:g} s: try again shortly",
                retry_after_s=self.retry_after_s, code="model_starting") from None
        except NoRoomError as exc:
            raise ServiceUnavailable(f"model {served!r} cannot start now: {exc}",
                                     retry_after_s=self.retry_after_s,
                                     code="no_room_for_model") from None
        except ModelUnavailableError as exc:
            raise ServiceUnavailable(str(exc), retry_after_s=self.retry_after_s,
                                     code="backend_unavailable") from None
        finally:
            starts.waiting -= 1
        starts.count += 1
        starts.last_wait_s = self.clock() - started
        await self._backend_ready(served, url)

    def begin(self, served: str) -> None:
        if served in self.fleet.names():
            # stopped meanwhile: the request fails on its own (503)
            with contextlib.suppress(ModelUnavailableError):
                self.fleet.begin_request(served)

    def end(self, served: str) -> None:
        if served in self.fleet.names():
            self.fleet.end_request(served)

    def on_state(self, name: str, state: EngineState, message: str) -> None:
        """The fleet's state callback: move the model's backend in the pool."""
        b = self._backend(name)
        if b is None or self.pool is None:
            return
        if state is EngineState.READY:
            self.pool.wake()  # a health poll now puts it up
        elif state in (EngineState.RESTARTING, EngineState.FAILED):
            if b.up:
                self.pool.report_failure(b, message)
        elif state is EngineState.SLEEPING or (
                state is EngineState.STOPPED and self._on_demand(name)):
            b.mark(False, f"{state}: starts on the next request")  # parked, names kept
        elif state is EngineState.STOPPED:
            b.mark(False, "engine stopped")

    def _on_demand(self, name: str) -> bool:
        return any(m.name == name and m.on_demand for m in self.models)

    async def _backend_ready(self, served: str, url: str) -> None:
        b = self._backend(served)
        if b is not None and self.pool is not None:
            if b.url != url:  # started again on another port (its old one was taken)
                b.url = url
            await self.pool.poll(b)

    def _backend(self, name: str) -> Backend | None:
        if self.pool is None:
            return None
        try:
            url = self.fleet.base_url(name)
        except ModelUnavailableError:
            return None
        for b in self.pool.backends:
            if b.url == url or name in b.models:
                return b
        return None

