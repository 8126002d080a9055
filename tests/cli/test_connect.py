"""``teamgpu connect``: every printed form is run against a live gateway on loopback.

- curl: the printed command runs in bash;
- python: the printed snippet runs in a subprocess with this venv's python;
- env: the exports are sourced in bash, then an OpenAI SDK call reads them;
- continue: the config is parsed and the requests Continue.dev sends are replayed with
  its URL rule (``new URL(endpoint, apiBase)``, RFC 3986 resolution like
  :func:`urllib.parse.urljoin`) and its bodies and headers, as in Continue's
  ``core/llm/llms/OpenAI.ts``: chat streams to ``chat/completions``; autocomplete (raw
  prompt, ``useLegacyCompletionsEndpoint``) streams to ``completions``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import urljoin

import httpx
import pytest
import yaml
from click.testing import CliRunner

from teamgpu.cli.connect import connect
from tests.support.fake_backend import FakeBackend
from tests.support.harness import Harness, sse_events

MODEL = "fake-model"


def printed(*args: str) -> str:
    r = CliRunner().invoke(connect, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def base(gateway: Harness) -> list[str]:
    return ["--url", gateway.url + "/v1", "--key", gateway.user_key]


def clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "SSL_CERT", "HTTP_PROXY", "HTTPS_PROXY"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


def test_curl_form_streams_a_chat(gateway: Harness, fake: FakeBackend) -> None:
    cmd = printed("curl", *base(gateway))
    assert cmd.startswith("curl -sS -N ")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=30, check=True,
                         env=clean_env()).stdout
    events = sse_events(out)
    assert events[-1] == b"data: [DONE]\n\n"
    first = json.loads(events[0][len(b"data: "):])
    assert first["object"] == "chat.completion.chunk" and first["model"] == MODEL
    assert fake.requests[-1]["body"]["temperature"] == 0  # a repeatable check answer


def test_python_form_runs(gateway: Harness, fake: FakeBackend) -> None:
    snippet = printed("python", *base(gateway))
    compile(snippet, "<snippet>", "exec")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                         timeout=60, check=True, env=clean_env()).stdout
    assert out.strip() == ("tok " * 4).strip()  # the fake's default answer
    assert fake.requests[-1]["body"]["temperature"] == 0


def test_env_form_sourced_then_sdk(gateway: Harness) -> None:
    exports = printed("env", *base(gateway))
    assert "export OPENAI_BASE_URL=" in exports and "export OPENAI_API_KEY=" in exports
    call = ("from openai import OpenAI; c = OpenAI(); "
            "r = c.chat.completions.create(model='fake-model', "
            "messages=[{'role': 'user', 'content': 'hi'}]); "
            "print(r.choices[0].message.content)")
    script = f"{exports}\n{sys.executable} -c \"{call}\"\n"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         check=True, env=clean_env()).stdout
    assert out.strip() == ("tok " * 4).strip()


def test_model_defaults_to_first_listed(gateway: Harness) -> None:
    assert f'"model": "{MODEL}"' in printed("curl", *base(gateway))
    assert "model='fake-model'" in printed("python", *base(gateway))
    # an explicit model is printed as given, without asking the gateway
    assert "model='other'" in printed("python", *base(gateway), "--model", "other")


def _continue_chat(model: dict[str, object], stream_messages: list[dict[str, str]]
                   ) -> httpx.Response:
    """The chat request Continue sends for a model entry (body and headers as Continue's
    OpenAI provider builds them; undefined fields are dropped by JSON.stringify)."""
    url = urljoin(str(model["apiBase"]), "chat/completions")
    body = {"messages": stream_messages, "model": model["model"], "max_tokens": 64,
            "temperature": 0.5, "stream": True, "stop": []}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {model['apiKey']}",
               "api-key": str(model["apiKey"])}
    return httpx.post(url, json=body, headers=headers, timeout=10, trust_env=False)


def _continue_autocomplete(model: dict[str, object]) -> httpx.Response:
    """Tab autocomplete: a raw fill-in-the-middle prompt to ``completions`` with stops."""
    url = urljoin(str(model["apiBase"]), "completions")
    body = {"model": model["model"], "max_tokens": 32, "temperature": 0.01, "stream": True,
            "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "\n\n"],
            "prompt": "<fim_prefix>def add(a, b):\n    return <fim_suffix>\n<fim_middle>"}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {model['apiKey']}",
               "api-key": str(model["apiKey"])}
    return httpx.post(url, json=body, headers=headers, timeout=10, trust_env=False)


def _check_stream(r: httpx.Response, obj: str) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == b"data: [DONE]\n\n"
    assert json.loads(events[0][len(b"data: "):])["object"] == obj


def test_continue_yaml_request_shapes(gateway: Harness, fake: FakeBackend) -> None:
    text = printed("continue", *base(gateway), "--autocomplete-model", MODEL)
    doc = yaml.safe_load(text)
    assert (doc["schema"], doc["name"]) == ("v1", "teamgpu") and doc["version"]
    chat = [m for m in doc["models"] if "chat" in m["roles"]]
    auto = [m for m in doc["models"] if "autocomplete" in m["roles"]]
    assert len(chat) == 1 and len(auto) == 1
    for m in doc["models"]:
        assert m["provider"] == "openai" and m["apiKey"] == gateway.user_key
        assert m["apiBase"] == gateway.url + "/v1/"
        assert m["model"] == MODEL
    assert auto[0]["useLegacyCompletionsEndpoint"] is True

    before = len(fake.requests)
    _check_stream(_continue_chat(chat[0], [{"role": "user", "content": "hello"}]),
                  "chat.completion.chunk")
    _check_stream(_continue_autocomplete(auto[0]), "text_completion")
    sent = fake.requests[before:]
    assert [s["path"] for s in sent] == ["/v1/chat/completions", "/v1/completions"]
    # the raw prompt and the stop sequences reach the backend unchanged (row F10)
    assert sent[1]["body"]["prompt"].startswith("<fim_prefix>def add")
    assert sent[1]["body"]["stop"][-1] == "\n\n"


def test_continue_json_request_shapes(gateway: Harness) -> None:
    doc = json.loads(printed("continue", *base(gateway), "--format", "json"))
    chat, auto = doc["models"][0], doc["tabAutocompleteModel"]
    assert chat["title"] and chat["provider"] == "openai" and auto["provider"] == "openai"
    assert chat["apiBase"].endswith("/v1/") and auto["model"] == MODEL
    _check_stream(_continue_chat(chat, [{"role": "user", "content": "hello"}]),
                  "chat.completion.chunk")
    _check_stream(_continue_autocomplete(auto), "text_completion")


def test_apibase_keeps_v1_under_url_resolution(gateway: Harness) -> None:
    """Without the trailing slash ``new URL("completions", ".../v1")`` drops ``/v1``."""
    doc = yaml.safe_load(printed("continue", "--url", gateway.url, "--key", gateway.user_key))
    assert urljoin(doc["models"][0]["apiBase"], "completions") == gateway.url + "/v1/completions"


def test_ca_cert_is_carried_into_every_form(gateway: Harness, tmp_path: object) -> None:
    from pathlib import Path

    ca = Path(str(tmp_path)) / "root.crt"
    ca.write_text("not used for http\n")
    args = [*base(gateway), "--model", MODEL, "--ca-cert", str(ca)]
    assert f"--cacert {ca}" in printed("curl", *args)
    assert f"export SSL_CERT_FILE={ca}" in printed("env", *args)
    snippet = printed("python", *args)
    assert f"verify=ssl.create_default_context(cafile={str(ca)!r})" in snippet
    compile(snippet, "<snippet>", "exec")
    doc = yaml.safe_load(printed("continue", *args))
    assert doc["models"][0]["requestOptions"] == {"caBundlePath": str(ca)}


def test_rejected_key_is_reported(gateway: Harness) -> None:
    r = CliRunner().invoke(connect, ["curl", "--url", gateway.url, "--key", "tg-nope"])
    assert r.exit_code == 1
    assert "401" in r.output


@pytest.mark.parametrize("url", ["ftp://x", "gpu.example.com"])
def test_bad_url(url: str) -> None:
    r = CliRunner().invoke(connect, ["env", "--url", url, "--key", "k"])
    assert r.exit_code == 2
