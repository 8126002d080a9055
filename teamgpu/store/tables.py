"""SQLAlchemy tables of the store. Schema changes go through Alembic migrations
(``teamgpu/store/migrations/versions``); this module is the model they are checked against."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user", String(128), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("rotated_from", String(32), nullable=True),
    # scheduler: priority ceiling, default class and fair-share weight
    Column("max_priority", String(8), nullable=False, default="high"),
    Column("default_priority", String(8), nullable=False, default="normal"),
    Column("weight", Float, nullable=False, default=1.0),
    # limits: NULL = the team-wide default from the settings, 0 = unlimited
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("daily_tokens", Integer, nullable=True),
    # per-key model access: a JSON list of served names or aliases; NULL = every model
    Column("models", Text, nullable=True),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("user", String(128), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(256), nullable=True),
    Column("priority", String(8), nullable=True),
    Column("stream", Boolean, nullable=False, default=False),
    Column("status", Integer, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("prompt_tokens", Integer, nullable=False, default=0),
    Column("completion_tokens", Integer, nullable=False, default=0),
    Column("queue_ms", Float, nullable=True),
    Column("ttft_ms", Float, nullable=True),
    Column("total_ms", Float, nullable=False),
    Column("backend", String(256), nullable=True),
    Column("client_addr", String(64), nullable=True),
    Column("error", Text, nullable=True),
    Column("prompt_text", Text, nullable=True),
    Column("completion_text", Text, nullable=True),
    Index("ix_usage_ts", "ts"),
    Index("ix_usage_user_ts", "user", "ts"),
)


stored_responses = Table(
    "responses",
    metadata,
    # a Responses API object the gateway relayed with store on (teamgpu/store/responses.py)
    Column("id", String(128), primary_key=True),
    Column("user", String(128), nullable=False, index=True),
    Column("key_id", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("backend", String(256), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Column("input_items", Text, nullable=True),
)


LISTING_ENDPOINTS = ("models", "responses.retrieve", "responses.delete", "responses.cancel",
                     "responses.input_items", "tokenize", "detokenize", "messages.count_tokens")
"""Endpoints whose rows are kept for the audit trail but are not usage: usage reports,
``/stats`` and the dashboard count inference requests (chat, completions, embeddings,
responses, messages, score, rerank), not model listings, stored-response look-ups or
tokenizer calls."""
