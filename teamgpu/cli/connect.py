"""``teamgpu connect TARGET``: ready-to-use client set-up for the team gateway.

The configuration (a file, or shell exports to ``source``) goes to stdout, so it can be
redirected; where the key is kept out of that file, the line that puts it in place
(``export TEAMGPU_API_KEY=...`` or a ``.env`` line) goes to stderr, with where to save
the file. Every form was checked against the client's own format, as named here:

- ``continue``: Continue's ``config.yaml`` (schema v1), one entry per role: chat, edit,
  apply (the chat model unless a model carries those roles), autocomplete (a separate
  entry with ``useLegacyCompletionsEndpoint``, so the raw fill-in-the-middle prompt goes
  to ``/v1/completions``), embed and rerank (only when a model has the role or a flag
  names one). Provider ``openai`` (``vllm`` for rerank: vLLM answers rerank with
  ``results``, which only Continue's vllm provider reads); ``apiBase`` ends in ``/v1/``
  because Continue builds URLs as ``new URL("chat/completions", apiBase)``; ``apiKey``
  is ``${{ secrets.TEAMGPU_API_KEY }}``, resolved from ``~/.continue/.env``. Checked
  against Continue v2.1.0 (VS Code, tag ``v2.1.0-vscode``, June 2026): docs/reference.mdx,
  docs/faqs.mdx (secrets), core/llm/llms/OpenAI.ts and Vllm.ts,
  core/config/yaml/LocalPlatformClient.ts; validated with the JSON schema that
  ``@continuedev/config-yaml`` 1.42.0 generates. ``--format json`` prints the older
  ``config.json`` (``models`` plus ``tabAutocompleteModel``, key inline) for releases
  before ``config.yaml``.
- ``claude-code``: Claude Code speaks the Anthropic Messages API (``/v1/messages``,
  ``/v1/messages/count_tokens``) to ``ANTHROPIC_BASE_URL``, the gateway's base without
  ``/v1``, with ``ANTHROPIC_AUTH_TOKEN`` sent as ``Authorization: Bearer``. The model
  goes in ``ANTHROPIC_MODEL`` and in the alias variables ``ANTHROPIC_DEFAULT_OPUS_MODEL``,
  ``_SONNET_`` (since 1.0.88) and ``_HAIKU_`` (by 2.0.17; background tasks), plus the
  deprecated ``ANTHROPIC_SMALL_FAST_MODEL`` for older releases, so that no request names
  a Claude model the gateway does not serve. With a known context length,
  ``CLAUDE_CODE_MAX_OUTPUT_TOKENS`` and ``CLAUDE_CODE_AUTO_COMPACT_WINDOW`` keep requests
  inside it. Shell exports, or (``--format json``) the ``env`` block of
  ``~/.claude/settings.json``. Checked against Claude Code 2.1.240 (CHANGELOG.md of
  anthropics/claude-code, August 2026), code.claude.com/docs/en/llm-gateway.md and
  model-config, and SchemaStore's claude-code-settings.json.
- ``codex``: ``~/.codex/config.toml`` with ``model``, ``model_provider = "teamgpu"`` and
  a ``[model_providers.teamgpu]`` table (``base_url`` ending in ``/v1``,
  ``env_key = "TEAMGPU_API_KEY"``, ``wire_api = "responses"``: Codex removed
  ``"chat"`` in 2026 and now sends ``POST {base_url}/responses``). Checked against
  openai/codex codex-rs/model-provider-info/src/lib.rs and codex-rs/core/config.schema.json
  (stored copies of main, npm release 0.169.0).
- ``aider``: shell exports ``AIDER_OPENAI_API_BASE``, ``AIDER_OPENAI_API_KEY`` and
  ``AIDER_MODEL=openai/<model>`` (aider's own names for ``--openai-api-base``,
  ``--openai-api-key`` and ``--model``; litellm's ``openai/`` prefix selects the
  OpenAI-compatible client); ``--format yaml`` prints ``.aider.conf.yml`` (key from the
  environment); ``--format json`` prints ``.aider.model.metadata.json`` with the context
  length. Checked against aider 0.86.2: aider/website/docs/llms/openai-compat.md,
  docs/config/options.md, docs/config/adv-model-settings.md, aider/args.py, aider/main.py.
- ``opencode``: ``opencode.json`` with a custom provider ``teamgpu`` (``"npm":
  "@ai-sdk/openai-compatible"``, ``options.baseURL``, ``options.apiKey`` =
  ``{env:TEAMGPU_API_KEY}``, one ``models`` entry per chat model with ``limit``).
  Checked against opencode 1.18 (anomalyco/opencode, formerly sst/opencode):
  packages/web/src/content/docs/providers.mdx ("Custom provider"),
  packages/opencode/src/config/provider.ts and variable.ts.
- ``env``: ``export OPENAI_BASE_URL=... OPENAI_API_KEY=... TEAMGPU_API_KEY=...``, plus
  ``SSL_CERT_FILE`` when ``--ca-cert`` is given (httpx, and so the Python SDK, honours it).
- ``curl``: one streaming chat request. ``python``: a snippet with the ``openai`` package.

Models come from ``GET /v1/models`` for the key: a card may carry
``"teamgpu": {"roles": [...]}``, and the first model with a role gets it; without roles
the first listed model serves chat and autocomplete. ``--model``/``--chat-model`` (for
chat, edit and apply), ``--autocomplete-model``, ``--embed-model`` and ``--rerank-model``
override the choice. The listing is always read: it checks the URL and the key.
A card's ``max_model_len`` becomes the context length, and a quarter of it the output
budget (vLLM refuses a request whose prompt plus ``max_tokens`` exceeds it).
"""

