"""Reading a request body: size limit, JSON object, and the fields the gateway must read
exactly as vLLM will (or a limit could be passed around)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from teamgpu.api.guard import ClientDisconnected
from teamgpu.errors import BadRequest, InvalidJSON, PayloadTooLarge, UnsupportedMediaType

__all__ = ["check_stream_fields", "parse_json_object", "positive_int", "read_body"]

NESTING_CHECK_BRACKETS = 200  # bodies with more brackets than this get the depth check


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        PayloadTooLarge: 413, by Content-Length or while reading.
        ClientDisconnected: the client closed the connection mid-body (audit status 499).
    """
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise PayloadTooLarge(f"request body of {cl} bytes is over the limit of {limit} bytes")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left before sending the whole body (499)
        raise ClientDisconnected() from None
    return b"".join(chunks)


def parse_json_object(request: Request, body: bytes) -> dict[str, Any]:
    """Decode a JSON object body.

    Raises:
        UnsupportedMediaType: 415, a content type other than JSON.
        InvalidJSON: 400, empty, malformed, invalid UTF-8 or lone surrogates, not an object,
            or nested deeper than the gateway can forward (about 250 levels).
    """
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {ctype!r}"
        )
    if not body:
        raise InvalidJSON("request body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidJSON("request body must be a JSON object")
    if body.count(b"[") + body.count(b"{") > NESTING_CHECK_BRACKETS:
        # the decoder takes 1,024 levels, the encoder that forwards the body about 250
        try:
            orjson.dumps(data)
        except orjson.JSONEncodeError:
            raise InvalidJSON("request body is nested too deeply to forward (at most about "
                              "250 levels of arrays and objects)") from None
    return data


def positive_int(payload: dict[str, Any], key: str) -> int | None:
    """``payload[key]`` when it is a positive integer, None when absent or null.

    Raises:
        BadRequest: 400 (param ``key``), any other value. The gateway must read these
            fields exactly as the engine will, or a limit could be passed around.
    """
    v = payload.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer() and v >= 2**63:  # JSON's 1e20 and such
        raise BadRequest(f"'{key}' is too large: {v:.0f}", param=key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise BadRequest(f"'{key}' must be an integer of at least 1, got {v!r}"[:300],
                         param=key)
    return v


def check_stream_fields(payload: dict[str, Any]) -> None:
    """``stream`` must be a boolean and ``stream_options`` an object, when given.

    vLLM would take ``1``, ``"true"`` or ``"yes"`` for true: accepted here they would
    stream without the gateway knowing, and so without its usage accounting.

    Raises:
        BadRequest: 400 (param ``stream`` or ``stream_options``).
    """
    v = payload.get("stream")
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"'stream' must be true or false, got {v!r}"[:300], param="stream")
    so = payload.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
