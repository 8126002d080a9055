"""SQLAlchemy tables of the store. Schema changes go through Alembic migrations
(``teamgpu/store/migrations/versions``); this module is the model they are checked against."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
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
    # the batch job an item belongs to (teamgpu/batch); NULL for requests made directly
    Column("batch_id", String(40), nullable=True),
    Index("ix_usage_ts", "ts"),
    Index("ix_usage_user_ts", "user", "ts"),
    Index("ix_usage_batch_id", "batch_id"),
)

# --- the Batch API (teamgpu/batch, docs/batch.md) ---------------------------------------

batch_files = Table(
    "batch_files",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user", String(128), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(256), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_batch_files_user_created", "user", "created_at"),
)

batch_file_chunks = Table(
    "batch_file_chunks",
    metadata,
    # a file's content is its chunks in seq order: 1 MiB pieces of an upload, or one
    # result line each with seq = the item's input line number (written in the
    # transaction that marks the item done)
    Column("file_id", String(40), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("file_id", "seq", name="pk_batch_file_chunks"),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user", String(128), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata_json", Text, nullable=True),
    Column("errors_json", Text, nullable=True),
    # the output and error files' ids are fixed when the job starts; their rows appear
    # when the job ends (until then only their chunks exist)
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("prompt_tokens", BigInteger, nullable=False, default=0),
    Column("completion_tokens", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("in_progress_at", DateTime(timezone=True), nullable=True),
    Column("finalizing_at", DateTime(timezone=True), nullable=True),
    Column("completed_at", DateTime(timezone=True), nullable=True),
    Column("failed_at", DateTime(timezone=True), nullable=True),
    Column("expired_at", DateTime(timezone=True), nullable=True),
    Column("cancelling_at", DateTime(timezone=True), nullable=True),
    Column("cancelled_at", DateTime(timezone=True), nullable=True),
    # which runner works on the job, until when (another gateway takes it over after)
    Column("runner_id", String(64), nullable=True),
    Column("lease_expires_at", DateTime(timezone=True), nullable=True),
    Index("ix_batches_user_created", "user", "created_at"),
    Index("ix_batches_status", "status"),
)

batch_items = Table(
    "batch_items",
    metadata,
    Column("batch_id", String(40), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("custom_id", String(256), nullable=False),
    Column("model", String(256), nullable=False),
    Column("body", Text, nullable=False),
    # pending (not answered yet, also while in flight), done (2xx), failed
    Column("state", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("status_code", Integer, nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("batch_id", "line_no", name="pk_batch_items"),
    Index("ix_batch_items_state", "batch_id", "state", "line_no"),
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
                     "responses.input_items", "tokenize", "detokenize", "messages.count_tokens",
                     "files.create", "files.list", "files.retrieve", "files.delete",
                     "files.content", "batches.create", "batches.list", "batches.retrieve",
                     "batches.cancel")
"""Endpoints whose rows are kept for the audit trail but are not usage: usage reports,
``/stats`` and the dashboard count inference requests (chat, completions, embeddings,
responses, messages, score, rerank; batch items among them), not model listings,
stored-response look-ups, tokenizer calls or Batch API bookkeeping (files, batches)."""
