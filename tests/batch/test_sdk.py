"""The official ``openai`` SDK, unchanged, against the Batch API on loopback: every
files and batches method the issue names."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from tests.batch.fakes import LiveApp, jsonl, line, parse_jsonl


@pytest.fixture
def sdk(app: LiveApp) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=app.url + "/v1", api_key=app.alice, max_retries=0,
                      http_client=openai.DefaultHttpxClient(trust_env=False, timeout=10.0))
    yield c
    c.close()


def wait(sdk: openai.OpenAI, batch_id: str, until: tuple[str, ...] = (
        "completed", "failed", "expired", "cancelled")) -> openai.types.Batch:
    deadline = time.monotonic() + 10
    while True:
        b = sdk.batches.retrieve(batch_id)
        if b.status in until:
            return b
        assert time.monotonic() < deadline, b
        time.sleep(0.02)


def test_files_and_batches_through_the_sdk(sdk: openai.OpenAI) -> None:
    data = jsonl([line("q1"), line("q2"), line("q3", status=400)])
    f = sdk.files.create(file=("requests.jsonl", data), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data) and f.filename == "requests.jsonl"
    assert sdk.files.retrieve(f.id).id == f.id
    assert sdk.files.content(f.id).content == data
    assert [x.id for x in sdk.files.list(purpose="batch")] == [f.id]

    b = sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                           completion_window="24h", metadata={"owner": "docs-team"})
    assert b.metadata == {"owner": "docs-team"} and b.input_file_id == f.id
    done = wait(sdk, b.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (3, 2, 1)
    assert done.usage is not None and done.usage.total_tokens == 16
    assert done.output_file_id and done.error_file_id
    out = parse_jsonl(sdk.files.content(done.output_file_id).content)
    assert {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
            for o in out} == {"q1": "answer to q1", "q2": "answer to q2"}
    errs = parse_jsonl(sdk.files.content(done.error_file_id).content)
    assert errs[0]["custom_id"] == "q3" and errs[0]["response"]["status_code"] == 400

    deleted = sdk.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(f.id)


def test_batches_list_pages_and_cancel_through_the_sdk(app: LiveApp,
                                                        sdk: openai.OpenAI) -> None:
    f = sdk.files.create(file=("r.jsonl", jsonl([line("a")])), purpose="batch")
    ids = []
    for _ in range(5):
        ids.append(sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id)
        time.sleep(0.002)
    page = sdk.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in sdk.batches.list(limit=2)] == ids[::-1]  # auto-paging

    held = sdk.files.create(file=("h.jsonl", jsonl([line("h", hold=True), line("x")])),
                            purpose="batch")
    b = sdk.batches.create(input_file_id=held.id, endpoint="/v1/chat/completions",
                           completion_window="24h")
    wait(sdk, b.id, ("in_progress",))
    assert sdk.batches.cancel(b.id).status in ("cancelling", "cancelled")
    app.thread.loop.call_soon_threadsafe(app.executor.release)
    done = wait(sdk, b.id)
    assert done.status == "cancelled" and done.request_counts is not None
    assert done.request_counts.completed + done.request_counts.failed == 2
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(input_file_id=held.id, endpoint="/v1/chat/completions",
                           completion_window="7d")  # type: ignore[arg-type]
    with openai.DefaultHttpxClient(trust_env=False) as http, \
            pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url + "/v1", api_key="tg-wrong", max_retries=0,
                      http_client=http).batches.list()
