"""The OpenAI Batch API on the team's GPU: files, batches, and a runner that works
through them in the engine's idle time at the key's batch class (docs/batch.md).

Modules: ``executor`` (the interface the request pipeline implements), ``protocol``
(request and answer shapes), ``files`` and ``store`` (the database side), ``runner``
(feeds jobs to the executor), ``routes`` (HTTP glue), ``clock``, ``errors``.
"""

from teamgpu.batch.clock import Clock, SystemClock
from teamgpu.batch.executor import BatchCall, BatchExecutor, CallResult
from teamgpu.batch.files import FileStore, StoredFile
from teamgpu.batch.protocol import JobStats
from teamgpu.batch.routes import BatchService, batch_routes
from teamgpu.batch.runner import BatchRunner
from teamgpu.batch.store import BatchRecord, BatchStore

__all__ = [
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
