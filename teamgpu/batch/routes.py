"""HTTP glue of the Batch API: ``/v1/files`` and ``/v1/batches`` in OpenAI's shapes.

Mount with :func:`batch_routes`; everything the routes need is in a
:class:`BatchService`. Errors are :mod:`teamgpu.errors` types, rendered here with
:func:`teamgpu.api.errors.error_response`.

Ownership: files and batches belong to the key's user. Any other user gets 404, exactly
as for an unknown id. Admin keys may list and read everyone's (``GET``) but get 403 when
they try to change another user's (delete a file, cancel a batch, start a batch from
another user's file).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import ValidationError
from sqlalchemy import Engine
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from teamgpu.api.errors import error_response, json_response
from teamgpu.auth.keys import Principal
from teamgpu.batch.clock import Clock, SystemClock
from teamgpu.batch.errors import (
    BatchConflict,
    BatchNotFound,
    FileNotFound,
    FileTooLarge,
    ReadOnlyForAdmin,
)
from teamgpu.batch.files import FileStore, StoredFile, page_chunks
from teamgpu.batch.protocol import CreateBatchRequest, parse_completion_window
from teamgpu.batch.runner import BatchRunner
from teamgpu.batch.store import BatchRecord, BatchStore
from teamgpu.errors import (
    BadRequest,
    GatewayError,
    InvalidJSON,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from teamgpu.settings import Settings

__all__ = ["BatchService", "batch_routes"]

FORM_OVERHEAD_BYTES = 64 * 1024   # multipart boundaries, headers and the purpose field
MAX_CREATE_BODY_BYTES = 64 * 1024
FILES_PAGE_MAX = 10_000
BATCHES_PAGE_DEFAULT, BATCHES_PAGE_MAX = 20, 100


@dataclass
class BatchService:
    """What the Batch API's routes need; the app builds it in its lifespan.

    Attributes:
        authenticate: the request's principal; raises
            :class:`teamgpu.errors.AuthenticationError` (401) and the like.
        engine: the store (keys, audit log, batch tables).
        files: the file store over ``engine``.
        runner: the batch runner of this gateway, told about new and cancelled batches
            (None: only the store is written; another gateway's runner picks them up).
        settings: ``batch_max_file_bytes``, ``batch_max_window_h``.
        clock: the time stamped on new objects (default: the runner's clock).
        audit: writes each request's audit row (the gateway's recorder), or None.
    """

    authenticate: Callable[[Request], Awaitable[Principal]]
    engine: Engine
    files: FileStore
    runner: BatchRunner | None
    settings: Settings
    clock: Clock | None = None
    audit: Audit | None = None
    store: BatchStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = BatchStore(self.engine, self.files)
        if self.clock is None:
            self.clock = self.runner.clock if self.runner is not None else SystemClock()

    def now(self) -> float:
        assert self.clock is not None
        return self.clock.time()


Handler = Callable[[Request], Awaitable[Response]]


Audit = Callable[[Request, str, int, GatewayError | None], Awaitable[None]]
"""``audit(request, endpoint, status, error)``: writes the request's audit row."""

AUDIT_NAMES = {
    "upload_file": "files.create", "list_files": "files.list",
    "retrieve_file": "files.retrieve", "delete_file": "files.delete",
    "file_content": "files.content", "create_batch": "batches.create",
    "list_batches": "batches.list", "retrieve_batch": "batches.retrieve",
    "cancel_batch": "batches.cancel",
}
"""Each route's endpoint name in the audit log (none of them counts as usage)."""


def _rendered(fn: Callable[[BatchService, Request], Awaitable[Response]],
              service: Callable[[Request], BatchService]) -> Handler:
    async def handler(request: Request) -> Response:
        svc = service(request)
        error: GatewayError | None = None
        try:
            response = await fn(svc, request)
        except GatewayError as exc:
            error = exc
            response = error_response(exc)
        if svc.audit is not None:
            await svc.audit(request, AUDIT_NAMES[fn.__name__], response.status_code, error)
        return response

    handler.__name__ = fn.__name__
    return handler


def batch_routes(service: BatchService | Callable[[Request], BatchService]) -> list[Route]:
    """The Batch API's routes (``/v1/files...``, ``/v1/batches...``) over ``service``, or
    over the service ``service(request)`` returns (the app builds its service in its
    lifespan, after the routes)."""
    get = service if callable(service) and not isinstance(service, BatchService) \
        else (lambda _request: service)

    def r(path: str, fn: Callable[[BatchService, Request], Awaitable[Response]],
          method: str) -> Route:
        return Route(path, _rendered(fn, get), methods=[method])

    return [
        r("/v1/files", upload_file, "POST"),
        r("/v1/files", list_files, "GET"),
        r("/v1/files/{file_id}", retrieve_file, "GET"),
        r("/v1/files/{file_id}", delete_file, "DELETE"),
        r("/v1/files/{file_id}/content", file_content, "GET"),
        r("/v1/batches", create_batch, "POST"),
        r("/v1/batches", list_batches, "GET"),
        r("/v1/batches/{batch_id}", retrieve_batch, "GET"),
        r("/v1/batches/{batch_id}/cancel", cancel_batch, "POST"),
    ]


# --- helpers -------------------------------------------------------------------------
def _readable(owner: str, p: Principal) -> bool:
    return owner == p.user or p.is_admin


def _check_writable(owner: str, p: Principal, what: str) -> None:
    """Raises ReadOnlyForAdmin for an admin's write to another user's object; callers
    answer 404 for everyone else."""
    if owner != p.user and p.is_admin:
        raise ReadOnlyForAdmin(what)


async def _file_for(svc: BatchService, p: Principal, file_id: str,
                    param: str | None = None) -> StoredFile:
    f = await asyncio.to_thread(svc.files.get, file_id)
    if f is None or not _readable(f.user, p):
        raise FileNotFound(file_id, param=param)
    return f


async def _batch_for(svc: BatchService, p: Principal, batch_id: str) -> BatchRecord:
    b = await asyncio.to_thread(svc.store.get, batch_id)
    if b is None or not _readable(b.user, p):
        raise BatchNotFound(batch_id)
    return b


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = lo - 1
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}: {raw!r}", param=name,
                         code="invalid_value")
    return v


