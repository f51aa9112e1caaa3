"""Job rows as the API writes and reads them (asyncio sessions)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from broker.errors import InsufficientFunds
from broker.pricing import job_cost_micro_usd
from broker.tables import ApiKey, Job, LedgerEntry, Wallet, utcnow

ACTIVE_STATUSES = ("queued", "running")


class DuplicateIdempotencyKey(Exception):
    """Another job of the account already carries this Idempotency-Key."""


def format_usd(micro_usd: int) -> str:
    return f"${micro_usd / 1_000_000:,.6f}"


def insufficient_funds(available: int, hold: int) -> InsufficientFunds:
    """Return the error for a wallet whose available balance cannot cover ``hold``."""
    return InsufficientFunds(
        f"The wallet's available balance ({format_usd(available)}) cannot "
        f"cover this request's worst-case cost ({format_usd(hold)}). Top up the "
        "wallet or lower max_tokens."
    )


async def create_job(
    sessions: async_sessionmaker[AsyncSession],
    *,
    wallet_id: str,
    hold: int,
    values: dict[str, Any],
    monthly_limit: int | None = None,
) -> None:
    """Hold ``hold`` micro-USD on the wallet and insert the job, in one transaction.

    Raises InsufficientFunds when the wallet cannot cover the hold, and
    DuplicateIdempotencyKey when the account already has a job with the same key.
    """
    now = values["created_at"]
    key = values.get("idempotency_key")
    try:
        async with sessions.begin() as session:
            connection = await session.connection()
            if key and await used_idempotency_keys(connection, [(values["account_id"], key)]):
                raise DuplicateIdempotencyKey(key)
            if monthly_limit is not None:
                await _check_monthly_limit(session, values["api_key_id"], monthly_limit, hold, now)
            # The check and the hold are one statement, so concurrent requests cannot
            # together reserve more than the wallet has.
            held = await session.execute(
                update(Wallet)
                .where(
                    Wallet.id == wallet_id, Wallet.balance_micro_usd - Wallet.held_micro_usd >= hold
                )
                .values(held_micro_usd=Wallet.held_micro_usd + hold, updated_at=now)
            )
            if held.rowcount != 1:
                available = await session.scalar(
                    select(Wallet.balance_micro_usd - Wallet.held_micro_usd).where(
                        Wallet.id == wallet_id
                    )
                )
                raise insufficient_funds(available or 0, hold)
            await session.execute(
                insert(LedgerEntry).values(
                    wallet_id=wallet_id,
                    kind="hold",
                    amount_micro_usd=0,
                    held_delta_micro_usd=hold,
                    idempotency_key=f"hold:{values['id']}",
                    job_id=values["id"],
                    note="",
                    created_at=now,
                )
            )
            await session.execute(insert(Job).values(**values))
    except IntegrityError as exc:
        if values.get("idempotency_key") and "idempotency" in str(exc.orig).lower():
            raise DuplicateIdempotencyKey(values["idempotency_key"]) from exc
        raise


async def used_idempotency_keys(
    connection: AsyncConnection, keys: list[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Return which (account id, Idempotency-Key) pairs a committed job already has.

    Called before the wallet is locked. Inserting a used key waits for any transaction
    that updated that job, such as its settlement, which itself waits for the wallet
    lock: PostgreSQL would end one of the two as a deadlock. A plain read does not
    wait, so a repeat is found and rejected before it locks anything.
    """
    if not keys:
        return set()
    rows = await connection.execute(
        select(Job.account_id, Job.idempotency_key).where(
            Job.account_id.in_({account for account, _ in keys}),
            Job.idempotency_key.in_({key for _, key in keys}),
        )
    )
    return {(row.account_id, row.idempotency_key) for row in rows} & set(keys)


async def _check_monthly_limit(
    session: AsyncSession, key_id: str, limit: int, hold: int, now: datetime
) -> None:
    """Refuse a job that could take the key's spending this month past its limit.

    The key's row is locked first, so concurrent requests with the same key are checked
    one after the other (SQLite serialises writers anyway). Unsettled jobs count at
    their hold, settled ones at their cost.
    """
    await session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spent = (
        await session.scalar(
            select(
                func.coalesce(func.sum(func.coalesce(Job.cost_micro_usd, Job.hold_micro_usd)), 0)
            ).where(Job.api_key_id == key_id, Job.created_at >= month_start)
        )
        or 0
    )
    if spent + hold > limit:
        raise InsufficientFunds(
            f"This API key's monthly spending limit ({format_usd(limit)}) cannot cover this "
            f"request: {format_usd(spent)} is spent or held this month and the request may "
            f"cost {format_usd(hold)}. Raise the key's limit or wait for next month.",
            code="key_limit_exceeded",
        )


async def abandon_job(
    sessions: async_sessionmaker[AsyncSession],
    job_id: str,
    wallet_id: str,
    hold: int,
    error: dict[str, Any],
) -> None:
    """Fail a job whose task was never published and give its hold back.

    The job gives up its Idempotency-Key, so the client's retry creates a new job.
    """
    now = utcnow()
    async with sessions.begin() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                status="failed",
                finished_at=now,
                settled_at=now,
                cost_micro_usd=0,
                error=error,
                idempotency_key=None,
            )
        )
        await session.execute(
            update(Wallet)
            .where(Wallet.id == wallet_id)
            .values(held_micro_usd=Wallet.held_micro_usd - hold, updated_at=now)
        )
        await session.execute(
            insert(LedgerEntry).values(
                wallet_id=wallet_id,
                kind="release",
                amount_micro_usd=0,
                held_delta_micro_usd=-hold,
                idempotency_key=f"release:{job_id}",
                job_id=job_id,
                note="job not published",
                created_at=now,
            )
        )


def final_reply(job: Job) -> dict[str, Any] | None:
    """Rebuild the worker's final reply from a finished job row; None while it runs."""
    if job.status in ACTIVE_STATUSES:
        return None
    message: dict[str, Any] = {
        "job_id": job.id,
        "type": "final",
        "status": job.status,
        "provider": job.served_provider or job.provider,
        "region": job.served_region or job.region,
        "model": job.served_model or job.model,
        "response": job.response,
        "error": job.error,
    }
    if job.prompt_tokens or job.completion_tokens:
        message["cost_micro_usd"] = job_cost_micro_usd(
            job.prompt_tokens,
            job.completion_tokens,
            job.input_price_micro_usd,
            job.output_price_micro_usd,
            job.cached_prompt_tokens,
            job.cached_input_price_micro_usd,
        )
    return message


async def read_final_reply(
    sessions: async_sessionmaker[AsyncSession], job_id: str
) -> dict[str, Any] | None:
    async with sessions() as session:
        job = await session.get(Job, job_id)
    return None if job is None else final_reply(job)


async def find_by_idempotency_key(
    sessions: async_sessionmaker[AsyncSession], account_id: str, key: str
) -> Job | None:
    async with sessions() as session:
        return await session.scalar(
            select(Job).where(Job.account_id == account_id, Job.idempotency_key == key)
        )