from __future__ import annotations

import json
import shlex
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from teamgpu.cli.common import gateway_or_recorded
from teamgpu.clientbench import BenchError, normalize_base_url

TARGETS = ("continue", "claude-code", "codex", "aider", "opencode", "env", "curl", "python")
# the formats each target prints, its default first
FORMATS: dict[str, tuple[str, ...]] = {
    "continue": ("yaml", "json"), "claude-code": ("shell", "json"), "codex": ("toml",),
    "aider": ("shell", "yaml", "json"), "opencode": ("json",), "env": ("shell",),
    "curl": ("shell",), "python": ("python",),
}
ROLES = ("chat", "edit", "apply", "autocomplete", "embed", "rerank")
KEY_ENV = "TEAMGPU_API_KEY"  # clients that can read the key from the environment use this
PROVIDER_ID = "teamgpu"
QUESTION = "What is the capital of France?"
EXAMPLE_MAX_TOKENS = 64  # every example sets it (the README's, up's banner, connect's)


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``GET /v1/models``: its id, its teamgpu roles, its context length."""

    id: str
    roles: tuple[str, ...] = ()
    max_model_len: int | None = None

    @classmethod
    def from_json(cls, card: dict[str, Any]) -> ModelCard:
        meta = card.get("teamgpu")
        roles = meta.get("roles") if isinstance(meta, dict) else None
        length = card.get("max_model_len")
        return cls(id=str(card["id"]),
                   roles=tuple(r for r in roles if isinstance(r, str))
                   if isinstance(roles, list) else (),
                   max_model_len=length if isinstance(length, int) and length > 0 else None)

    @property
    def generative(self) -> bool:
        """Untagged, or tagged with a role other than embed/rerank."""
        return not self.roles or not set(self.roles) <= {"embed", "rerank"}


@dataclass(frozen=True)
class Setup:
    """What ``connect`` prints: ``text`` to stdout, ``notes`` (one per line) to stderr."""

    text: str
    notes: tuple[str, ...] = ()


def output_tokens(context_tokens: int) -> int:
    """The output budget printed for a model of ``context_tokens``: a quarter of it."""
    return max(1, context_tokens // 4)


def fetch_models(base_url: str, key: str, ca_cert: Path | None = None) -> list[ModelCard]:
    """The model cards ``GET {base_url}/models`` lists for ``key``.

    Raises:
        click.ClickException: unreachable, TLS failure, or a non-200 answer.
    """
    verify: Any = True
    if base_url.startswith("https://"):
        verify = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    try:
        r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"},
                      verify=verify, timeout=10.0, trust_env=False)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {base_url}/models: {exc}") from exc
    if r.status_code != 200:
        raise click.ClickException(
            f"GET {base_url}/models answered {r.status_code}: {r.text[:300]}")
    return [ModelCard.from_json(m) for m in r.json().get("data") or [] if "id" in m]


def choose_models(cards: list[ModelCard], given: dict[str, str | None]) -> dict[str, str | None]:
    """The model for each of :data:`ROLES`: the one ``given`` for it, else the first card
    with the role; else chat falls back to the first generative card, edit, apply and
    autocomplete to the chat model, and embed and rerank to none. A chat model ``given``
    also serves edit and apply.

    Raises:
        click.ClickException: no model for chat.
    """
    def tagged(role: str) -> str | None:
        return next((c.id for c in cards if role in c.roles), None)

    chosen: dict[str, str | None] = {}
    chat = given.get("chat") or tagged("chat") or next(
        (c.id for c in cards if c.generative), None)
    if chat is None:
        raise click.ClickException("/v1/models lists no chat model for this key; "
                                   "name one with --model")
    chosen["chat"] = chat
    for role in ("edit", "apply"):  # a chat model named by flag serves them too
        chosen[role] = given.get(role) or given.get("chat") or tagged(role) or chat
    chosen["autocomplete"] = given.get("autocomplete") or tagged("autocomplete") or chat
    for role in ("embed", "rerank"):
        chosen[role] = given.get(role) or tagged(role)
    return chosen


def _context(cards: list[ModelCard], model: str | None) -> int | None:
    return next((c.max_model_len for c in cards if c.id == model), None)


def _shell(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def _yaml(doc: dict[str, Any]) -> str:
    return str(yaml.safe_dump(doc, sort_keys=False))


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(value, ensure_ascii=False)


# --- continue -------------------------------------------------------------------------

def _continue_model_fields(base_url: str, key: str, ca_cert: Path | None) -> dict[str, Any]:
    """The fields every Continue.dev model entry shares. ``apiBase`` ends in ``/``:
    Continue joins paths with ``new URL(path, apiBase)``, which drops a last segment
    without it."""
    common: dict[str, Any] = {"provider": "openai", "apiBase": base_url + "/", "apiKey": key}
    if ca_cert:
        common["requestOptions"] = {"caBundlePath": str(ca_cert)}
    return common


def continue_yaml(base_url: str, key: str, models: dict[str, str | None],
                  cards: list[ModelCard] | None = None, ca_cert: Path | None = None) -> Setup:
    """Continue's ``config.yaml`` (schema v1) with one entry per model and role group."""
    cards = cards or []
    common = _continue_model_fields(base_url, f"${{{{ secrets.{KEY_ENV} }}}}", ca_cert)
    entries: list[dict[str, Any]] = []
    by_model: dict[str, list[str]] = {}
    for role in ("chat", "edit", "apply"):
        by_model.setdefault(str(models[role]), []).append(role)
    for model, roles in by_model.items():
        entry: dict[str, Any] = {"name": f"teamgpu {model}", "model": model, **common,
                                 "roles": roles}
        ctx = _context(cards, model)
        if ctx:
            entry["defaultCompletionOptions"] = {"contextLength": ctx,
                                                 "maxTokens": output_tokens(ctx)}
        entries.append(entry)
    auto = str(models["autocomplete"])
    entry = {"name": f"teamgpu {auto} (autocomplete)", "model": auto, **common,
             "roles": ["autocomplete"], "useLegacyCompletionsEndpoint": True}
    if ctx := _context(cards, auto):
        entry["defaultCompletionOptions"] = {"contextLength": ctx}
    entries.append(entry)
    for role in ("embed", "rerank"):
        if model_or_none := models[role]:
            provider = {"provider": "vllm"} if role == "rerank" else {}
            entries.append({"name": f"teamgpu {model_or_none} ({role})",
                            "model": model_or_none, **common, **provider, "roles": [role]})
    doc = {"name": "teamgpu", "version": "1.0.0", "schema": "v1", "models": entries}
    header = ("# Continue config for teamgpu: save as ~/.continue/config.yaml (or merge the\n"
              f"# models into yours). ${{{{ secrets.{KEY_ENV} }}}} is read from "
              "~/.continue/.env.\n")
    return Setup(header + _yaml(doc), (
        "Add this line to ~/.continue/.env (IDE extensions do not see shell variables):",
        f"{KEY_ENV}={key}"))


