"""DisconnectGuard: one watcher per request interrupts only the awaits it guards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from teamgpu.api.guard import ClientDisconnected, DisconnectGuard


class FakeRequest:
    """An ASGI receive channel whose disconnect the test triggers."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_disconnect_while_guarded_cancels_the_await_and_raises() -> None:
    req = FakeRequest()
    guard = DisconnectGuard(req)  # type: ignore[arg-type]
    inner_cancelled = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            inner_cancelled.set()
            raise
        return "never"

    async def handler() -> str:
        try:
            await guard.run(slow())
        except ClientDisconnected:
            # the task is usable again: later awaits (audit row, settle) are not cancelled
            await asyncio.sleep(0.01)
            return "disconnected"
        return "finished"

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    req.gone.set()
    assert await asyncio.wait_for(task, 5) == "disconnected"
    assert inner_cancelled.is_set()
    assert task.cancelling() == 0
    guard.close()


async def test_one_watcher_for_many_awaits() -> None:
    req = FakeRequest()
    guard = DisconnectGuard(req)  # type: ignore[arg-type]

    async def value(v: int) -> int:
        await asyncio.sleep(0)
        return v

    assert [await guard.run(value(i)) for i in range(5)] == [0, 1, 2, 3, 4]
    await asyncio.sleep(0)
    assert req.receives == 1  # one receive() waiting, not one per await
    guard.close()
    await asyncio.sleep(0)
    assert guard._watcher is not None and guard._watcher.cancelled()


async def test_disconnect_between_guarded_awaits_is_noted_not_raised() -> None:
    req = FakeRequest()
    guard = DisconnectGuard(req)  # type: ignore[arg-type]
    assert await guard.run(asyncio.sleep(0, "first")) == "first"
    req.gone.set()
    # unguarded work (writing the audit row) runs to the end despite the disconnect
    await asyncio.sleep(0.05)
    assert guard.disconnected
    started = False

    async def never_started() -> None:
        nonlocal started
        started = True

    with pytest.raises(ClientDisconnected):
        await guard.run(never_started())
    assert not started
    guard.close()


async def test_a_cancel_from_elsewhere_is_not_swallowed() -> None:
    req = FakeRequest()
    guard = DisconnectGuard(req)  # type: ignore[arg-type]
    task = asyncio.create_task(guard.run(asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    task.cancel()  # server shutdown, not the client
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not guard.disconnected
    guard.close()


async def test_a_result_that_lands_with_the_disconnect_is_not_lost() -> None:
    """The guarded await finished in the same loop turn as the disconnect: whatever it
    returned (an admission lease, say) is either returned or cleaned up by the awaited
    code's own cancellation handling, never both lost and leaked."""
    req = FakeRequest()
    guard = DisconnectGuard(req)  # type: ignore[arg-type]
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def acquire() -> str:
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                cleaned.append(fut.result())  # admitted just before the cancellation
            raise

    task = asyncio.create_task(guard.run(acquire()))
    await asyncio.sleep(0.01)
    fut.set_result("lease")
    req.gone.set()
    try:
        got = await task
    except ClientDisconnected:
        assert cleaned == ["lease"]
    else:
        assert got == "lease" and cleaned == []
    guard.close()
