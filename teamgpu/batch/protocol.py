"""The Batch API's shapes: the request bodies it reads (pydantic) and the objects it
answers with (TypedDicts), as OpenAI's API reference gives them.

Objects::

    FileObject    {"id", "object": "file", "bytes", "created_at", "filename", "purpose",
                   "status": "processed", "status_details": None, "expires_at": None}
    BatchObject   {"id", "object": "batch", "endpoint", "errors", "input_file_id",
                   "completion_window", "status", "output_file_id", "error_file_id",
                   "created_at", "in_progress_at", "expires_at", "finalizing_at",
                   "completed_at", "failed_at", "expired_at", "cancelling_at",
                   "cancelled_at", "request_counts", "metadata", "usage"}
    OutputLine    {"id", "custom_id", "response": {"status_code", "request_id", "body"}
                   | None, "error": {"code", "message"} | None}

Times are Unix seconds (integers), as in OpenAI's objects.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

from teamgpu.errors import BadRequest

__all__ = [
    "ACTIVE_STATUSES",
    "ENDPOINTS",
    "MAX_METADATA_PAIRS",
    "TERMINAL_STATUSES",
    "BatchErrorEntry",
    "BatchErrors",
    "BatchList",
    "BatchObject",
    "BatchStatus",
    "BatchUsage",
    "CreateBatchRequest",
    "Endpoint",
    "FileDeleted",
    "FileList",
    "FileObject",
    "JobItems",
    "JobStats",
    "JobTokens",
    "OutputLine",
    "RequestCounts",
    "parse_completion_window",
]

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
ENDPOINTS: tuple[str, ...] = Endpoint.__args__  # type: ignore[attr-defined]

BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed",
                      "expired", "cancelling", "cancelled"]
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
"""Statuses a runner works on (and resumes after a restart)."""
TERMINAL_STATUSES = ("completed", "failed", "expired", "cancelled")

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")


def parse_completion_window(window: str, max_h: int) -> int:
    """Seconds of a ``completion_window``: ``"24h"`` (OpenAI's one value) or any ``"Nh"``
    with ``1 <= N <= max_h``.

    Raises:
        BadRequest: anything else (400, ``param: "completion_window"``).
    """
    m = _WINDOW.match(window)
    if m is None or not 1 <= int(m.group(1)) <= max_h:
        raise BadRequest(
            f"completion_window must be '24h' (or 'Nh' with 1 <= N <= {max_h}): {window!r}",
            param="completion_window", code="invalid_value")
    return int(m.group(1)) * 3600


class CreateBatchRequest(BaseModel):
    """The body of ``POST /v1/batches``. Fields OpenAI has and this gateway does not use
    (``output_expires_after``) are ignored."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: Endpoint
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, got {len(v)}")
        for k, val in v.items():
            if len(k) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys have at most {MAX_METADATA_KEY_CHARS} characters: {k!r}")
            if len(val) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"values have at most {MAX_METADATA_VALUE_CHARS} characters "
                                 f"(key {k!r})")
        return v


class FileObject(TypedDict):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    status_details: None
    expires_at: None


class FileList(TypedDict):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(TypedDict):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchErrorEntry(TypedDict):
    """One invalid input line (or a whole-file error, ``line`` None)."""

    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(TypedDict):
    object: Literal["list"]
    data: list[BatchErrorEntry]


class RequestCounts(TypedDict):
    total: int
    completed: int
    failed: int


class BatchUsage(TypedDict):
    """Tokens the answers reported so far (``usage`` of each 2xx body)."""

    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class BatchObject(TypedDict):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage


class BatchList(TypedDict):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class OutputLine(TypedDict):
    id: str
    custom_id: str
    response: dict[str, Any] | None
    error: dict[str, Any] | None


class JobItems(TypedDict):
    total: int
    queued: int
    in_flight: int
    done: int
    failed: int


class JobTokens(TypedDict):
    prompt: int
    completion: int
    total: int


class JobStats(TypedDict):
    """One job as :meth:`teamgpu.batch.runner.BatchRunner.stats` reports it.

    ``done`` counts 2xx answers, ``failed`` the rest (final errors, and the items a
    cancel or expiry left); ``queued`` is what is neither answered nor in flight. Times
    are Unix seconds; ``eta_s`` is None until two items have finished, and counts the rest
    of the pause of a paused job.
    """

    id: str
    user: str
    endpoint: str
    status: str
    items: JobItems
    tokens: JobTokens
    started_at: float | None
    finished_at: float | None
    eta_s: float | None
    paused_until: float | None