def continue_json(base_url: str, key: str, chat_model: str, autocomplete_model: str,
                  ca_cert: Path | None = None) -> Setup:
    """The older Continue.dev ``config.json`` (``models`` and ``tabAutocompleteModel``)."""
    common = _continue_model_fields(base_url, key, ca_cert)
    doc = {
        "models": [{"title": f"teamgpu {chat_model}", "model": chat_model, **common}],
        "tabAutocompleteModel": {"title": f"teamgpu {autocomplete_model} (autocomplete)",
                                 "model": autocomplete_model, **common,
                                 "useLegacyCompletionsEndpoint": True},
    }
    return Setup(json.dumps(doc, indent=2), ("Save as ~/.continue/config.json.",))


# --- claude-code ----------------------------------------------------------------------

def claude_code_env(base_url: str, key: str, model: str, context_tokens: int | None,
                    ca_cert: Path | None = None) -> dict[str, str]:
    """The environment Claude Code needs to use the gateway's ``/v1/messages``."""
    env = {"ANTHROPIC_BASE_URL": base_url.removesuffix("/v1"),
           "ANTHROPIC_AUTH_TOKEN": key,
           "ANTHROPIC_MODEL": model,
           "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
           "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
           "ANTHROPIC_SMALL_FAST_MODEL": model}
    if context_tokens:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(output_tokens(context_tokens))
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(context_tokens)
    if ca_cert:
        env["NODE_EXTRA_CA_CERTS"] = str(ca_cert)
    return env


