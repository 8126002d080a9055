"""The one settings object.

Sources, later ones winning: defaults < ``teamgpu.toml`` (in the working directory, or the
file named by ``TEAMGPU_CONFIG``) < ``TEAMGPU_*`` environment variables < CLI flags (passed
in as ``Settings(**overrides)`` init arguments). Units are in the names. Nothing else in the
package reads ``os.environ`` for configuration.

Example ``teamgpu.toml``::

    port = 8080
    data_dir = "/var/lib/teamgpu"
    backends = ["http://127.0.0.1:8000"]
    [model_aliases]
    smollm = "SmolLM2-135M-Instruct"
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/teamgpu`` or ``~/.local/share/teamgpu``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "teamgpu"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/teamgpu`` or ``~/.cache/teamgpu`` (engine venv, demo model)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "teamgpu"


# --- model set ([[models]] in teamgpu.toml; the Settings field is `models`) -------------
ModelRole = Literal["chat", "edit", "apply", "autocomplete", "embed", "rerank"]
MODEL_ROLES: tuple[str, ...] = get_args(ModelRole)
GENERATING_ROLES: tuple[str, ...] = ("chat", "edit", "apply", "autocomplete")


def _default_roles() -> list[ModelRole]:
    return ["chat"]

"""Roles served by generating text; a model with only embed or rerank is a pooling model."""
# Set by the model set itself: the memory plan reads the share from the fields, and the
# fleet sets names, ports and the CPU KV cache.
MODEL_OWNED_FLAGS = ("--gpu-memory-utilization", "--kv-cache-memory-bytes",
                     "--served-model-name", "--model", "--host", "--port")


def _backend_urls(urls: list[str]) -> list[str]:
    """Base URLs without a trailing ``/`` or ``/v1``; only http(s)."""
    out = []
    for url in urls:
        url = url.rstrip("/").removesuffix("/v1")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"backend URL must start with http:// or https://: {url!r}")
        out.append(url)
    return out


class ModelConfig(BaseModel):
    """One model of the set, a ``[[models]]`` table in ``teamgpu.toml``::

        [[models]]
        name = "qwen-coder"
        model = "/models/Qwen2.5-Coder-7B-Instruct"
        aliases = ["coder"]
        roles = ["chat", "edit", "apply"]
        gpu_memory_utilization = 0.55

        [[models]]
        name = "minilm"
        model = "/models/all-MiniLM-L6-v2"
        roles = ["embed"]
        on_demand = true
        idle_ttl_s = 600

    A model with ``model`` gets a local engine (``teamgpu up``); one with only
    ``backends`` is remote-only and starts nothing; with both, the remote servers serve
    beside the local engine.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1,
        description="Served model name: what clients send and /v1/models lists.")
    model: str | None = Field(
        default=None,
        description="Local model folder or model id to start an engine for; "
                    "unset: remote-only (needs backends).")
    aliases: list[str] = Field(
        default_factory=list, description="Extra names clients may use for this model.")
    roles: list[ModelRole] = Field(
        default_factory=_default_roles,
        description="What the model is for: chat, edit, apply, autocomplete, embed, rerank.")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, lt=1,
        description="On a GPU: fraction of its memory this engine may use (vLLM's "
                    "--gpu-memory-utilization); unset: an equal part of what is left.")
    kv_cache_gib: int | None = Field(
        default=None, ge=0,
        description="On the CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); unset: 1, or 0 "
                    "for a model with only embed or rerank roles.")
    engine_args: list[str] = Field(
        default_factory=list, description="Further vLLM flags for this model's engine.")
    on_demand: bool = Field(
        default=False,
        description="Start the engine on the model's first request, and stop it (on a "
                    "GPU: put it to sleep) after idle_ttl_s without requests.")
    idle_ttl_s: float = Field(
        default=900.0, gt=0,
        description="Seconds without requests after which an on-demand model is stopped.")
    backends: list[str] = Field(
        default_factory=list,
        description="Base URLs of remote vLLM servers serving this model, without /v1.")
    tool_call_parser: str = Field(
        default="auto", min_length=1,
        description="vLLM tool-call parser: auto (chosen from the chat template), none, or "
                    "a parser name.")

    @model_validator(mode="before")
    @classmethod
    def _known_roles(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("roles"), list):
            unknown = [r for r in data["roles"] if r not in MODEL_ROLES]
            if unknown:
                raise ValueError(
                    f"model {data.get('name')!r}: unknown role(s) {', '.join(map(repr, unknown))};"
                    f" roles are {', '.join(MODEL_ROLES)}")
        return data

    @field_validator("name", "aliases")
    @classmethod
    def _plain_names(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            if not name or name != name.strip() or any(c.isspace() for c in name):
                raise ValueError(f"model names may not be empty or contain spaces: {name!r}")
        return v

    @field_validator("backends")
    @classmethod
    def _backend_urls(cls, v: list[str]) -> list[str]:
        return _backend_urls(v)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        where = f"model {self.name!r}"
        if not self.roles:
            raise ValueError(f"{where}: roles may not be empty")
        self.roles = list(dict.fromkeys(self.roles))
        if self.model is None and not self.backends:
            raise ValueError(f"{where}: give model (a local engine) or backends (remote servers)")
        if self.model is None and self.on_demand:
            raise ValueError(f"{where}: on_demand needs a local engine (model); it has only "
                             "backends")
        given = {a.split("=", 1)[0].replace("_", "-") for a in self.engine_args
                 if a.startswith("--")}
        owned = sorted(given.intersection(MODEL_OWNED_FLAGS))
        if owned:
            raise ValueError(
                f"{where}: engine_args may not set {', '.join(owned)}: use the model's "
                "gpu_memory_utilization / kv_cache_gib and name, which the memory plan reads")
        if self.name in self.aliases:
            raise ValueError(f"{where}: an alias repeats the name")
        return self

    @property
    def local(self) -> bool:
        """Whether ``teamgpu up`` starts an engine for this model."""
        return self.model is not None

    @property
    def generates(self) -> bool:
        """Whether the model generates text (any role but embed and rerank)."""
        return any(role in GENERATING_ROLES for role in self.roles)

    def names(self) -> list[str]:
        """The name, then the aliases: every name a client may send for this model."""
        return [self.name, *self.aliases]


def check_model_names(models: Sequence[ModelConfig]) -> None:
    """Refuse a set where two models, or a model and an alias, share a name.

    Raises:
        ValueError: naming the clashing name and both models.
    """
    owner: dict[str, tuple[str, str]] = {}  # name -> (model, "name" or "alias")
    for m in models:
        for name in m.names():
            kind = "name" if name == m.name else "alias"
            if name in owner:
                first, first_kind = owner[name]
                if kind == first_kind == "name":
                    raise ValueError(f"two models are named {name!r}; every model name and "
                                     "alias must be unique")
                raise ValueError(
                    f"{name!r} is the {first_kind} of model {first!r} and again the {kind} of "
                    f"model {m.name!r}; every model name and alias must be unique")
            owner[name] = (m.name, kind)


def models_from_cli(values: Sequence[str], engine_args: Sequence[str] = ()) -> list[ModelConfig]:
    """ModelConfigs for the repeatable simple form ``--model A --model B``.

    Each value is a local folder or a model id; its name is the last path component
    (``/models/Qwen2.5-7B/`` and ``Qwen/Qwen2.5-7B`` are both ``Qwen2.5-7B``). A folder
    holding a sentence-transformers ``modules.json`` is an embeddings model (role
    ``embed``); any other model gets the generating roles (chat, edit, apply,
    autocomplete). ``engine_args`` (the ``--engine-arg`` flags) go to every model.

    Raises:
        ValueError: two values give the same name, or a value is empty.
    """
    models = []
    for value in values:
        name = Path(value.rstrip("/")).name
        if not name:
            raise ValueError(f"--model needs a folder or model id, got {value!r}")
        embed = (Path(value).expanduser() / "modules.json").is_file()
        roles: list[ModelRole] = ["embed"] if embed else ["chat", "edit", "apply", "autocomplete"]
        models.append(ModelConfig(name=name, model=value, roles=roles,
                                  engine_args=list(engine_args)))
    check_model_names(models)
    return models


class Settings(BaseSettings):
    """Effective configuration of one gateway (and, for ``teamgpu up``, its engine)."""

    model_config = SettingsConfigDict(
        env_prefix="TEAMGPU_",
        extra="forbid",
        validate_default=True,
    )

    # --- where state lives -------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="All state (SQLite store, engine log, first-run marker) lives here.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of the store; default: SQLite file teamgpu.db in data_dir.",
    )
    redis_url: SecretStr | None = Field(
        default=None, description="Redis for limit state shared by several gateway replicas."
    )

    # --- gateway -------------------------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="Address the gateway listens on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port the gateway listens on.")
    backends: list[str] = Field(
        default_factory=list,
        description="Base URLs of OpenAI-compatible backends (vLLM), without /v1.",
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict, description="Extra model names mapped to served model names."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Backend connect timeout.")
    read_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest silence allowed between two backend reads."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413)."
    )
    health_interval_s: float = Field(
        default=2.0, gt=0, description="How often each backend's /health is polled."
    )
    routing: Literal["affinity", "least_loaded"] = Field(
        default="affinity",
        description="How a request picks among backends serving its model: affinity (the "
        "backend that served its prompt's prefix, whose vLLM prefix cache still holds it, "
        "unless that one is much busier) or least_loaded (fewest requests in flight).",
    )
    backend_down_retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After sent with 503 when no backend is up."
    )
    trust_forwarded_for: bool = Field(
        default=False,
        description="Take the client address from X-Forwarded-For (only behind a trusted proxy).",
    )
    store_prompts: bool = Field(
        default=False, description="Store prompt and completion text in the audit log."
    )
    stored_responses_days: float = Field(
        default=30.0, gt=0,
        description="Days the gateway keeps the owner and input items of a stored "
        "Responses API object (OpenAI keeps them 30 days); older ones answer 404 and are "
        "deleted from the store.",
    )
    audit_queue_size: int = Field(
        default=10_000, ge=1, description="Audit rows waiting for the writer before back-pressure."
    )
    max_sequences_per_request: int = Field(
        default=4, ge=1,
        description="Most sequences one request may generate at once (n, best_of): each "
        "holds one of the engine's sequence slots while admission counts the request once, "
        "so a large n would take the slots kept for interactive work; above it, 400.",
    )
    default_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens assumed for accounting when a request has none."
    )
    metrics_require_key: bool = Field(
        default=False, description="Require an admin key for /metrics."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the gateway process.")

    # --- engine (teamgpu up) -----------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="Local model folder or model id; default: the demo model set (chat and "
                    "embeddings)."
    )
    served_model_name: str | None = Field(
        default=None, description="Name clients use; default: the folder name or model id."
    )
    engine_python: Path | None = Field(
        default=None, description="Python of the engine's venv (vLLM); found by setup if unset."
    )
    engine_port: int = Field(
        default=0, ge=0, le=65535, description="Private engine port on 127.0.0.1; 0 picks one."
    )
    engine_args: list[str] = Field(
        default_factory=list, description="Further flags passed to vLLM as they are."
    )
    engine_start_timeout_s: float = Field(
        default=900.0, gt=0, description="Longest wait for vLLM to answer /health at start.")

    # --- model set ---------------------------------------------------------------------
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="The model set, [[models]] tables in teamgpu.toml (see below); "
                    "when empty, up serves model (or the demo model set).",
    )

    model_start_timeout_s: float = Field(
        default=120.0, gt=0,
        description="Longest a request waits for an on_demand model to start (then 503).")

    @field_validator("models")
    @classmethod
    def _unique_model_names(cls, v: list[ModelConfig]) -> list[ModelConfig]:
        check_model_names(v)
        return v

    @model_validator(mode="after")
    def _aliases_do_not_shadow_models(self) -> Settings:
        names = {n for m in self.models for n in m.names()}
        shadowing = sorted(names.intersection(self.model_aliases))
        if shadowing:
            raise ValueError(f"model_aliases may not redefine a name of [[models]]: "
                             f"{', '.join(shadowing)}")
        return self

    # --- scheduler ---------------------------------------------------------------------
    max_inflight_per_backend: int | None = Field(
        default=None,
        ge=1,
        description="Requests in the engine at once; default: the engine's --max-num-seqs.",
    )
    reserved_slots_high: int = Field(
        default=2, ge=0, description="Slots that normal and low requests never take."
    )
    reserved_slots_normal: int = Field(
        default=1, ge=0, description="Further slots that low requests never take."
    )
    aging_s: float = Field(
        default=30.0, gt=0, description="A waiting request rises one class per aging_s."
    )
    input_token_weight: float = Field(default=1.0, ge=0,
                                      description="VTC weight of a prompt token.")
    output_token_weight: float = Field(
        default=2.0, ge=0, description="VTC weight of a completion token."
    )
    max_queued_per_user: int = Field(
        default=256, ge=1, description="Requests one user may have waiting (past it: 429).")
    max_queued_total: int = Field(
        default=4096, ge=1, description="Requests waiting in all (past it: 503).")
    queue_timeout_high_s: float = Field(
        default=60.0, gt=0, description="Longest wait in the queue for high (then 503).")
    queue_timeout_normal_s: float = Field(
        default=300.0, gt=0, description="Longest wait in the queue for normal (then 503).")
    queue_timeout_low_s: float = Field(
        default=3600.0, gt=0, description="Longest wait in the queue for low (then 503).")
    kv_cache_high_watermark: float = Field(
        default=0.95, gt=0, le=1,
        description="Hold normal and low back while vLLM's KV cache usage is at least this.")
    engine_metrics_interval_s: float = Field(
        default=0.25, gt=0, description="How often vLLM's /metrics is read for its load.")

    # --- default limits per key (0 = unlimited) ------------------------------------------
    default_rpm: int = Field(default=0, ge=0, description="Requests per minute per key.")
    default_tpm: int = Field(default=0, ge=0, description="Tokens per minute per key.")
    default_max_concurrent: int = Field(default=0, ge=0, description="Concurrent requests per key.")
    default_daily_tokens: int = Field(default=0, ge=0, description="Tokens per UTC day per key.")
    redis_key_prefix: str = Field(
        default="teamgpu:lim", min_length=1,
        description="Prefix of every Redis key of the limits (replicas sharing limits use one).",
    )
    redis_failure_mode: Literal["open", "closed"] = Field(
        default="open", description="On a Redis outage: admit (open) or answer 503 (closed)."
    )
    auth_failures_per_minute: int = Field(
        default=20, ge=1, description="Failed authentications allowed per client address."
    )

    # --- batch jobs ---------------------------------------------------------------------
    batch_max_file_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1024,
        description="Largest file accepted by POST /v1/files (413 past it).")
    batch_max_lines: int = Field(
        default=50_000, ge=1, description="Requests one batch input file may hold.")
    batch_max_window_h: int = Field(
        default=168, ge=24,
        description="Longest completion_window accepted, in hours ('1h' to this; OpenAI: '24h').")
    batch_max_active_jobs: int = Field(
        default=4, ge=1,
        description="Batch jobs one gateway runs at once; later ones wait their turn.")
    batch_poll_interval_s: float = Field(
        default=2.0, gt=0,
        description="How often the batch runner renews its job leases and looks for new jobs.")
    batch_lease_s: float = Field(
        default=30.0, gt=0,
        description="A job whose runner has not renewed its lease this long is taken over.")

    @field_validator("backends")
    @classmethod
    def _strip_backends(cls, v: list[str]) -> list[str]:
        out = []
        for url in v:
            url = url.rstrip("/")
            url = url.removesuffix("/v1")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"backend URL must start with http:// or https://: {url!r}")
            out.append(url)
        return out

    @model_validator(mode="after")
    def _expand(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("TEAMGPU_CONFIG", "teamgpu.toml")
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file),
        )

    # --- derived -----------------------------------------------------------------------
    @property
    def db_url(self) -> str:
        """The store's SQLAlchemy URL (SQLite in data_dir unless ``database_url`` is set)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'teamgpu.db'}"

    def masked(self) -> dict[str, Any]:
        """The effective settings as JSON-able data, secrets (and URL passwords) masked."""
        data = self.model_dump(mode="json")
        for name in ("database_url", "redis_url"):
            value = getattr(self, name)
            if value is not None:
                data[name] = mask_url(value.get_secret_value())
        data["data_dir"] = str(self.data_dir)
        return data


def mask_url(url: str) -> str:
    """Replace the password of ``scheme://user:password@host`` with ``***``."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"
