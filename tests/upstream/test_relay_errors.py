"""Errors a stream can carry: the first event (F13) and the event that ends a broken one."""

from __future__ import annotations

import orjson
import pytest

from teamgpu.upstream.relay import error_from_stream_start, mid_stream_error_event

KEYS = {"message", "type", "param", "code"}


def shape(body: bytes) -> dict[str, object]:
    obj = orjson.loads(body)
    assert set(obj) == {"error"} and set(obj["error"]) == KEYS
    assert obj["error"]["code"] is None or isinstance(obj["error"]["code"], str)
    return obj["error"]  # type: ignore[no-any-return]


def test_vllm_error_event_keeps_its_4xx_status_with_openais_type() -> None:
    body = orjson.dumps({"error": {"message": "top_p must be in (0, 1]",
                                   "type": "BadRequestError", "param": "top_p", "code": 400}})
    status, out = error_from_stream_start(body)
    err = shape(out)
    assert status == 400
    # vLLM's exception name becomes OpenAI's type, as on the non-streaming path
    assert (err["message"], err["type"], err["param"]) == ("top_p must be in (0, 1]",
                                                           "invalid_request_error", "top_p")


@pytest.mark.parametrize(("code", "status"), [(404, 404), (422, 422), (500, 502), (503, 502),
                                              ("oops", 400), (None, 400), (200, 400), (True, 400)])
def test_status_from_the_events_code(code: object, status: int) -> None:
    got, out = error_from_stream_start(orjson.dumps({"error": {"message": "m", "code": code}}))
    assert got == status
    err = shape(out)
    if isinstance(code, str):
        assert err["code"] == code


@pytest.mark.parametrize("body", [b"not json", b"[1]", b'{"error": "plain text"}',
                                  b'{"error": {"no_message": 1}}', b'"x"'])
def test_odd_error_events_still_give_the_shape(body: bytes) -> None:
    status, out = error_from_stream_start(body)
    assert status == 400
    assert shape(out)["message"]


def test_mid_stream_error_event() -> None:
    ev = mid_stream_error_event("backend went away", "backend_timeout")
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    err = shape(ev[6:-2])
    assert (err["message"], err["code"], err["type"]) == ("backend went away",
                                                          "backend_timeout", "server_error")