def claude_code(env: dict[str, str], fmt: str) -> Setup:
    """Shell exports, or the ``env`` block of ``~/.claude/settings.json``."""
    if fmt == "json":
        doc = {"$schema": "https://json.schemastore.org/claude-code-settings.json", "env": env}
        return Setup(json.dumps(doc, indent=2), (
            "Save as ~/.claude/settings.json, or merge the env block into yours.",
            "The gateway must serve the Anthropic Messages API (/v1/messages)."))
    header = ("# Claude Code through teamgpu: source this (or add it to your shell profile),\n"
              "# then run `claude`. The gateway must serve /v1/messages.\n")
    return Setup(header + _shell(env))


# --- codex ----------------------------------------------------------------------------

def codex_toml(base_url: str, model: str, context_tokens: int | None) -> str:
    """``~/.codex/config.toml``: a ``teamgpu`` provider speaking the Responses API, with
    the key read from :data:`KEY_ENV`. Root keys come before the table, as TOML needs."""
    lines = ["# Codex config for teamgpu: save as ~/.codex/config.toml (or merge it into yours).",
             f"# Codex reads the key from ${KEY_ENV} and sends POST {base_url}/responses.",
             f"model = {_toml_str(model)}",
             f"model_provider = {_toml_str(PROVIDER_ID)}"]
    if context_tokens:
        lines.append(f"model_context_window = {context_tokens}")
    lines += ["", f"[model_providers.{PROVIDER_ID}]",
              f"name = {_toml_str(PROVIDER_ID)}",
              f"base_url = {_toml_str(base_url)}",
              f"env_key = {_toml_str(KEY_ENV)}",
              'wire_api = "responses"']
    return "\n".join(lines)


# --- aider ----------------------------------------------------------------------------

def aider_setup(base_url: str, key: str, model: str, context_tokens: int | None, fmt: str,
                ca_cert: Path | None = None) -> Setup:
    """aider's settings under their ``AIDER_*`` names, as ``.aider.conf.yml`` keys, or its
    ``.aider.model.metadata.json``. ``openai/`` is litellm's prefix for an
    OpenAI-compatible server (aider strips it from the model it sends).

    Raises:
        click.ClickException: ``json`` for a model whose context length is unknown.
    """
    name = f"openai/{model}"
    ca_notes = (f"export SSL_CERT_FILE={shlex.quote(str(ca_cert))}",) if ca_cert else ()
    if fmt == "json":
        if not context_tokens:
            raise click.ClickException(
                f"/v1/models gives no max_model_len for {model}: nothing to put in "
                ".aider.model.metadata.json")
        out = output_tokens(context_tokens)
        meta = {name: {"max_tokens": out, "max_input_tokens": context_tokens,
                      "max_output_tokens": out, "input_cost_per_token": 0,
                      "output_cost_per_token": 0, "litellm_provider": "openai",
                      "mode": "chat"}}
        return Setup(json.dumps(meta, indent=2), (
            "Save as ~/.aider.model.metadata.json (or in your repository's root).",))
    if fmt == "yaml":
        conf = {"openai-api-base": base_url, "model": name}
        header = ("# aider config for teamgpu: save as ~/.aider.conf.yml (or in your\n"
                  "# repository's root). The key comes from AIDER_OPENAI_API_KEY.\n")
        return Setup(header + _yaml(conf),
                     (f"export AIDER_OPENAI_API_KEY={shlex.quote(key)}", *ca_notes))
    env = {"AIDER_OPENAI_API_BASE": base_url, "AIDER_OPENAI_API_KEY": key, "AIDER_MODEL": name}
    if ca_cert:
        env["SSL_CERT_FILE"] = str(ca_cert)
    header = ("# aider through teamgpu: source this (or add it to your shell profile), then\n"
              "# run `aider` in your repository.\n")
    return Setup(header + _shell(env))


