"""``teamgpu connect``: every printed form is checked against its client's format and,
where the gateway serves the client's endpoint today, run against a live gateway.

- curl: the printed command runs in bash; python: the snippet runs in a subprocess;
  env: the exports are sourced in bash, then an OpenAI SDK call reads them.
- continue: the YAML validates against Continue's published JSON schema
  (``data/continue-config-yaml.schema.json``); the requests Continue sends are replayed
  with its URL rule (``new URL(endpoint, apiBase)``, RFC 3986 resolution like
  :func:`urllib.parse.urljoin`) and the bodies and headers of its
  ``core/llm/llms/OpenAI.ts``: chat streams to ``chat/completions``, autocomplete (raw
  prompt, ``useLegacyCompletionsEndpoint``) to ``completions``, embed to ``embeddings``.
- aider: the exports are sourced; the request litellm sends for ``openai/<model>``
  (``POST {api_base}/chat/completions``, the prefix stripped) is replayed.
- opencode: ``{env:VAR}`` is substituted as its ``config/variable.ts`` does, then the
  request ``@ai-sdk/openai-compatible`` sends (``POST {baseURL}/chat/completions``) is
  replayed.
- claude-code and codex: the gateway does not serve ``/v1/messages`` and
  ``/v1/responses`` yet, so the tests pin the values (base URL, key, models, limits) and
  check that the key authenticates at the base URL they print (``GET /v1/models``, which
  Claude Code's model discovery also calls); the codex TOML validates against an excerpt
  of Codex's own ``config.schema.json``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result

from teamgpu.cli.connect import KEY_ENV, ModelCard, choose_models, connect
from tests.support.fake_backend import FakeBackend, ServerThread
from tests.support.harness import Harness, sse_events

MODEL = "fake-model"
CONTEXT = 2048  # the fake's max_model_len
DATA = Path(__file__).parent / "data"


def invoked(*args: str) -> Result:
    r = CliRunner().invoke(connect, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def printed(*args: str) -> str:
    return invoked(*args).stdout


def base(gateway: Harness) -> list[str]:
    return ["--url", gateway.url + "/v1", "--key", gateway.user_key]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "SSL_CERT", "HTTP_PROXY", "HTTPS_PROXY",
                                 "AIDER_", "ANTHROPIC_", "TEAMGPU_"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


def sourced(exports: str, names: list[str]) -> dict[str, str]:
    """The values of ``names`` after ``exports`` is sourced in bash."""
    script = exports + "\n" + "".join(f'printf "%s\\0" "${n}"\n' for n in names)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         timeout=30, check=True, env=clean_env()).stdout
    return dict(zip(names, out.split("\0")[:-1], strict=True))


def _check_stream(r: httpx.Response, obj: str) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == b"data: [DONE]\n\n"
    assert json.loads(events[0][len(b"data: "):])["object"] == obj


def _chat_stream(url: str, key: str, model: str, **extra: Any) -> httpx.Response:
    """The streaming chat request OpenAI-compatible clients send (Bearer key)."""
    body = {"model": model, "stream": True, "max_tokens": 16,
            "messages": [{"role": "user", "content": "hello"}], **extra}
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=10, trust_env=False)


# --- curl, python, env ----------------------------------------------------------------

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
    values = sourced(exports, ["OPENAI_BASE_URL", "OPENAI_API_KEY", KEY_ENV])
    assert values == {"OPENAI_BASE_URL": gateway.url + "/v1",
                      "OPENAI_API_KEY": gateway.user_key, KEY_ENV: gateway.user_key}
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
    # an explicit model is printed as given, with a note when the key's listing lacks it
    r = invoked("python", *base(gateway), "--model", "other")
    assert "model='other'" in r.stdout
    assert "other is not in" in r.stderr


# --- continue -------------------------------------------------------------------------

CONTINUE_SCHEMA = json.loads((DATA / "continue-config-yaml.schema.json").read_text())
SECRET = f"${{{{ secrets.{KEY_ENV} }}}}"


def continue_config(*args: str) -> tuple[dict[str, Any], str]:
    """The printed ``config.yaml`` (validated against Continue's schema) and the
    ``~/.continue/.env`` line printed for it."""
    r = invoked("continue", *args)
    doc = yaml.safe_load(r.stdout)
    jsonschema.validate(doc, CONTINUE_SCHEMA)
    env_lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{KEY_ENV}=")]
    assert len(env_lines) == 1, r.stderr
    return doc, env_lines[0]


def resolve_secrets(model: dict[str, Any], dot_env_line: str) -> dict[str, Any]:
    """A model entry with ``${{ secrets.NAME }}`` replaced from a ``.env`` line, as
    Continue's LocalPlatformClient does."""
    name, value = dot_env_line.split("=", 1)
    return {k: v.replace(f"${{{{ secrets.{name} }}}}", value) if isinstance(v, str) else v
            for k, v in model.items()}


def by_role(doc: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [m for m in doc["models"] if role in m["roles"]]


def _continue_headers(model: dict[str, Any]) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {model['apiKey']}",
            "api-key": str(model["apiKey"])}


def _continue_chat(model: dict[str, Any]) -> httpx.Response:
    """The chat request Continue sends for a model entry (body and headers as Continue's
    OpenAI provider builds them; undefined fields are dropped by JSON.stringify)."""
    url = urljoin(str(model["apiBase"]), "chat/completions")
    body = {"messages": [{"role": "user", "content": "hello"}], "model": model["model"],
            "max_tokens": 64, "temperature": 0.5, "stream": True, "stop": []}
    return httpx.post(url, json=body, headers=_continue_headers(model), timeout=10,
                      trust_env=False)


def _continue_autocomplete(model: dict[str, Any]) -> httpx.Response:
    """Tab autocomplete: a raw fill-in-the-middle prompt to ``completions`` with stops."""
    url = urljoin(str(model["apiBase"]), "completions")
    body = {"model": model["model"], "max_tokens": 32, "temperature": 0.01, "stream": True,
            "stop": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "\n\n"],
            "prompt": "<fim_prefix>def add(a, b):\n    return <fim_suffix>\n<fim_middle>"}
    return httpx.post(url, json=body, headers=_continue_headers(model), timeout=10,
                      trust_env=False)


