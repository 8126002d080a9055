"""The batch package's public API is exactly what ``teamgpu.batch`` exports, and the
executor interface has the fields the request pipeline is built against."""

from __future__ import annotations

import dataclasses
import inspect

import teamgpu.batch
from teamgpu.batch import BatchCall, BatchExecutor, CallResult


def test_exported_members() -> None:
    assert sorted(teamgpu.batch.__all__) == [
        "BatchCall",
        "BatchExecutor",
        "BatchRecord",
        "BatchRunner",
        "BatchService",
        "BatchStore",
        "CallResult",
        "Clock",
        "FileStore",
        "JobStats",
        "StoredFile",
        "SystemClock",
        "batch_routes",
    ]
    for name in teamgpu.batch.__all__:
        assert getattr(teamgpu.batch, name).__module__.startswith("teamgpu.batch")


def test_the_executor_interface() -> None:
    assert [(f.name, f.type) for f in dataclasses.fields(BatchCall)] == [
        ("principal", "Principal"), ("endpoint", "str"), ("body", "dict[str, Any]"),
        ("batch_id", "str"), ("custom_id", "str"), ("request_id", "str")]
    assert [(f.name, f.type, f.default) for f in dataclasses.fields(CallResult)] == [
        ("status", "int", dataclasses.MISSING), ("body", "dict[str, Any]", dataclasses.MISSING),
        ("retry_after_s", "float | None", None)]
    assert BatchCall.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert CallResult.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(BatchExecutor.execute)
    assert list(inspect.signature(BatchExecutor.slots).parameters) == [
        "self", "principal", "model"]