class _TooLarge(MultiPartException):
    pass


async def _limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncGenerator[bytes, None]:
    n = 0
    async for chunk in stream:
        n += len(chunk)
        if n > max_bytes:
            raise _TooLarge("too large")
        yield chunk


# --- files ---------------------------------------------------------------------------
async def upload_file(svc: BatchService, request: Request) -> Response:
    """``POST /v1/files``: multipart/form-data with ``purpose=batch`` and a JSONL ``file``.

    Raises:
        FileTooLarge: 413, the file is larger than ``batch_max_file_bytes``.
        UnsupportedMediaType: 415, not multipart/form-data.
        BadRequest: 400, malformed form, no file, or a purpose other than ``batch``.
    """
    p = await svc.authenticate(request)
    max_bytes = svc.settings.batch_max_file_bytes
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("POST /v1/files takes multipart/form-data "
                                   "(fields purpose and file)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD_BYTES:
        raise FileTooLarge(max_bytes)
    parser = MultiPartParser(request.headers,
                             _limited(request.stream(), max_bytes + FORM_OVERHEAD_BYTES),
                             max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD_BYTES)
    try:
        form = await parser.parse()
    except _TooLarge as exc:
        raise FileTooLarge(max_bytes) from exc
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart form: {exc.message}", code="invalid_form"
                         ) from exc
    except ClientDisconnect as exc:
        raise BadRequest("the client left before the upload ended") from exc
    try:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not form:  # starlette ends a form without its closing boundary quietly
            raise BadRequest("malformed multipart form: no fields (a truncated body, or a "
                             "boundary that does not match the Content-Type's)",
                             code="invalid_form")
        if purpose is None:
            raise BadRequest("the form has no 'purpose' field: send purpose=batch and the "
                             "file", param="purpose", code="missing_required_parameter")
        if purpose != "batch":
            raise BadRequest(f"purpose must be 'batch' (the only purpose this gateway "
                             f"serves): {purpose!r}", param="purpose", code="invalid_value")
        if not isinstance(upload, UploadFile):
            raise BadRequest("file must be a file part of the form", param="file",
                             code="missing_required_parameter")
        if upload.size is not None and upload.size > max_bytes:
            raise FileTooLarge(max_bytes)
        stored = await asyncio.to_thread(
            svc.files.create, user=p.user, key_id=p.key_id, purpose="batch",
            filename=upload.filename or "upload.jsonl", source=upload.file,
            now=datetime.fromtimestamp(svc.now(), UTC))
    finally:
        await form.close()
    return json_response(stored.public())


async def list_files(svc: BatchService, request: Request) -> Response:
    """``GET /v1/files``: ``purpose``, ``after``, ``limit`` (1-10000, default 10000),
    ``order`` (``asc``/``desc``, default ``desc``); an admin sees everyone's."""
    p = await svc.authenticate(request)
    limit = _int_param(request, "limit", FILES_PAGE_MAX, 1, FILES_PAGE_MAX)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"order must be 'asc' or 'desc': {order!r}", param="order",
                         code="invalid_value")
    o: Literal["asc", "desc"] = "asc" if order == "asc" else "desc"
    after = request.query_params.get("after")
    try:
        files, more = await asyncio.to_thread(
            svc.files.list, user=None if p.is_admin else p.user,
            purpose=request.query_params.get("purpose"), after=after, limit=limit, order=o)
    except LookupError as exc:
        raise FileNotFound(str(after), param="after") from exc
    data = [f.public() for f in files]
    return json_response({"object": "list", "data": data,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None, "has_more": more})


async def retrieve_file(svc: BatchService, request: Request) -> Response:
    p = await svc.authenticate(request)
    f = await _file_for(svc, p, request.path_params["file_id"])
    return json_response(f.public())


