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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
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
    audit_queue_size: int = Field(
        default=10_000, ge=1, description="Audit rows waiting for the writer before back-pressure."
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
        default=None, description="Local model folder or model id; default: the demo model."
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