def _continue_embed(model: dict[str, Any]) -> httpx.Response:
    """Indexing: the openai SDK's ``embeddings.create`` at ``{apiBase}embeddings``."""
    url = urljoin(str(model["apiBase"]), "embeddings")
    return httpx.post(url, json={"input": ["def add(a, b):", "return a + b"],
                                 "model": model["model"]},
                      headers=_continue_headers(model), timeout=10, trust_env=False)


def test_continue_yaml_request_shapes(gateway: Harness, fake: FakeBackend) -> None:
    doc, env_line = continue_config(*base(gateway), "--autocomplete-model", MODEL)
    assert (doc["schema"], doc["name"]) == ("v1", "teamgpu") and doc["version"]
    assert env_line == f"{KEY_ENV}={gateway.user_key}"
    chat, auto = by_role(doc, "chat"), by_role(doc, "autocomplete")
    assert len(chat) == 1 and len(auto) == 1 and chat[0] is not auto[0]
    assert chat[0]["roles"] == ["chat", "edit", "apply"]
    for m in doc["models"]:
        assert m["provider"] == "openai" and m["apiKey"] == SECRET  # the key stays out
        assert m["apiBase"] == gateway.url + "/v1/"
        assert m["model"] == MODEL
    assert auto[0]["useLegacyCompletionsEndpoint"] is True
    assert "useLegacyCompletionsEndpoint" not in chat[0]  # it would send chat raw
    assert chat[0]["defaultCompletionOptions"] == {"contextLength": CONTEXT,
                                                   "maxTokens": CONTEXT // 4}
    assert not by_role(doc, "embed") and not by_role(doc, "rerank")  # no model has them

    before = len(fake.requests)
    _check_stream(_continue_chat(resolve_secrets(chat[0], env_line)), "chat.completion.chunk")
    _check_stream(_continue_autocomplete(resolve_secrets(auto[0], env_line)), "text_completion")
    sent = fake.requests[before:]
    assert [s["path"] for s in sent] == ["/v1/chat/completions", "/v1/completions"]
    # the raw prompt and the stop sequences reach the backend unchanged (row F10)
    assert sent[1]["body"]["prompt"].startswith("<fim_prefix>def add")
    assert sent[1]["body"]["stop"][-1] == "\n\n"


def test_continue_embed_model_flag_and_request(gateway: Harness, fake: FakeBackend) -> None:
    doc, env_line = continue_config(*base(gateway), "--embed-model", MODEL)
    (embed,) = by_role(doc, "embed")
    assert embed["roles"] == ["embed"] and "useLegacyCompletionsEndpoint" not in embed
    r = _continue_embed(resolve_secrets(embed, env_line))
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2
    assert fake.requests[-1]["path"] == "/v1/embeddings"


def test_continue_json_request_shapes(gateway: Harness) -> None:
    r = invoked("continue", *base(gateway), "--format", "json")
    doc = json.loads(r.stdout)
    chat, auto = doc["models"][0], doc["tabAutocompleteModel"]
    assert chat["title"] and chat["provider"] == "openai" and auto["provider"] == "openai"
    assert chat["apiBase"].endswith("/v1/") and auto["model"] == MODEL
    assert chat["apiKey"] == gateway.user_key  # config.json has no secrets syntax
    assert "config.json" in r.stderr
    _check_stream(_continue_chat(chat), "chat.completion.chunk")
    _check_stream(_continue_autocomplete(auto), "text_completion")


def test_apibase_keeps_v1_under_url_resolution(gateway: Harness) -> None:
    """Without the trailing slash ``new URL("completions", ".../v1")`` drops ``/v1``."""
    doc, _ = continue_config("--url", gateway.url, "--key", gateway.user_key)
    assert urljoin(doc["models"][0]["apiBase"], "completions") == gateway.url + "/v1/completions"


LISTING = [  # a multi-model server as /v1/models lists it, with teamgpu roles
    {"id": "bge-small", "object": "model", "teamgpu": {"roles": ["embed"]}},
    {"id": "qwen-coder-1.5b", "object": "model", "max_model_len": 8192,
     "teamgpu": {"roles": ["autocomplete"]}},
    {"id": "qwen-coder-32b", "object": "model", "max_model_len": 32768,
     "teamgpu": {"roles": ["chat", "edit", "apply"]}},
    {"id": "bge-reranker", "object": "model", "teamgpu": {"roles": ["rerank"]}},
    {"id": "llama-8b", "object": "model", "max_model_len": 16384},
]


class ModelsOnly:
    """An ASGI app that answers ``GET /v1/models`` with :data:`LISTING` and nothing else."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                await send({"type": msg["type"] + ".complete"})
                if msg["type"] == "lifespan.shutdown":
                    return
        ok = scope["path"] == "/v1/models"
        body = json.dumps({"object": "list", "data": LISTING} if ok else {}).encode()
        await send({"type": "http.response.start", "status": 200 if ok else 404,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def roles_server() -> Iterator[str]:
    with ServerThread(ModelsOnly()) as t:
        yield t.url + "/v1"


def test_continue_roles_from_model_cards(roles_server: str) -> None:
    doc, _ = continue_config("--url", roles_server, "--key", "tg-x")
    assert [(m["model"], m["roles"]) for m in doc["models"]] == [
        ("qwen-coder-32b", ["chat", "edit", "apply"]),
        ("qwen-coder-1.5b", ["autocomplete"]),
        ("bge-small", ["embed"]),
        ("bge-reranker", ["rerank"]),
    ]
    chat, auto, _, rerank = doc["models"]
    assert chat["defaultCompletionOptions"] == {"contextLength": 32768, "maxTokens": 8192}
    assert auto["defaultCompletionOptions"] == {"contextLength": 8192}
    assert rerank["provider"] == "vllm"  # vLLM answers rerank with `results`
    assert len({m["name"] for m in doc["models"]}) == 4  # names are unique


def test_continue_role_flags_override(roles_server: str) -> None:
    doc, _ = continue_config("--url", roles_server, "--key", "tg-x", "--chat-model",
                             "llama-8b", "--autocomplete-model", "llama-8b",
                             "--embed-model", "bge-small")
    assert [(m["model"], m["roles"]) for m in doc["models"]] == [
        ("llama-8b", ["chat", "edit", "apply"]),
        ("llama-8b", ["autocomplete"]),
        ("bge-small", ["embed"]),
        ("bge-reranker", ["rerank"]),
    ]
    # --model is the same option as --chat-model
    doc, _ = continue_config("--url", roles_server, "--key", "tg-x", "--model", "llama-8b")
    assert doc["models"][0]["model"] == "llama-8b"


def test_choose_models_fallbacks() -> None:
    untagged = [ModelCard("a"), ModelCard("b")]
    assert choose_models(untagged, {}) == {
        "chat": "a", "edit": "a", "apply": "a", "autocomplete": "a",
        "embed": None, "rerank": None}
    # an embed-only model listed first is not taken for chat
    mixed = [ModelCard("emb", ("embed",)), ModelCard("gen"), ModelCard("ed", ("edit",))]
    assert choose_models(mixed, {}) == {
        "chat": "gen", "edit": "ed", "apply": "gen", "autocomplete": "gen",
        "embed": "emb", "rerank": None}
    given = choose_models(mixed, {"chat": "x", "embed": "y"})
    assert (given["chat"], given["apply"], given["embed"]) == ("x", "x", "y")


def test_model_card_parsing_is_defensive() -> None:
    card = ModelCard.from_json({"id": "m", "max_model_len": "big",
                                "teamgpu": {"roles": ["chat", 3]}})
    assert card == ModelCard("m", ("chat",), None)
    assert ModelCard.from_json({"id": "m", "teamgpu": "chat"}).roles == ()


# --- claude-code ----------------------------------------------------------------------

CLAUDE_MODEL_VARS = ["ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                     "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL",
                     "ANTHROPIC_SMALL_FAST_MODEL"]


def test_claude_code_exports(gateway: Harness) -> None:
    exports = printed("claude-code", *base(gateway))
    names = re.findall(r"^export (\w+)=", exports, re.MULTILINE)
    values = sourced(exports, names)
    assert values == {
        "ANTHROPIC_BASE_URL": gateway.url,  # the base without /v1: Claude Code appends it
        "ANTHROPIC_AUTH_TOKEN": gateway.user_key,  # sent as Authorization: Bearer
        **dict.fromkeys(CLAUDE_MODEL_VARS, MODEL),
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(CONTEXT // 4),
        "CLAUDE_CODE_AUTO_COMPACT_WINDOW": str(CONTEXT),
    }
    # Claude Code posts to {ANTHROPIC_BASE_URL}/v1/messages (and .../count_tokens), which
    # the gateway does not serve yet; the base URL and the key are checked where it does
    # answer: Claude Code's gateway model discovery, GET {ANTHROPIC_BASE_URL}/v1/models
    url = values["ANTHROPIC_BASE_URL"]
    assert url + "/v1/messages" == gateway.url + "/v1/messages"
    for headers in ({"Authorization": f"Bearer {values['ANTHROPIC_AUTH_TOKEN']}"},
                    {"x-api-key": values["ANTHROPIC_AUTH_TOKEN"]}):  # ANTHROPIC_API_KEY's way
        r = httpx.get(url + "/v1/models", headers={"anthropic-version": "2023-06-01",
                                                   **headers}, timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        assert values["ANTHROPIC_MODEL"] in [m["id"] for m in r.json()["data"]]


def test_claude_code_settings_json(gateway: Harness) -> None:
    r = invoked("claude-code", *base(gateway), "--format", "json")
    doc = json.loads(r.stdout)
    assert set(doc) == {"$schema", "env"}
    assert doc["$schema"] == "https://json.schemastore.org/claude-code-settings.json"
    # settings.json env values are strings (SchemaStore's schema types each one string)
    assert all(isinstance(v, str) for v in doc["env"].values())
    exports = printed("claude-code", *base(gateway))
    assert doc["env"] == sourced(exports, list(doc["env"]))
    assert "settings.json" in r.stderr


# --- codex ----------------------------------------------------------------------------

CODEX_SCHEMA = json.loads((DATA / "codex-config.schema.excerpt.json").read_text())


def test_codex_toml(gateway: Harness) -> None:
    r = invoked("codex", *base(gateway))
    doc = tomllib.loads(r.stdout)
    jsonschema.validate(doc, CODEX_SCHEMA)
    assert doc == {
        "model": MODEL, "model_provider": "teamgpu", "model_context_window": CONTEXT,
        "model_providers": {"teamgpu": {
            "name": "teamgpu", "base_url": gateway.url + "/v1", "env_key": KEY_ENV,
            "wire_api": "responses"}}}
    assert gateway.user_key not in r.stdout  # the file names the variable, not the key
    assert r.stderr.splitlines() == [f"export {KEY_ENV}={gateway.user_key}"]
    # Codex sends POST {base_url}/responses with Authorization: Bearer $TEAMGPU_API_KEY;
    # /v1/responses is not served yet, so check the key at that base URL's /models
    provider = doc["model_providers"]["teamgpu"]
    key = sourced(r.stderr, [provider["env_key"]])[provider["env_key"]]
    assert provider["base_url"] + "/responses" == gateway.url + "/v1/responses"
    m = httpx.get(provider["base_url"] + "/models", headers={"Authorization": f"Bearer {key}"},
                  timeout=10, trust_env=False)
    assert m.status_code == 200 and doc["model"] in [c["id"] for c in m.json()["data"]]


def test_codex_schema_excerpt_rejects_what_codex_rejects() -> None:
    """The excerpt is strict where Codex is: ``wire_api = "chat"`` and unknown keys."""
    ok = {"model": "m", "model_provider": "p",
          "model_providers": {"p": {"name": "p", "base_url": "http://h/v1"}}}
    jsonschema.validate(ok, CODEX_SCHEMA)
    for bad in ({**ok, "model_provder": "p"},
                {**ok, "model_providers": {"p": {"base_url": "x", "wire_api": "chat"}}},
                {**ok, "model_providers": {"p": {"base_url": "x", "api_key": "k"}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, CODEX_SCHEMA)


# --- aider ----------------------------------------------------------------------------

def test_aider_exports_then_litellm_request(gateway: Harness, fake: FakeBackend) -> None:
    exports = printed("aider", *base(gateway))
    names = re.findall(r"^export (\w+)=", exports, re.MULTILINE)
    values = sourced(exports, names)
    assert values == {"AIDER_OPENAI_API_BASE": gateway.url + "/v1",
                      "AIDER_OPENAI_API_KEY": gateway.user_key,
                      "AIDER_MODEL": f"openai/{MODEL}"}
    # litellm's openai/ provider: POST {api_base}/chat/completions, prefix stripped
    model = values["AIDER_MODEL"].removeprefix("openai/")
    r = _chat_stream(values["AIDER_OPENAI_API_BASE"] + "/chat/completions",
                     values["AIDER_OPENAI_API_KEY"], model, temperature=0,
                     stream_options={"include_usage": True})
    _check_stream(r, "chat.completion.chunk")
    assert fake.requests[-1]["body"]["model"] == MODEL


def test_aider_conf_yml_and_metadata(gateway: Harness) -> None:
    r = invoked("aider", *base(gateway), "--format", "yaml")
    assert yaml.safe_load(r.stdout) == {"openai-api-base": gateway.url + "/v1",
                                        "model": f"openai/{MODEL}"}
    assert gateway.user_key not in r.stdout
    assert r.stderr.splitlines() == [f"export AIDER_OPENAI_API_KEY={gateway.user_key}"]
    meta = json.loads(printed("aider", *base(gateway), "--format", "json"))
    assert meta == {f"openai/{MODEL}": {
        "max_tokens": CONTEXT // 4, "max_input_tokens": CONTEXT,
        "max_output_tokens": CONTEXT // 4, "input_cost_per_token": 0,
        "output_cost_per_token": 0, "litellm_provider": "openai", "mode": "chat"}}


# --- opencode -------------------------------------------------------------------------

# the keys opencode's packages/opencode/src/config/provider.ts declares (Info, Model)
OPENCODE_PROVIDER_KEYS = {"api", "name", "env", "id", "npm", "whitelist", "blacklist",
                          "discoverModels", "options", "models"}
OPENCODE_MODEL_KEYS = {"id", "name", "family", "release_date", "attachment", "reasoning",
                       "temperature", "tool_call", "interleaved", "cost", "limit",
                       "modalities", "experimental", "status", "provider", "options",
                       "headers", "variants"}


def opencode_substitute(text: str, env: dict[str, str]) -> str:
    """opencode's ``{env:VAR}`` substitution on the config text (``config/variable.ts``:
    a missing variable becomes the empty string)."""
    return re.sub(r"\{env:([^}]+)\}", lambda m: env.get(m.group(1), ""), text)


def test_opencode_json_then_request(gateway: Harness, fake: FakeBackend) -> None:
    r = invoked("opencode", *base(gateway))
    assert gateway.user_key not in r.stdout
    doc = json.loads(r.stdout)
    assert doc["$schema"] == "https://opencode.ai/config.json"
    assert doc["model"] == doc["small_model"] == f"teamgpu/{MODEL}"  # provider/model
    provider = doc["provider"]["teamgpu"]
    assert set(provider) <= OPENCODE_PROVIDER_KEYS
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": gateway.url + "/v1",
                                   "apiKey": f"{{env:{KEY_ENV}}}"}
    assert provider["models"] == {MODEL: {"name": MODEL, "limit": {
        "context": CONTEXT, "output": CONTEXT // 4}}}
    for entry in provider["models"].values():
        assert set(entry) <= OPENCODE_MODEL_KEYS
    notes = r.stderr.splitlines()
    assert f"export {KEY_ENV}={gateway.user_key}" in notes
    env = sourced("\n".join(n for n in notes if n.startswith("export ")), [KEY_ENV])
    options = json.loads(opencode_substitute(r.stdout, env))["provider"]["teamgpu"]["options"]
    # @ai-sdk/openai-compatible: POST {baseURL}/chat/completions, Bearer apiKey
    _check_stream(_chat_stream(options["baseURL"] + "/chat/completions", options["apiKey"],
                               doc["model"].split("/", 1)[1],
                               stream_options={"include_usage": True}),
                  "chat.completion.chunk")
    assert fake.requests[-1]["path"] == "/v1/chat/completions"


def test_opencode_lists_every_chat_model(roles_server: str) -> None:
    doc = json.loads(printed("opencode", "--url", roles_server, "--key", "tg-x"))
    models = doc["provider"]["teamgpu"]["models"]
    assert list(models) == ["qwen-coder-32b", "qwen-coder-1.5b", "llama-8b"]  # no embed
    assert models["llama-8b"]["limit"] == {"context": 16384, "output": 4096}
    assert doc["model"] == "teamgpu/qwen-coder-32b"


# --- all targets ----------------------------------------------------------------------

def test_ca_cert_is_carried_into_every_form(gateway: Harness, tmp_path: Path) -> None:
    ca = tmp_path / "root.crt"
    ca.write_text("not used for http\n")
    args = [*base(gateway), "--model", MODEL, "--ca-cert", str(ca)]
    assert f"--cacert {ca}" in printed("curl", *args)
    assert f"export SSL_CERT_FILE={ca}" in printed("env", *args)
    snippet = printed("python", *args)
    assert f"verify=ssl.create_default_context(cafile={str(ca)!r})" in snippet
    compile(snippet, "<snippet>", "exec")
    doc, _ = continue_config(*args)
    assert doc["models"][0]["requestOptions"] == {"caBundlePath": str(ca)}
    assert f"export NODE_EXTRA_CA_CERTS={ca}" in printed("claude-code", *args)
    assert f"export CODEX_CA_CERTIFICATE={ca}" in invoked("codex", *args).stderr
    assert f"export SSL_CERT_FILE={ca}" in printed("aider", *args)
    assert f"export NODE_EXTRA_CA_CERTS={ca}" in invoked("opencode", *args).stderr


def test_format_must_fit_the_target(gateway: Harness) -> None:
    r = CliRunner().invoke(connect, ["codex", *base(gateway), "--format", "yaml"])
    assert r.exit_code == 2
    assert "codex prints toml" in r.output


def test_rejected_key_is_reported(gateway: Harness) -> None:
    r = CliRunner().invoke(connect, ["curl", "--url", gateway.url, "--key", "tg-nope"])
    assert r.exit_code == 1
    assert "401" in r.output


@pytest.mark.parametrize("url", ["ftp://x", "gpu.example.com"])
def test_bad_url(url: str) -> None:
    r = CliRunner().invoke(connect, ["env", "--url", url, "--key", "k"])
    assert r.exit_code == 2


def test_without_url_the_recorded_server_is_used(gateway: Harness, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """No --url and no OPENAI_BASE_URL: the server that runs on this machine (the data
    directory's server.json, as doctor reads it); with none recorded, exit 2 and why."""
    from teamgpu.cli.server_record import ServerRecord, write_record

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("TEAMGPU_DATA_DIR", str(tmp_path / "data"))
    r = CliRunner().invoke(connect, ["env", "--key", gateway.user_key])
    assert r.exit_code == 2
    assert "give --url (or set OPENAI_BASE_URL)" in r.output
    assert "no running teamgpu server is recorded" in r.output
    write_record(tmp_path / "data", ServerRecord(kind="serve", pid=os.getpid(),
                                                 gateway_url=gateway.url, backends=[]))
    exports = printed("env", "--key", gateway.user_key)
    assert sourced(exports, ["OPENAI_BASE_URL"])["OPENAI_BASE_URL"] == gateway.url + "/v1"