async def delete_file(svc: BatchService, request: Request) -> Response:
    p = await svc.authenticate(request)
    f = await _file_for(svc, p, request.path_params["file_id"])
    _check_writable(f.user, p, f"file {f.id}")
    await asyncio.to_thread(svc.files.delete, f.id)
    return json_response({"id": f.id, "object": "file", "deleted": True})


async def file_content(svc: BatchService, request: Request) -> Response:
    """``GET /v1/files/{id}/content``: the bytes, streamed a page of chunks at a time."""
    p = await svc.authenticate(request)
    f = await _file_for(svc, p, request.path_params["file_id"])

    n = page_chunks(f.purpose)

    async def body() -> AsyncIterator[bytes]:
        after = -1
        while page := await asyncio.to_thread(svc.files.read_chunks, f.id, after, n):
            for seq, data in page:
                yield data
                after = seq

    return StreamingResponse(body(), media_type="application/octet-stream", headers={
        "Content-Length": str(f.bytes),
        "Content-Disposition": f'attachment; filename="{_header_safe(f.filename)}"'})


def _header_safe(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)


# --- batches -------------------------------------------------------------------------
async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_CREATE_BODY_BYTES:
        raise PayloadTooLarge(f"body larger than {MAX_CREATE_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_CREATE_BODY_BYTES:
            raise PayloadTooLarge(f"body larger than {MAX_CREATE_BODY_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"body is not valid JSON: {exc}") from exc


async def create_batch(svc: BatchService, request: Request) -> Response:
    """``POST /v1/batches``: ``input_file_id``, ``endpoint``, ``completion_window``,
    ``metadata``. The batch starts in ``validating``; the runner checks its lines.

    Raises:
        BadRequest: 400, a missing or invalid field (named in ``param``), or an input
            file whose purpose is not ``batch``.
        FileNotFound: 404, no such input file of this user.
        ReadOnlyForAdmin: 403, an admin naming another user's file.
    """
    p = await svc.authenticate(request)
    raw = await _json_body(request)
    if not isinstance(raw, dict):
        raise InvalidJSON("body must be a JSON object")
    try:
        req = CreateBatchRequest.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        param = ".".join(str(x) for x in e["loc"]) or None
        raise BadRequest(f"{param}: {e['msg']}", param=param, code="invalid_value") from exc
    window_s = parse_completion_window(req.completion_window, svc.settings.batch_max_window_h)
    f = await _file_for(svc, p, req.input_file_id, param="input_file_id")
    _check_writable(f.user, p, f"file {f.id}")
    if f.purpose != "batch":
        raise BadRequest(f"file {f.id} has purpose {f.purpose!r}; a batch needs a file "
                         "uploaded with purpose 'batch'", param="input_file_id",
                         code="invalid_value")
    rec = await asyncio.to_thread(
        svc.store.create, principal=p, input_file_id=f.id, endpoint=req.endpoint,
        completion_window=req.completion_window, window_s=window_s, metadata=req.metadata,
        now=svc.now())
    if svc.runner is not None:
        svc.runner.submit(rec.id)
    return json_response(rec.public())


async def list_batches(svc: BatchService, request: Request) -> Response:
    """``GET /v1/batches``: newest first, ``after`` and ``limit`` (1-100, default 20); an
    admin sees everyone's."""
    p = await svc.authenticate(request)
    limit = _int_param(request, "limit", BATCHES_PAGE_DEFAULT, 1, BATCHES_PAGE_MAX)
    after = request.query_params.get("after")
    try:
        recs, more = await asyncio.to_thread(
            svc.store.list, user=None if p.is_admin else p.user, after=after, limit=limit)
    except LookupError as exc:
        raise BatchNotFound(str(after)) from exc
    data = [b.public() for b in recs]
    return json_response({"object": "list", "data": data,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None, "has_more": more})


async def retrieve_batch(svc: BatchService, request: Request) -> Response:
    p = await svc.authenticate(request)
    b = await _batch_for(svc, p, request.path_params["batch_id"])
    return json_response(b.public())


async def cancel_batch(svc: BatchService, request: Request) -> Response:
    """``POST /v1/batches/{id}/cancel``: ``validating`` or ``in_progress`` -> ``cancelling``
    (then ``cancelled`` once the items in flight have finished); cancelling again answers
    the batch as it is.

    Raises:
        BatchConflict: 409, the batch is finalizing or has ended.
    """
    p = await svc.authenticate(request)
    b = await _batch_for(svc, p, request.path_params["batch_id"])
    _check_writable(b.user, p, f"batch {b.id}")
    rec, changed = await asyncio.to_thread(svc.store.request_cancel, b.id, svc.now())
    if changed and svc.runner is not None:
        svc.runner.cancel(rec.id)
    if not changed and rec.status != "cancelling":
        raise BatchConflict(f"batch {rec.id} is {rec.status} and can no longer be cancelled")
    return json_response(rec.public())
