"""The relational data model: accounts, keys, wallets, ledger, jobs and attempts.

Money columns store integer micro-dollars. A wallet's ``balance_micro_usd`` equals the
sum of its ledger entries' ``amount_micro_usd``, and its ``held_micro_usd`` equals the
sum of their ``held_delta_micro_usd``. Both change only in the transaction that inserts
the ledger entry explaining the change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Return ``moment`` with its time zone: SQLite returns stored UTC times naive."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    # Price multiplier in parts per million: 1_050_000 is a 5 % markup, 950_000 a 5 %
    # discount on the catalog prices.
    price_multiplier_ppm: Mapped[int] = mapped_column(
        BigInteger, default=1_000_000, server_default="1000000"
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # The first characters of the key, shown in listings so users can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(32))
    # SHA-256 of the whole key; the key itself is shown once and never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Most the key may spend per calendar month (UTC), in micro-dollars; None: no limit.
    monthly_limit_micro_usd: Mapped[int | None] = mapped_column(BigInteger)
    # Model ids the key may call; None: every model.
    allowed_models: Mapped[list[str] | None] = mapped_column(JSONDocument)
    # The only region the key's jobs may run in (data residency); None: any region.
    region_pin: Mapped[str | None] = mapped_column(String(16))


class Wallet(Base):
    __tablename__ = "wallets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), unique=True)
    balance_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    held_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LedgerEntry(Base):
    """One append-only movement of money (balance) or of reservation (held)."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    wallet_id: Mapped[str] = mapped_column(ForeignKey("wallets.id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    held_delta_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    # Unique per effect, e.g. "charge:<job id>": a second insert of the same effect fails.
    idempotency_key: Mapped[str] = mapped_column(String(120), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(40))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_ledger_wallet_id", "wallet_id", "id"),)


class Job(Base):
    """One request to an upstream model: the durable record of its whole life."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(40))
    region: Mapped[str] = mapped_column(String(16))
    lane: Mapped[str] = mapped_column(String(16))
    # queued -> running -> succeeded | failed | cancelled | expired
    status: Mapped[str] = mapped_column(String(16), default="queued")
    request: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    # Where the waiting API process listens for the result, if one waits.
    reply_to: Mapped[str | None] = mapped_column(String(120))
    # Client's Idempotency-Key header: a repeated POST returns this job.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # Targets to try in order, each {"model", "provider", "region", "upstream_model",
    # "wire_format", "input_price", "output_price"}; the first is the primary.
    route: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument, default=list)
    # The task message as published, so a sweeper can publish it again.
    dispatch: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)
    # After this moment the job is expired and its hold released.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Asynchronous jobs: the batch a job belongs to, its line's custom_id, the client's
    # metadata, and where to POST the completion event.
    batch_id: Mapped[str | None] = mapped_column(String(40), index=True)
    custom_id: Mapped[str | None] = mapped_column(String(200))
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Prompt tokens the provider served from its cache, charged at the cached price.
    cached_prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cached_input_price_micro_usd: Mapped[int | None] = mapped_column(BigInteger)
    served_provider: Mapped[str | None] = mapped_column(String(40))
    served_region: Mapped[str | None] = mapped_column(String(16))
    served_model: Mapped[str | None] = mapped_column(String(100))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Prices in force when the job was accepted, in micro-dollars per million tokens.
    input_price_micro_usd: Mapped[int] = mapped_column(BigInteger)
    output_price_micro_usd: Mapped[int] = mapped_column(BigInteger)
    hold_micro_usd: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micro_usd: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_status", "status"),
        Index("ux_jobs_account_idempotency", "account_id", "idempotency_key", unique=True),
        # A batch's unpublished and in-flight jobs (see broker/batches.py).
        Index("ix_jobs_batch_dispatch", "batch_id", "status", "dispatched_at"),
    )


class Attempt(Base):
    """One upstream call made for a job."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(40))
    region: Mapped[str] = mapped_column(String(16))
    upstream_model: Mapped[str] = mapped_column(String(100))
    # Celery node name of the worker that made the call, e.g. "hk@host".
    worker: Mapped[str | None] = mapped_column(String(120))
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoredFile(Base):
    """An uploaded or generated file (OpenAI Files API); its bytes live on disk."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # Path relative to the file store's root folder.
    storage_path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """An OpenAI-compatible batch: one input file of requests, run as jobs on the batch lane."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    # validating, failed, in_progress, finalizing, completed, expired, cancelling, cancelled
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONDocument)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookEndpoint(Base):
    """Where an account receives events, with the secret that signs them.

    The secret must be readable to sign, so it is stored as is; the previous secret
    keeps signing alongside the new one for a grace period after a rotation.
    """

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(200))
    previous_secret: Mapped[str | None] = mapped_column(String(200))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event to deliver to one URL, retried until delivered or given up."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    endpoint_id: Mapped[str | None] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    # pending, delivered, failed (gave up)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)


class WebhookAttempt(Base):
    """One POST of a delivery, logged whatever its result."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
