"""The relational data model: accounts, keys, wallets, ledger, jobs and attempts.

Money columns hold integer micro-dollars. A wallet's ``balance_micro_usd`` equals the
sum of its ledger entries' ``amount_micro_usd``, and its ``held_micro_usd`` equals the
sum of their ``held_delta_micro_usd``; both change only together with a ledger insert.
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
