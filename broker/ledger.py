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
from broker.pricing import job_cost_micro_usd
from broker.tables import Job, LedgerEntry, Wallet, utcnow

logger = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "cancelled", "expired")


class LedgerError(Exception):
    """A wallet operation could not be applied."""


# Largest single credit or debit: $1,000,000. Far below the 64-bit column limit, so no
# sum of balances or ledger entries can overflow.
MAX_CREDIT_MICRO_USD = 1_000_000 * 1_000_000
# Entry kinds that move money in or out of the balance, with the sign they allow.
CREDIT_KINDS = {"topup": 1, "refund": 1, "adjustment": 0}


def credit(
    session: Session,
    account_id: str,
    amount_micro_usd: int,
    *,
    kind: str = "topup",
    idempotency_key: str | None = None,
    note: str = "",
    job_id: str | None = None,
) -> bool:
    """Add ``amount_micro_usd`` to a wallet's balance with a ledger entry of ``kind``.

    Top-ups and refunds must be positive; an adjustment may be negative but may not
    take the balance below what is held. Returns False when ``idempotency_key`` was
    already applied, so a replayed payment or retried command changes nothing.
    """
    sign = CREDIT_KINDS.get(kind)
    if sign is None:
        raise LedgerError(f"unknown credit kind {kind!r}; use one of {sorted(CREDIT_KINDS)}")
    if amount_micro_usd == 0 or (sign > 0 and amount_micro_usd < 0):
        raise LedgerError(f"a {kind} must be positive, got {amount_micro_usd} micro-USD")
    if abs(amount_micro_usd) > MAX_CREDIT_MICRO_USD:
        raise LedgerError(
            f"a {kind} of {amount_micro_usd} micro-USD is above the limit of "
            f"{MAX_CREDIT_MICRO_USD} micro-USD ($1,000,000) per entry"
        )
    key = idempotency_key or new_id(kind)
    if session.scalar(select(LedgerEntry.id).where(LedgerEntry.idempotency_key == key)):
        return False
    guard = Wallet.account_id == account_id
    if amount_micro_usd < 0:
        guard = guard & (Wallet.balance_micro_usd - Wallet.held_micro_usd >= -amount_micro_usd)
    wallet_id = session.scalar(
        update(Wallet)
        .where(guard)
        .values(balance_micro_usd=Wallet.balance_micro_usd + amount_micro_usd, updated_at=utcnow())
        .returning(Wallet.id)
    )
    if wallet_id is None:
        raise LedgerError(
            f"account {account_id} has no wallet, or its available balance "
            f"cannot cover {amount_micro_usd} micro-USD"
        )
    session.execute(
        insert(LedgerEntry).values(
            wallet_id=wallet_id,
            kind=kind,
            amount_micro_usd=amount_micro_usd,
            held_delta_micro_usd=0,
            idempotency_key=key,
            note=note,
            job_id=job_id,
            created_at=utcnow(),
        )
    )
    return True


def top_up(
    session: Session,
    account_id: str,
    amount_micro_usd: int,
    *,
    idempotency_key: str | None = None,
    note: str = "",
) -> bool:
    """Credit a wallet with a top-up. Returns False when the key was already applied."""
    return credit(
        session,
        account_id,
        amount_micro_usd,
        kind="topup",
        idempotency_key=idempotency_key,
        note=note,
    )


def refund_job(
    session: Session, job_id: str, amount_micro_usd: int | None = None, note: str = ""
) -> int:
    """Refund part or all of a settled job's charge; returns the amount refunded.

    The refunds of a job never add up to more than its charge.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.settled_at is None:
        raise LedgerError(f"job {job_id} not found or not settled yet")
    refunded = (
        session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_micro_usd), 0)).where(
                LedgerEntry.job_id == job_id, LedgerEntry.kind == "refund"
            )
        )
        or 0
    )
    refundable = (job.cost_micro_usd or 0) - refunded
    amount = refundable if amount_micro_usd is None else amount_micro_usd
    if amount <= 0 or amount > refundable:
        raise LedgerError(
            f"job {job_id} has {refundable} micro-USD left to refund; "
            f"{amount} micro-USD cannot be refunded"
        )
    number = (
        session.scalar(
            select(func.count()).where(LedgerEntry.job_id == job_id, LedgerEntry.kind == "refund")
        )
        or 0
    )
    credit(
        session,
        job.account_id,
        amount,
        kind="refund",
        job_id=job_id,
        note=note,
        idempotency_key=f"refund:{job_id}:{number + 1}",
    )
    return amount


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
            Job.cached_prompt_tokens,
            Job.cached_input_price_micro_usd,
        )
    ).one_or_none()
    if row is None:
        return None

    # Usage the provider reported is charged whatever the status: a stream the client
    # left early is billed for the tokens the provider counted before it stopped.
    cost = 0
    if row.prompt_tokens or row.completion_tokens:
        cost = job_cost_micro_usd(
            row.prompt_tokens,
            row.completion_tokens,
            row.input_price_micro_usd,
            row.output_price_micro_usd,
            row.cached_prompt_tokens,
            row.cached_input_price_micro_usd,
        )
    # The hold is the most the client agreed to pay, so the charge never exceeds it and
    # the balance cannot go below zero. Tokens counted beyond the bound are the broker's
    # loss, logged for the operator.
    if cost > row.hold_micro_usd:
        logger.warning(
            "job %s cost %d micro-USD, above its hold of %d; charging the hold",
            job_id,
            cost,
            row.hold_micro_usd,
        )
        cost = row.hold_micro_usd
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


def check_all_wallets(session: Session) -> list[WalletCheck]:
    """Check every wallet against its ledger, in id order."""
    return [
        check_wallet(session, wallet_id)
        for wallet_id in session.scalars(select(Wallet.id).order_by(Wallet.id))
    ]
