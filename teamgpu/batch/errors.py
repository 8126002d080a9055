"""Errors of the Batch API, each a node of the gateway's tree in :mod:`teamgpu.errors`.

Tree (status the client sees, OpenAI ``code``)::

    GatewayError
    ├── BadRequest                  400 (a bad field: its name in ``param``)
    ├── PermissionDenied            403
    │   └── ReadOnlyForAdmin        403 read_only (an admin changing another user's object)
    ├── NotFound                    404
    │   ├── FileNotFound            404 file_not_found
    │   └── BatchNotFound           404 batch_not_found
    ├── PayloadTooLarge             413
    │   └── FileTooLarge            413 file_too_large
    └── BatchConflict               409 batch_not_cancellable

An object of another user is answered exactly as an unknown id (404), so ids cannot be
probed.
"""

from __future__ import annotations

from teamgpu import errors as gateway_errors

__all__ = ["BatchConflict", "BatchNotFound", "FileNotFound", "FileTooLarge",
           "ReadOnlyForAdmin"]


class FileNotFound(gateway_errors.NotFound):
    code = "file_not_found"

    def __init__(self, file_id: str, *, param: str | None = None) -> None:
        super().__init__(f"No such file: {file_id!r}", param=param)


class BatchNotFound(gateway_errors.NotFound):
    code = "batch_not_found"

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No such batch: {batch_id!r}")


class FileTooLarge(gateway_errors.PayloadTooLarge):
    code = "file_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"File is larger than batch_max_file_bytes ({max_bytes} bytes)",
                         param="file")


class ReadOnlyForAdmin(gateway_errors.PermissionDenied):
    code = "read_only"

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} belongs to another user: admins may read it, "
                         "not change it")


class BatchConflict(gateway_errors.GatewayError):
    """409: the batch is past the point where it can be cancelled."""

    status = 409
    type = "invalid_request_error"
    code = "batch_not_cancellable"
    outcome = "bad_request"
