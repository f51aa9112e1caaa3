"""Wallet movements: top-ups, settlement of finished jobs, and the ledger check.

Every change to a wallet's balance or held amount is made in the same transaction as
the ledger entry that explains it, and each entry has a unique idempotency key, so a
repeated settle or a replayed top-up changes nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.orm import Session

from broker.db import execute_unprepared, json_rows
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
    # Whether events follow the charge: batch progress, or a webhook of an asynchronous
    # job (one that no request waits for).
    has_events: bool = False


_jobs = Job.__table__
_wallets = Wallet.__table__
_ledger = LedgerEntry.__table__
# Core statements: the ORM's bulk paths would evaluate every criterion against the
# session's objects, which a settlement never loads.
_SET_COST = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("settled_id"))
    .values(cost_micro_usd=bindparam("settled_cost"))
)

# The costs and ledger entries of a settlement in one statement (PostgreSQL), in place
# of one UPDATE per job and an INSERT.
_COSTS_AND_ENTRIES = """
WITH costs AS (
    UPDATE jobs SET cost_micro_usd = c.cost
    FROM jsonb_to_recordset(%(costs)s::jsonb) AS c(id text, cost bigint)
    WHERE jobs.id = c.id
)
INSERT INTO ledger_entries (wallet_id, kind, amount_micro_usd, held_delta_micro_usd,
    idempotency_key, job_id, note, created_at)
SELECT e.wallet_id, e.kind, e.amount_micro_usd, e.held_delta_micro_usd,
    e.idempotency_key, e.job_id, e.note, e.created_at
FROM jsonb_to_recordset(%(entries)s::jsonb) AS e(wallet_id text, kind text,
    amount_micro_usd bigint, held_delta_micro_usd bigint, idempotency_key text,
    job_id text, note text, created_at timestamptz)
"""


def settle_job(session: Session, job_id: str) -> Settlement | None:
    """Charge a finished job and release its hold, once; see ``settle_jobs``."""
    settled = settle_jobs(session, [job_id])
    return settled[0] if settled else None


def settle_jobs(
    session: Session,
    job_ids: list[str],
    before_wallets: Callable[[list[Settlement]], None] | None = None,
) -> list[Settlement]:
    """Charge finished jobs and release their holds, each once.

    Returns a settlement for each job settled now; jobs not finished yet or already
    settled are left out. The guarded update of the job rows is the first statement, so
    of two concurrent settlements of the same job the second waits for the first's row
    lock and then matches nothing. Each wallet is updated once, by the sum of its jobs,
    in the order of account ids, so that concurrent settlements lock wallets in one order.

    The wallet updates are the last statements, after ``before_wallets`` (the caller's
    work in the same transaction), so that a wallet stays locked only until the commit
    that should follow: the same account's holds for new requests wait for that lock.
    """
    now = utcnow()
    rows = session.execute(
        update(_jobs)
        .where(
            _jobs.c.id.in_(sorted(set(job_ids))),
            _jobs.c.settled_at.is_(None),
            _jobs.c.status.in_(FINAL_STATUSES),
        )
        .values(settled_at=now)
        .returning(
            _jobs.c.id,
            _jobs.c.account_id,
            _jobs.c.prompt_tokens,
            _jobs.c.completion_tokens,
            _jobs.c.input_price_micro_usd,
            _jobs.c.output_price_micro_usd,
            _jobs.c.hold_micro_usd,
            _jobs.c.cached_prompt_tokens,
            _jobs.c.cached_input_price_micro_usd,
            _jobs.c.batch_id,
            _jobs.c.reply_to,
        )
    ).all()
    if not rows:
        return []

    settlements = [
        Settlement(
            job_id=row.id,
            cost_micro_usd=_capped_cost(row),
            released_micro_usd=row.hold_micro_usd,
            has_events=row.batch_id is not None or row.reply_to is None,
        )
        for row in rows
    ]
    costs = [{"id": s.job_id, "cost": s.cost_micro_usd} for s in settlements]
    totals: dict[str, list[int]] = {}
    for row, settlement in zip(rows, settlements, strict=True):
        total = totals.setdefault(row.account_id, [0, 0])
        total[0] += settlement.cost_micro_usd
        total[1] += settlement.released_micro_usd
    # Read without a lock: the ledger entries need the wallet ids before the update.
    wallet_of = dict(
        session.execute(
            select(_wallets.c.account_id, _wallets.c.id).where(
                _wallets.c.account_id.in_(sorted(totals))
            )
        ).all()
    )

    entries = []
    for row, settlement in zip(rows, settlements, strict=True):
        entry = dict(wallet_id=wallet_of[row.account_id], job_id=row.id, note="", created_at=now)
        entries.append(
            dict(
                entry,
                kind="release",
                amount_micro_usd=0,
                held_delta_micro_usd=-settlement.released_micro_usd,
                idempotency_key=f"release:{row.id}",
            )
        )
        if settlement.cost_micro_usd:
            entries.append(
                dict(
                    entry,
                    kind="charge",
                    amount_micro_usd=-settlement.cost_micro_usd,
                    held_delta_micro_usd=0,
                    idempotency_key=f"charge:{row.id}",
                )
            )
    _write_costs_and_entries(session, costs, entries)
    if before_wallets is not None:
        before_wallets(settlements)
    for account_id in sorted(totals):
        cost, released = totals[account_id]
        session.execute(
            update(_wallets)
            .where(_wallets.c.account_id == account_id)
            .values(
                balance_micro_usd=_wallets.c.balance_micro_usd - cost,
                held_micro_usd=_wallets.c.held_micro_usd - released,
                updated_at=now,
            )
        )
    return settlements


def _write_costs_and_entries(
    session: Session, costs: list[dict[str, Any]], entries: list[dict[str, Any]]
) -> None:
    """Set the settled jobs' costs and insert the ledger entries: on PostgreSQL in one
    statement, elsewhere in one UPDATE per job and one INSERT."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        execute_unprepared(
            connection,
            _COSTS_AND_ENTRIES,
            {"costs": json_rows(costs), "entries": json_rows(entries)},
        )
        return
    connection.execute(
        _SET_COST, [{"settled_id": c["id"], "settled_cost": c["cost"]} for c in costs]
    )
    connection.execute(insert(_ledger), entries)


def _capped_cost(row: Any) -> int:
    """Return a finished job's charge: its reported usage, at most its hold.

    Usage the provider reported is charged whatever the status: a stream the client
    left early is billed for the tokens the provider counted before it stopped. The
    hold is the most the client agreed to pay, so the charge never exceeds it and the
    balance cannot go below zero. Tokens counted beyond the bound are the broker's loss,
    logged for the operator.
    """
    if not (row.prompt_tokens or row.completion_tokens):
        return 0
    cost = job_cost_micro_usd(
        row.prompt_tokens,
        row.completion_tokens,
        row.input_price_micro_usd,
        row.output_price_micro_usd,
        row.cached_prompt_tokens,
        row.cached_input_price_micro_usd,
    )
    if cost > row.hold_micro_usd:
        logger.warning(
            "job %s cost %d micro-USD, above its hold of %d; charging the hold",
            row.id,
            cost,
            row.hold_micro_usd,
        )
        return row.hold_micro_usd
    return cost


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
