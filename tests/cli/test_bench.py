"""``teamgpu bench`` against the fake backend through a real gateway on loopback."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from teamgpu.cli.bench import bench
from teamgpu.clientbench import (
    RequestResult,
    markdown_table,
    normalize_base_url,
    percentile,
    summarize,
)
from tests.support.harness import Harness

TOKENS = 6
DELAY_S = 0.02
FAKE = json.dumps({"fake": {"tokens": TOKENS, "delay_s": DELAY_S}})


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(bench, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:8080") == "http://h:8080/v1"
    assert normalize_base_url("https://h/v1/") == "https://h/v1"


def test_summarize_counts_errors_and_totals() -> None:
    results = [RequestResult(0.1, 1.0, 10), RequestResult(0.3, 2.0, 10),
               RequestResult(None, 0.5, 0, error="HTTP 503")]
    lv = summarize(2, results, wall_s=2.0)
    assert (lv.requests, lv.errors, lv.completion_tokens) == (3, 1, 20)
    assert lv.ttft_p50_s == pytest.approx(0.2)
    assert lv.tokens_per_s_total == pytest.approx(10.0)
    assert lv.tokens_per_s_per_user_p50 == pytest.approx(7.5)  # median of 10/1 and 10/2


def test_json_report_per_level(gateway: Harness) -> None:
    code, out, _ = run(gateway.url + "/v1", "--key", gateway.user_key, "--users", "1,3",
                       "--requests-per-user", "2", "--max-tokens", "16",
                       "--extra-body", FAKE, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["model"] == "fake-model"  # the first model /v1/models lists
    assert report["usage_reported"] is True
    assert [lv["users"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        assert lv["errors"] == 0
        assert lv["requests"] == lv["users"] * 2
        # tokens come from the usage chunk the fake sends for include_usage
        assert lv["completion_tokens"] == TOKENS * lv["requests"]
        # the first token comes after one delay_s; the whole answer after TOKENS of them
        assert DELAY_S <= lv["ttft_p50_s"] <= lv["ttft_p95_s"] < 2.0
        assert 0 < lv["tokens_per_s_per_user_p50"] <= TOKENS / (TOKENS * DELAY_S) * 1.05
        assert lv["tokens_per_s_total"] > 0
    # three users at once deliver more in total than one alone
    one, three = report["levels"]
    assert three["tokens_per_s_total"] > one["tokens_per_s_total"] * 1.5


def test_requests_stream_with_include_usage(gateway: Harness, fake: object) -> None:
    before = len(fake.requests)  # type: ignore[attr-defined]
    code, _, _ = run(gateway.url + "/v1", "--key", gateway.user_key, "--users", "1",
                     "--requests-per-user", "1", "--max-tokens", "8", "--model", "fake-model",
                     "--json")
    assert code == 0
    sent = fake.requests[before:]  # type: ignore[attr-defined]
    assert len(sent) == 1
    body = sent[0]["body"]
    assert sent[0]["path"] == "/v1/chat/completions"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["ignore_eos"] is True


def test_markdown_table_by_default(gateway: Harness) -> None:
    code, out, _ = run(gateway.url, "--key", gateway.user_key, "--users", "2",
                       "--requests-per-user", "1", "--extra-body", FAKE)
    assert code == 0, out
    assert "| users | requests | errors | TTFT p50 (s) | TTFT p95 (s) |" in out
    row = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(row) == 1 and row[0].startswith("| 2 | 2 | 0 |")


def test_rejected_key_is_a_clear_error(gateway: Harness) -> None:
    code, _out, err = run(gateway.url + "/v1", "--key", "tg-wrong", "--users", "1")
    assert code == 1
    assert "401" in err


def test_failed_requests_exit_non_zero(gateway: Harness) -> None:
    code, out, err = run(gateway.url + "/v1", "--key", gateway.user_key, "--users", "1",
                         "--requests-per-user", "1", "--model", "fake-model",
                         "--extra-body", json.dumps({"fake": {"status": 500}}), "--json")
    assert code == 1
    assert json.loads(out)["levels"][0]["errors"] == 1
    assert "failed" in err


def test_bad_users_option() -> None:
    code, _, _err = run("http://127.0.0.1:9/v1", "--key", "k", "--users", "0,x")
    assert code == 2


def test_markdown_notes_missing_usage() -> None:
    report = {"model": "m", "url": "u", "max_tokens": 1, "requests_per_user": 1,
              "usage_reported": False, "levels": []}
    assert "counted as chunks" in markdown_table(report)
