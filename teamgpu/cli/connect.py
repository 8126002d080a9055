"""``teamgpu connect continue|env|curl|python``: ready-to-use client set-up.

Every form is printed to stdout so it can be redirected into a file or evaluated:

- ``continue``: Continue.dev's ``config.yaml`` (schema v1: one chat model with roles
  chat/edit/apply, one model with role autocomplete); with ``--format json`` the older
  ``config.json`` (``models`` plus ``tabAutocompleteModel``). Both use provider
  ``openai`` with ``apiBase`` ending in ``/v1/``: Continue builds endpoint URLs as
  ``new URL("chat/completions", apiBase)``, so a base without the trailing slash would
  lose its ``/v1`` in older releases. The autocomplete model sets
  ``useLegacyCompletionsEndpoint`` so Continue sends its raw prompt to
  ``/v1/completions``, which the gateway forwards unchanged.
- ``env``: ``export OPENAI_BASE_URL=... OPENAI_API_KEY=...`` (read by the OpenAI SDKs),
  plus ``SSL_CERT_FILE`` when ``--ca-cert`` is given (httpx, and so the Python SDK,
  honours it).
- ``curl``: one streaming chat request.
- ``python``: a snippet with the official ``openai`` package.

The model defaults to the first one ``GET /v1/models`` lists for the key.
"""

from __future__ import annotations

import json
import shlex
import ssl
from pathlib import Path
from typing import Any

import click
import httpx
import yaml

from teamgpu.clientbench import BenchError, normalize_base_url

TARGETS = ("continue", "env", "curl", "python")
QUESTION = "What is the capital of France?"
EXAMPLE_MAX_TOKENS = 64  # every example sets it (the README's, up's banner, connect's)


def fetch_models(base_url: str, key: str, ca_cert: Path | None = None) -> list[str]:
    """The model names ``GET {base_url}/models`` lists for ``key``.

    Raises:
        click.ClickException: unreachable, TLS failure, or a non-200 answer.
    """
    verify: Any = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    try:
        r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"},
                      verify=verify, timeout=10.0, trust_env=False)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {base_url}/models: {exc}") from exc
    if r.status_code != 200:
        raise click.ClickException(
            f"GET {base_url}/models answered {r.status_code}: {r.text[:300]}")
    return [str(m["id"]) for m in r.json().get("data") or []]


def _continue_model_fields(base_url: str, key: str, ca_cert: Path | None) -> dict[str, Any]:
    """The fields every Continue.dev model entry shares. ``apiBase`` ends in ``/``:
    Continue joins paths with ``new URL(path, apiBase)``, which drops a last segment
    without it."""
    common: dict[str, Any] = {"provider": "openai", "apiBase": base_url + "/", "apiKey": key}
    if ca_cert:
        common["requestOptions"] = {"caBundlePath": str(ca_cert)}
    return common


def continue_yaml(base_url: str, key: str, chat_model: str, autocomplete_model: str,
                  ca_cert: Path | None = None) -> str:
    """Continue.dev ``config.yaml`` (schema v1) for the gateway."""
    common = _continue_model_fields(base_url, key, ca_cert)
    doc = {
        "name": "teamgpu",
        "version": "1.0.0",
        "schema": "v1",
        "models": [
            {"name": f"teamgpu {chat_model}", "model": chat_model, **common,
             "roles": ["chat", "edit", "apply"]},
            {"name": f"teamgpu {autocomplete_model} (autocomplete)",
             "model": autocomplete_model, **common, "roles": ["autocomplete"],
             "useLegacyCompletionsEndpoint": True},
        ],
    }
    header = ("# Continue.dev config: save as ~/.continue/config.yaml "
              "(or merge the models into yours).\n")
    return header + yaml.safe_dump(doc, sort_keys=False)


def continue_json(base_url: str, key: str, chat_model: str, autocomplete_model: str,
                  ca_cert: Path | None = None) -> str:
    """The older Continue.dev ``config.json`` (``models`` and ``tabAutocompleteModel``)."""
    common = _continue_model_fields(base_url, key, ca_cert)
    doc = {
        "models": [{"title": f"teamgpu {chat_model}", "model": chat_model, **common}],
        "tabAutocompleteModel": {"title": f"teamgpu {autocomplete_model} (autocomplete)",
                                 "model": autocomplete_model, **common,
                                 "useLegacyCompletionsEndpoint": True},
    }
    return json.dumps(doc, indent=2)


def env_exports(base_url: str, key: str, ca_cert: Path | None = None) -> str:
    """Shell exports for the OpenAI SDKs (``source <(teamgpu connect env ...)``)."""
    lines = [f"export OPENAI_BASE_URL={shlex.quote(base_url)}",
             f"export OPENAI_API_KEY={shlex.quote(key)}"]
    if ca_cert:
        lines.append(f"export SSL_CERT_FILE={shlex.quote(str(ca_cert))}")
    return "\n".join(lines)


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
                        f"                    verify=ssl.create_default_context(cafile={str(ca_cert)!r}))")
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


@click.command("connect")
@click.argument("target", type=click.Choice(TARGETS))
@click.option("--url", envvar="OPENAI_BASE_URL", required=True,
              help="The team endpoint, e.g. https://gpu.example.com/v1 (env OPENAI_BASE_URL).")
@click.option("--key", envvar="OPENAI_API_KEY", required=True,
              help="Your API key (env OPENAI_API_KEY).")
@click.option("--model", default=None, help="Chat model (default: the first /v1/models lists).")
@click.option("--autocomplete-model", default=None,
              help="Tab-autocomplete model for Continue (default: the chat model).")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml",
              show_default=True,
              help="continue only: config.yaml (current) or config.json (older releases).")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="CA certificate to trust (e.g. Caddy's internal root.crt).")
def connect(target: str, url: str, key: str, model: str | None,
            autocomplete_model: str | None, fmt: str, ca_cert: Path | None) -> None:
    """Print client set-up for TARGET: continue, env, curl or python.

    \b
    teamgpu connect continue --url https://gpu.example.com/v1 --key tg-... > ~/.continue/config.yaml
    source <(teamgpu connect env --url https://gpu.example.com/v1 --key tg-...)
    """
    try:
        base = normalize_base_url(url)
    except BenchError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc
    ca = ca_cert.resolve() if ca_cert else None
    if target == "env":
        click.echo(env_exports(base, key, ca))
        return
    if model is None:
        names = fetch_models(base, key, ca)
        if not names:
            raise click.ClickException(f"{base}/models lists no model for this key")
        model = names[0]
    if target == "continue":
        auto = autocomplete_model or model
        render = continue_yaml if fmt == "yaml" else continue_json
        click.echo(render(base, key, model, auto, ca))
    elif target == "curl":
        click.echo(curl_command(base, key, model, ca))
    else:
        click.echo(python_snippet(base, key, model, ca), nl=False)
