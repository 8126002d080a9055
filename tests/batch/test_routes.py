"""The Batch API over HTTP (uvicorn on loopback, fake executor): OpenAI's shapes and
statuses, ownership by user, admin read access, size limits, validation of requests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.batch.fakes import LiveApp, jsonl, line, parse_jsonl
from tests.support.harness import assert_openai_error


def client(app: LiveApp, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=app.url, headers=headers, timeout=10.0, trust_env=False)


@pytest.fixture
def alice(app: LiveApp) -> Iterator[httpx.Client]:
    with client(app, app.alice) as c:
        yield c


@pytest.fixture
def bob(app: LiveApp) -> Iterator[httpx.Client]:
    with client(app, app.bob) as c:
        yield c


@pytest.fixture
def root(app: LiveApp) -> Iterator[httpx.Client]:
    with client(app, app.root) as c:
        yield c


def upload(c: httpx.Client, data: bytes, purpose: str = "batch",
           name: str = "in.jsonl") -> dict[str, Any]:
    r = c.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def create(c: httpx.Client, file_id: str, **kw: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
            "completion_window": "24h", **kw}
    return c.post("/v1/batches", json=body)


def wait_status(c: httpx.Client, batch_id: str, statuses: tuple[str, ...] = (
        "completed", "failed", "expired", "cancelled"), timeout_s: float = 10.0
                ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        b: dict[str, Any] = c.get(f"/v1/batches/{batch_id}").json()
        if b["status"] in statuses:
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.02)


def test_upload_retrieve_list_download_delete(alice: httpx.Client) -> None:
    data = jsonl([line("a"), line("b")])
    f = upload(alice, data, name="jobs.jsonl")
    assert set(f) == {"id", "object", "bytes", "created_at", "filename", "purpose",
                      "status", "status_details", "expires_at"}
    assert f["object"] == "file" and f["bytes"] == len(data) and f["purpose"] == "batch"
    assert f["filename"] == "jobs.jsonl" and f["id"].startswith("file-")
    assert alice.get(f"/v1/files/{f['id']}").json() == f
    r = alice.get(f"/v1/files/{f['id']}/content")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))
    listing = alice.get("/v1/files", params={"purpose": "batch"}).json()
    assert listing["object"] == "list" and [x["id"] for x in listing["data"]] == [f["id"]]
    assert listing["first_id"] == listing["last_id"] == f["id"]
    assert listing["has_more"] is False
    assert alice.get("/v1/files", params={"purpose": "batch_output"}).json()["data"] == []
    assert alice.delete(f"/v1/files/{f['id']}").json() == {
        "id": f["id"], "object": "file", "deleted": True}
    assert_openai_error(alice.get(f"/v1/files/{f['id']}"), 404, code="file_not_found")


def test_files_list_pages(alice: httpx.Client) -> None:
    ids = [upload(alice, b"{}\n")["id"] for _ in range(3)]
    page = alice.get("/v1/files", params={"limit": 2, "order": "asc"}).json()
    assert page["has_more"] is True and len(page["data"]) == 2
    rest = alice.get("/v1/files", params={"limit": 2, "order": "asc",
                                          "after": page["last_id"]}).json()
    assert rest["has_more"] is False
    assert sorted(x["id"] for x in page["data"] + rest["data"]) == sorted(ids)
    assert_openai_error(alice.get("/v1/files", params={"limit": 0}), 400, param="limit")
    assert_openai_error(alice.get("/v1/files", params={"order": "up"}), 400, param="order")


def test_uploads_past_the_size_limit_get_413(app: LiveApp, alice: httpx.Client) -> None:
    limit = app.service.settings.batch_max_file_bytes
    big = b"x" * (limit + 1)
    r = alice.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", big)})
    assert_openai_error(r, 413, code="file_too_large", param="file")
    # a chunked upload (no Content-Length) is cut off while it streams
    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"b.jsonl\"\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(200):
            yield b"y" * 1024

    r = alice.post("/v1/files", content=body(),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_openai_error(r, 413, code="file_too_large")
    assert alice.get("/v1/files").json()["data"] == []
    ok = upload(alice, b"z" * limit)  # exactly the limit is fine
    assert ok["bytes"] == limit


def test_bad_uploads(app: LiveApp, alice: httpx.Client) -> None:
    assert_openai_error(alice.post("/v1/files", json={"purpose": "batch"}), 415)
    r = alice.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("a", b"{}")})
    assert_openai_error(r, 400, param="purpose")
    assert_openai_error(alice.post("/v1/files", data={"purpose": "batch"},
                                   files={"other": ("a", b"{}")}), 400, param="file")
    assert_openai_error(alice.post("/v1/files", data={"purpose": "batch", "file": "text"},
                                   files={"x": ("a", b"")}), 400, param="file")
    r = alice.post("/v1/files", content=b"--nope", headers={
        "Content-Type": "multipart/form-data; boundary=XyZ"})
    assert_openai_error(r, 400, code="invalid_form")
    # a body cut before its closing boundary: malformed, not "purpose must be batch"
    r = alice.post("/v1/files", content=b"--xy", headers={
        "Content-Type": "multipart/form-data; boundary=xy"})
    assert "malformed multipart form" in assert_openai_error(r, 400, code="invalid_form")[
        "message"]
    r = alice.post("/v1/files", files={"file": ("a.jsonl", b"{}")})
    assert_openai_error(r, 400, param="purpose", code="missing_required_parameter")
    with client(app, None) as anon:
        assert_openai_error(anon.get("/v1/files"), 401)
        assert_openai_error(anon.post("/v1/batches", json={}), 401)
    with client(app, "tg-" + "x" * 43) as wrong:
        assert_openai_error(wrong.get("/v1/batches"), 401)


def test_a_batch_runs_to_completed_over_http(alice: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a"), line("b", status=404), line("c")]))
    r = create(alice, f["id"], metadata={"job": "nightly"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "batch" and b["status"] in ("validating", "in_progress", "completed")
    assert b["id"].startswith("batch_") and b["metadata"] == {"job": "nightly"}
    assert b["expires_at"] == b["created_at"] + 24 * 3600
    assert b["input_file_id"] == f["id"] and b["completion_window"] == "24h"
    done = wait_status(alice, b["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    for k in ("in_progress_at", "finalizing_at", "completed_at"):
        assert isinstance(done[k], int), k
    assert done["failed_at"] is None and done["cancelled_at"] is None
    out = parse_jsonl(alice.get(f"/v1/files/{done['output_file_id']}/content").content)
    assert sorted(o["custom_id"] for o in out) == ["a", "c"]
    errs = parse_jsonl(alice.get(f"/v1/files/{done['error_file_id']}/content").content)
    assert errs[0]["custom_id"] == "b" and errs[0]["response"]["status_code"] == 404
    outf = alice.get(f"/v1/files/{done['output_file_id']}").json()
    assert outf["purpose"] == "batch_output"
    assert {x["id"] for x in alice.get("/v1/files", params={"purpose": "batch_output"})
            .json()["data"]} == {done["output_file_id"], done["error_file_id"]}
    assert_openai_error(alice.post(f"/v1/batches/{b['id']}/cancel"), 409,
                        code="batch_not_cancellable")


def test_invalid_lines_fail_the_batch_with_errors(alice: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a"), line("b", url="/v1/completions")]) + b"{oops\n")
    b = create(alice, f["id"]).json()
    done = wait_status(alice, b["id"])
    assert done["status"] == "failed" and isinstance(done["failed_at"], int)
    assert done["errors"]["object"] == "list"
    assert [(e["line"], e["code"], e["param"]) for e in done["errors"]["data"]] == [
        (2, "url_mismatch", "url"), (3, "invalid_json_line", None)]
    assert done["output_file_id"] is None and done["error_file_id"] is None


@pytest.mark.parametrize(("change", "param"), [
    ({"endpoint": "/v1/moderations"}, "endpoint"),
    ({"completion_window": "1d"}, "completion_window"),
    ({"completion_window": "169h"}, "completion_window"),
    ({"completion_window": "0h"}, "completion_window"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"input_file_id": None}, "input_file_id"),
])
def test_bad_batch_requests_get_400(alice: httpx.Client, change: dict[str, Any],
                                    param: str) -> None:
    f = upload(alice, jsonl([line("a")]))
    assert_openai_error(create(alice, f["id"], **change), 400, param=param)


def test_other_windows_and_refused_inputs(alice: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a")]))
    b = create(alice, f["id"], completion_window="48h").json()
    assert b["expires_at"] - b["created_at"] == 48 * 3600
    assert_openai_error(create(alice, "file-nope"), 404, param="input_file_id",
                        code="file_not_found")
    done = wait_status(alice, b["id"])
    assert_openai_error(create(alice, done["output_file_id"]), 400, param="input_file_id")
    assert_openai_error(alice.post("/v1/batches", content=b"{", headers={
        "Content-Type": "application/json"}), 400, code="invalid_json")
    assert_openai_error(alice.post("/v1/batches", json=[1]), 400)
    assert_openai_error(alice.get("/v1/batches/batch_nope"), 404, code="batch_not_found")
    assert_openai_error(alice.post("/v1/batches/batch_nope/cancel"), 404)


def test_batches_list_pages_newest_first(alice: httpx.Client, bob: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a")]))
    ids = []
    for _ in range(5):
        ids.append(create(alice, f["id"]).json()["id"])
        time.sleep(0.002)
    create(bob, upload(bob, jsonl([line("a")]))["id"])
    page = alice.get("/v1/batches", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["first_id"] == ids[-1] and page["last_id"] == ids[-2]
    rest = alice.get("/v1/batches", params={"after": page["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert len(alice.get("/v1/batches").json()["data"]) == 5
    assert_openai_error(alice.get("/v1/batches", params={"limit": 101}), 400, param="limit")


def test_other_users_get_404_as_for_an_unknown_id(app: LiveApp, alice: httpx.Client,
                                                  bob: httpx.Client,
                                                  root: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a")]))
    b = create(alice, f["id"]).json()
    for path in (f"/v1/files/{f['id']}", f"/v1/files/{f['id']}/content",
                 f"/v1/batches/{b['id']}"):
        mine, unknown = bob.get(path), bob.get(path.replace(path.split("/")[3], "x"))
        assert mine.status_code == unknown.status_code == 404, path
        assert mine.json()["error"]["code"] == unknown.json()["error"]["code"]
    assert bob.delete(f"/v1/files/{f['id']}").status_code == 404
    assert bob.post(f"/v1/batches/{b['id']}/cancel").status_code == 404
    assert_openai_error(create(bob, f["id"]), 404, param="input_file_id")
    assert bob.get("/v1/files").json()["data"] == []
    assert bob.get("/v1/batches").json()["data"] == []
    # an admin reads everyone's files and batches, and may not change them
    assert f["id"] in {x["id"] for x in root.get("/v1/files").json()["data"]}
    assert b["id"] in {x["id"] for x in root.get("/v1/batches").json()["data"]}
    assert root.get(f"/v1/files/{f['id']}/content").content == jsonl([line("a")])
    assert root.get(f"/v1/batches/{b['id']}").json()["id"] == b["id"]
    assert_openai_error(root.delete(f"/v1/files/{f['id']}"), 403, code="read_only")
    assert_openai_error(root.post(f"/v1/batches/{b['id']}/cancel"), 403, code="read_only")
    assert_openai_error(create(root, f["id"]), 403, code="read_only")
    assert alice.get(f"/v1/files/{f['id']}").status_code == 200


def test_cancel_over_http(app: LiveApp, alice: httpx.Client) -> None:
    f = upload(alice, jsonl([line("a", hold=True), line("b", hold=True), line("c"),
                             line("d"), line("e")]))
    b = create(alice, f["id"]).json()
    deadline = time.monotonic() + 5
    while app.executor.total_in_flight < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = alice.post(f"/v1/batches/{b['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    assert isinstance(r.json()["cancelling_at"], int)
    again = alice.post(f"/v1/batches/{b['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelling"
    app.thread.loop.call_soon_threadsafe(app.executor.release)
    done = wait_status(alice, b["id"])
    assert done["status"] == "cancelled"
    assert done["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    out = parse_jsonl(alice.get(f"/v1/files/{done['output_file_id']}/content").content)
    assert sorted(o["custom_id"] for o in out) == ["a", "b"]