# --- opencode -------------------------------------------------------------------------

def opencode_json(base_url: str, model: str, cards: list[ModelCard]) -> str:
    """``opencode.json``: the gateway as an OpenAI-compatible custom provider, its chat
    models listed (the chosen one first), the key from ``{env:TEAMGPU_API_KEY}``."""
    ids = [model] + [c.id for c in cards if c.generative and c.id != model]
    entries: dict[str, Any] = {}
    for mid in ids:
        entry: dict[str, Any] = {"name": mid}
        if ctx := _context(cards, mid):
            entry["limit"] = {"context": ctx, "output": output_tokens(ctx)}
        entries[mid] = entry
    doc = {"$schema": "https://opencode.ai/config.json",
           "provider": {PROVIDER_ID: {
               "npm": "@ai-sdk/openai-compatible", "name": PROVIDER_ID,
               "options": {"baseURL": base_url, "apiKey": f"{{env:{KEY_ENV}}}"},
               "models": entries}},
           "model": f"{PROVIDER_ID}/{model}",
           "small_model": f"{PROVIDER_ID}/{model}"}
    return json.dumps(doc, indent=2)


# --- env, curl, python ----------------------------------------------------------------

def env_exports(base_url: str, key: str, ca_cert: Path | None = None) -> str:
    """Shell exports for the OpenAI SDKs and for the clients that read
    :data:`KEY_ENV` (``source <(teamgpu connect env ...)``)."""
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key, KEY_ENV: key}
    if ca_cert:
        env["SSL_CERT_FILE"] = str(ca_cert)
    return _shell(env)


def curl_command(base_url: str, key: str, model: str, ca_cert: Path | None = None) -> str:
    """A streaming chat request with curl (``-N``: print each event as it arrives)."""
    # temperature 0: a set-up check gives the same (greedy) answer every time; small
    # models such as the demo model ramble at the default temperature. max_tokens: a
    # model that goes wrong stops after a line instead of running to its context limit
    body = json.dumps({"model": model, "stream": True, "temperature": 0,
                       "max_tokens": EXAMPLE_MAX_TOKENS,
                       "messages": [{"role": "user", "content": QUESTION}]})
    parts = ["curl", "-sS", "-N"]
    if ca_cert:
        parts += ["--cacert", str(ca_cert)]
    parts += [f"{base_url}/chat/completions",
              "-H", f"Authorization: Bearer {key}",
              "-H", "Content-Type: application/json",
              "-d", body]
    return " ".join(shlex.quote(p) for p in parts)


def python_snippet(base_url: str, key: str, model: str, ca_cert: Path | None = None) -> str:
    """A Python snippet with the official ``openai`` package (streams to stdout)."""
    client_args = f"base_url={base_url!r},\n                api_key={key!r}"
    imports = "from openai import OpenAI"
    if ca_cert:
        imports = "import ssl\n\nfrom openai import DefaultHttpxClient, OpenAI"
        client_args += (",\n                http_client=DefaultHttpxClient(\n"
                        "                    verify=ssl.create_default_context("
                        f"cafile={str(ca_cert)!r}))")
    return (
        f"{imports}\n\n"
        f"client = OpenAI({client_args})\n"
        f"stream = client.chat.completions.create(\n"
        f"    model={model!r}, stream=True, temperature=0, max_tokens={EXAMPLE_MAX_TOKENS},\n"
        f"    messages=[{{\"role\": \"user\", \"content\": {QUESTION!r}}}])\n"
        f"for chunk in stream:\n"
        f"    if chunk.choices:\n"
        f"        print(chunk.choices[0].delta.content or \"\", end=\"\", flush=True)\n"
        f"print()\n"
    )


