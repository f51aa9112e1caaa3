"""Wallet movements: top-ups, settlement of finished jobs, and the ledger check.

Every change to a wallet's balance or held amount is made in the same transaction as
the ledger entry that explains it, and each entry has a unique idempotency key, so a
repeated settle or a replayed top-up changes nothing the second time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from broker.ids import new_id
from broker.pricing import token_cost_micro_usd
from broker.tables import Job, LedgerEntry, Wallet, utcnow

logger = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")


class LedgerError(Exception):
    """A wallet operation could not be applied."""


def top_up(
    session: Session,
    account_id: str,
    amount_micro_usd: int,
    *,
    idempotency_key: str | None = None,
    note: str = "",
) -> bool:
    """Credit a wallet. Returns False when ``idempotency_key`` was already applied."""
    if amount_micro_usd <= 0:
        raise LedgerError(f"top-up amount must be positive, got {amount_micro_usd} micro-USD")
    key = idempotency_key or new_id("topup")
    if session.scalar(select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)):
        return False
    wallet_id = session.scalar(
        update(Wallet)
        .where(Wallet.account_id == account_id)
        .values(balance_micro_usd=Wallet.balance_micro_usd + amount_micro_usd, updated_at=utcnow())
        .returning(Wallet.id)
    )
    if wallet_id is None:
        raise LedgerError(f"account {account_id} has no wallet")
    session.execute(
        insert(LedgerEntry).values(
            wallet_id=wallet_id,
            kind="topup",
            amount_micro_usd=amount_micro_usd,
            held_delta_micro_usd=0,
            idempotency_key=key,
            note=note,
            created_at=utcnow(),
        )
    )
    return True


@dataclass(frozen=True)
class Settlement:
    job_id: str
    cost_micro_usd: int
    released_micro_usd: int


def settle_job(session: Session, job_id: str) -> Settlement | None:
    """Charge a finished job and release its hold, once.

    Returns None when the job is not finished yet or was already settled. The guarded
    update of the job row is the first statement, so of two concurrent settlements of
    the same job the second waits for the first's row lock and then matches nothing.
    """
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.settled_at.is_(None), Job.status.in_(FINAL_STATUSES))
        .values(settled_at=now)
        .returning(
            Job.account_id,
            Job.status,
            Job.prompt_tokens,
            Job.completion_tokens,
            Job.input_price_micro_usd,
            Job.output_price_micro_usd,
            Job.hold_micro_usd,
        )
    ).one_or_none()
    if row is None:
        return None

    # Usage the provider reported is charged whatever the status: a stream the client
    # left early is billed for the tokens the provider counted before it stopped.
    cost = 0
    if row.prompt_tokens or row.completion_tokens:
        cost = token_cost_micro_usd(
            row.prompt_tokens,
            row.completion_tokens,
            row.input_price_micro_usd,
            row.output_price_micro_usd,
        )
    session.execute(update(Job).where(Job.id == job_id).values(cost_micro_usd=cost))
    wallet_id = session.scalar(
        update(Wallet)
        .where(Wallet.account_id == row.account_id)
        .values(
            balance_micro_usd=Wallet.balance_micro_usd - cost,
            held_micro_usd=Wallet.held_micro_usd - row.hold_micro_usd,
            updated_at=now,
        )
        .returning(Wallet.id)
    )
    entries = [
        dict(
            wallet_id=wallet_id,
            kind="release",
            amount_micro_usd=0,
            held_delta_micro_usd=-row.hold_micro_usd,
            idempotency_key=f"release:{job_id}",
            job_id=job_id,
            note="",
            created_at=now,
        )
    ]
    if cost:
        entries.append(
            dict(
                wallet_id=wallet_id,
                kind="charge",
                amount_micro_usd=-cost,
                held_delta_micro_usd=0,
                idempotency_key=f"charge:{job_id}",
                job_id=job_id,
                note="",
                created_at=now,
            )
        )
    session.execute(insert(LedgerEntry), entries)
    return Settlement(job_id=job_id, cost_micro_usd=cost, released_micro_usd=row.hold_micro_usd)


@dataclass(frozen=True)
class WalletCheck:
    wallet_id: str
    balance_micro_usd: int
    ledger_balance_micro_usd: int
    held_micro_usd: int
    ledger_held_micro_usd: int

    @property
    def ok(self) -> bool:
        return (
            self.balance_micro_usd == self.ledger_balance_micro_usd
            and self.held_micro_usd == self.ledger_held_micro_usd
        )


def check_wallet(session: Session, wallet_id: str) -> WalletCheck:
    """Compare a wallet's balance and held amount with the sums of its ledger entries."""
    wallet = session.get(Wallet, wallet_id, populate_existing=True)
    if wallet is None:
        raise LedgerError(f"wallet {wallet_id} not found")
    sums = session.execute(
        select(
            func.coalesce(func.sum(LedgerEntry.amount_micro_usd), 0),
            func.coalesce(func.sum(LedgerEntry.held_delta_micro_usd), 0),
        ).where(LedgerEntry.wallet_id == wallet_id)
    ).one()
    return WalletCheck(
        wallet_id, wallet.balance_micro_usd, int(sums[0]), wallet.held_micro_usd, int(sums[1])
    )
