"""The error tree renders one shape; backend statuses map to the client's (F7, F8)."""

from __future__ import annotations

import inspect

import orjson
import pytest

from teamgpu import errors
from teamgpu.errors import GatewayError
from teamgpu.upstream.backend_errors import error_from_backend

KEYS = {"message", "type", "param", "code"}
NEEDS_RETRY_AFTER = {429, 503}


def all_errors() -> list[type[GatewayError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, GatewayError)]


@pytest.mark.parametrize("cls", all_errors(), ids=lambda c: c.__name__)
def test_every_error_renders_openais_shape(cls: type[GatewayError]) -> None:
    kw = {"retry_after_s": 3} if cls.status in NEEDS_RETRY_AFTER else {}
    exc = cls("something went wrong", **kw)  # type: ignore[arg-type]
    body = orjson.loads(orjson.dumps(exc.body()))
    assert set(body) == {"error"} and set(body["error"]) == KEYS
    assert body["error"]["message"] == "something went wrong"
    assert 400 <= exc.status < 600
    if exc.status in NEEDS_RETRY_AFTER:
        assert exc.headers["Retry-After"] == "3"


@pytest.mark.parametrize("cls", [errors.TooManyRequests, errors.ServiceUnavailable])
def test_retry_after_is_a_positive_integer(cls: type[GatewayError]) -> None:
    for given, sent in ((0, "1"), (2.7, "2"), (30, "30")):
        assert cls("x", retry_after_s=given).headers["Retry-After"] == sent  # type: ignore[call-arg]


def vllm(message: str, code: int = 400) -> bytes:
    return orjson.dumps({"object": "error", "message": message, "type": "BadRequestError",
                         "param": None, "code": code})


def test_bare_404_names_the_missing_endpoint() -> None:
    exc = error_from_backend(404, orjson.dumps({"detail": "Not Found"}), "http://b",
                            path="/v1/embeddings", model="m")
    assert exc.status == 404
    assert exc.message.startswith("the backend serving 'm' does not offer /v1/embeddings")


def test_context_length_error_is_400_with_its_code() -> None:
    msg = ("This model's maximum context length is 2048 tokens. However, you requested "
           "5000 tokens (10 in the messages, 4990 in the completion).")
    exc = error_from_backend(400, vllm(msg), "http://b")
    assert (exc.status, exc.code, exc.message) == (400, "context_length_exceeded", msg)
    assert exc.outcome == "backend_rejected"


def test_other_4xx_keep_status_message_and_string_code() -> None:
    exc = error_from_backend(404, orjson.dumps({"error": {
        "message": "The model `x` does not exist.", "type": "NotFoundError",
        "param": "model", "code": "model_not_found"}}), "http://b")
    # vLLM's exception-named type becomes OpenAI's
    assert (exc.status, exc.type, exc.param, exc.code) == (
        404, "invalid_request_error", "model", "model_not_found")
    exc = error_from_backend(400, vllm("bad"), "http://b")
    assert (exc.status, exc.code, exc.message) == (400, "invalid_request", "bad")
    exc = error_from_backend(422, orjson.dumps({"detail": "field required"}), "http://b")
    assert (exc.status, exc.message) == (422, "field required")


@pytest.mark.parametrize(("status", "header", "retry"), [(503, None, "2"), (503, "9", "9"),
                                                         (429, None, "1"), (429, "4", "4"),
                                                         (503, "Wed, 21 Oct 2015 07:28:00 GMT",
                                                          "2")])
def test_429_and_503_carry_an_integer_retry_after(status: int, header: str | None,
                                                   retry: str) -> None:
    exc = error_from_backend(status, b"busy", "http://b", header)
    assert exc.status == status
    assert exc.headers["Retry-After"] == retry


@pytest.mark.parametrize("status", [500, 501, 502, 504, 401, 403])
def test_backend_failures_and_refusals_are_502(status: int) -> None:
    exc = error_from_backend(status, b"<html>oops</html>", "http://b")
    assert exc.status == 502 and exc.code == "backend_error"
    assert str(status) in exc.message


@pytest.mark.parametrize("cls", all_errors(), ids=lambda c: c.__name__)
def test_the_error_tree_in_the_docstring_is_complete(cls: type[GatewayError]) -> None:
    doc = errors.__doc__ or ""
    line = next((ln for ln in doc.splitlines() if f" {cls.__name__} " in f" {ln} "), None)
    assert line is not None, f"{cls.__name__} is missing from the tree in teamgpu/errors.py"
    assert str(cls.status) in line