def render(target: str, fmt: str, base: str, key: str, models: dict[str, str | None],
           cards: list[ModelCard], ca: Path | None) -> Setup:
    """The set-up of ``target`` in format ``fmt`` (one of ``FORMATS[target]``)."""
    chat = str(models["chat"])
    ctx = _context(cards, chat)
    key_note = f"export {KEY_ENV}={shlex.quote(key)}"
    if target == "continue":
        if fmt == "json":
            return continue_json(base, key, chat, str(models["autocomplete"]), ca)
        return continue_yaml(base, key, models, cards, ca)
    if target == "claude-code":
        return claude_code(claude_code_env(base, key, chat, ctx, ca), fmt)
    if target == "codex":
        ca_note = (f"export CODEX_CA_CERTIFICATE={shlex.quote(str(ca))}",) if ca else ()
        return Setup(codex_toml(base, chat, ctx), (key_note, *ca_note))
    if target == "aider":
        return aider_setup(base, key, chat, ctx, fmt, ca)
    if target == "opencode":
        ca_note = (f"export NODE_EXTRA_CA_CERTS={shlex.quote(str(ca))}",) if ca else ()
        return Setup(opencode_json(base, chat, cards), (
            "Save as opencode.json in your project (or ~/.config/opencode/opencode.json).",
            key_note, *ca_note))
    if target == "curl":
        return Setup(curl_command(base, key, chat, ca))
    return Setup(python_snippet(base, key, chat, ca).rstrip("\n"))


@click.command("connect")
@click.argument("target", type=click.Choice(TARGETS))
@click.option("--url", envvar="OPENAI_BASE_URL", default=None,
              help="The team endpoint, e.g. https://gpu.example.com/v1 (env OPENAI_BASE_URL; "
                   "default: the server running on this machine, as `doctor` finds it).")
@click.option("--key", envvar="OPENAI_API_KEY", required=True,
              help="Your API key (env OPENAI_API_KEY).")
@click.option("--model", "--chat-model", "model", default=None,
              help="Model for chat, edit and apply (default: the first with role chat, "
                   "else the first listed).")
@click.option("--autocomplete-model", default=None,
              help="Tab-autocomplete model for Continue (default: role autocomplete, else "
                   "the chat model).")
@click.option("--embed-model", default=None,
              help="Embeddings model for Continue (default: role embed, else none).")
@click.option("--rerank-model", default=None,
              help="Reranking model for Continue (default: role rerank, else none).")
@click.option("--format", "fmt", type=click.Choice(sorted({f for fs in FORMATS.values()
                                                           for f in fs})),
              default=None, help="continue: yaml (default) or json (older releases); "
                                 "claude-code: shell (default) or json (settings.json); "
                                 "aider: shell (default), yaml (.aider.conf.yml) or json "
                                 "(.aider.model.metadata.json).")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="CA certificate to trust (e.g. Caddy's internal root.crt).")
def connect(target: str, url: str | None, key: str, model: str | None,
            autocomplete_model: str | None, embed_model: str | None,
            rerank_model: str | None, fmt: str | None, ca_cert: Path | None) -> None:
    """Print client set-up for TARGET: continue, claude-code, codex, aider, opencode,
    env, curl or python. The file goes to stdout; where to save it, and the line that
    puts the key in place, go to stderr.

    \b
    teamgpu connect continue --url https://gpu.example.com/v1 --key tg-... > ~/.continue/config.yaml
    source <(teamgpu connect claude-code --url https://gpu.example.com/v1 --key tg-...)
    """
    try:
        base = normalize_base_url(gateway_or_recorded(url))
    except BenchError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc
    fmt = fmt or FORMATS[target][0]
    if fmt not in FORMATS[target]:
        raise click.BadParameter(
            f"{target} prints {' or '.join(FORMATS[target])}, not {fmt}", param_hint="--format")
    ca = ca_cert.resolve() if ca_cert else None
    if target == "env":
        click.echo(env_exports(base, key, ca))
        return
    cards = fetch_models(base, key, ca)
    given = {"chat": model, "autocomplete": autocomplete_model, "embed": embed_model,
             "rerank": rerank_model}
    listed = {c.id for c in cards}
    for name in dict.fromkeys(m for m in given.values() if m):
        if name not in listed:
            click.echo(f"note: {name} is not in {base}/models for this key", err=True)
    setup = render(target, fmt, base, key, choose_models(cards, given), cards, ca)
    click.echo(setup.text.rstrip("\n"))
    for line in setup.notes:
        click.echo(line, err=True)
