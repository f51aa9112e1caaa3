"""Group commit of job creation: concurrent requests of one API process share a transaction.

A request hands its job to ``JobGroupCommit.create_job`` and waits. One flusher task
writes every pending job (at most ``max_group_size``) in one transaction and then
resolves each request's future. Jobs that arrive during a flush wait for the next one.
So a lone request never waits on a timer, and under load one commit serves many
requests.

A group keeps the guarantees of ``broker.jobstore.create_job``, which writes one job:

- each wallet gets one guarded UPDATE for the sum of its jobs' holds, in wallet id
  order, so concurrent transactions lock wallets in the same order. If the wallet
  cannot cover the sum, its jobs are held one at a time in arrival order. Exactly the
  jobs the balance covers are created, and the rest get the InsufficientFunds error
  of the single-job path.
- every held job gets its ``hold`` ledger entry in the same transaction, so a wallet's
  held amount stays equal to the sum of its ledger entries.
- a database error in a group (a duplicate Idempotency-Key, a deadlock, a lost
  connection) rolls the whole group back, and each of its jobs is then created alone
  through ``create_job``. That path raises DuplicateIdempotencyKey for the duplicate.

Jobs of a key with a monthly spending limit always take the single-job path, because
its check locks the key's row and sums the key's jobs of the month.

On PostgreSQL a group without Idempotency-Keys takes one statement per wallet instead
(``_hold_and_insert_sql``): the hold, its ledger entries and the job rows, in
autocommit, so one round trip per wallet with no BEGIN or COMMIT of its own. That was
about 0.7 ms against 1.7 ms for the transaction above, for a group of one job. The
statement runs on a connection of the writer's own (``StatementConnection``), outside
SQLAlchemy's pool. Only a wallet that cannot cover its jobs' sum goes on to the
transaction above, alone.

After the commit, the task messages of the group's jobs are published with one call
of ``publish`` (one round trip to Redis) instead of one per request. If that fails,
each request publishes its own job again or abandons it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from broker.db import StatementConnection, json_rows
from broker.errors import InsufficientFunds
from broker.jobstore import create_job, insufficient_funds, used_idempotency_keys
from broker.tables import Job, LedgerEntry, Wallet, utcnow

logger = logging.getLogger(__name__)

# Max jobs written in one transaction. Larger groups hold the wallet locks longer and
# make every job of the group wait for the slowest statement.
MAX_GROUP_SIZE = 256
# Seconds a group's publish may take before its requests publish their jobs alone. A
# publish that still lands after that leaves a second message, which the workers drop.
PUBLISH_TIMEOUT_S = 5.0

WALLETS = Wallet.__table__
LEDGER_ENTRIES = LedgerEntry.__table__
JOBS = Job.__table__

# Core statements: the ORM's update(Wallet) would also evaluate synchronize_session.
HOLD_ON_WALLET = (
    update(WALLETS)
    .where(
        WALLETS.c.id == bindparam("wallet_id"),
        WALLETS.c.balance_micro_usd - WALLETS.c.held_micro_usd >= bindparam("amount"),
    )
    .values(
        held_micro_usd=WALLETS.c.held_micro_usd + bindparam("amount"),
        updated_at=bindparam("moment"),
    )
)
AVAILABLE_BALANCE = select(WALLETS.c.balance_micro_usd - WALLETS.c.held_micro_usd).where(
    WALLETS.c.id == bindparam("wallet_id")
)
# Executed with a list of rows. Without RETURNING, SQLAlchemy 2.1 passes them to the
# driver's executemany, which psycopg 3 pipelines.
# NOTE: adding RETURNING to get SQLAlchemy's multi-row VALUES (insertmanyvalues) took
# about 3 times the client CPU on PostgreSQL, inserting 100 job rows per transaction
# (an estimate from one run on a shared two-core machine).
INSERT_LEDGER_ENTRIES = insert(LEDGER_ENTRIES)
INSERT_JOBS = insert(JOBS)

# Job attribute names as ``values`` uses them, mapped to column keys ("job_metadata"
# is the column "metadata").
JOB_COLUMN_KEYS = {attr.key: attr.columns[0].key for attr in Job.__mapper__.column_attrs}
# The same, mapped to the columns' names in the database.
JOB_COLUMN_NAMES = {attr.key: attr.columns[0].name for attr in Job.__mapper__.column_attrs}


# Results of a pending job's future.
PUBLISHED = "published"  # committed, and its message published with the group's
COMMITTED = "committed"  # committed, and its message still to be published
ALONE = "alone"  # to be created alone through ``create_job``


@dataclass(eq=False)
class PendingJob:
    """A job waiting for a flush, and the message to publish once it is committed. The
    future's result is one of PUBLISHED, COMMITTED and ALONE."""

    wallet_id: str
    hold: int
    values: dict[str, Any]
    message: Any
    future: asyncio.Future[str]


@dataclass
class GroupOutcome:
    """Decisions of one group transaction, applied to the futures after the commit."""

    held: list[PendingJob]
    rejected: dict[PendingJob, InsufficientFunds]
    # Jobs that repeat the Idempotency-Key of an earlier job in the same group.
    alone: list[PendingJob]


class JobGroupCommit:
    """Creates the jobs of concurrent requests in shared transactions; one per API process."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        publish: Callable[[list[Any]], Awaitable[None]] | None = None,
        max_group_size: int = MAX_GROUP_SIZE,
    ) -> None:
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be at least 1, got {max_group_size}")
        self.sessions = sessions
        self.publish = publish
        self.max_group_size = max_group_size
        self._pending: deque[PendingJob] = deque()
        self._flusher: asyncio.Task[None] | None = None
        # Publishes run beside the flusher, so a slow Redis does not hold up the next
        # group's transaction. The set keeps a reference to each running task.
        self._publishing: set[asyncio.Task[None]] = set()
        # Number of group transactions attempted, and of those rolled back.
        self.flushes = 0
        self.failed_flushes = 0
        # Batch validation builds an Intake without a database, for its checks alone.
        bind = sessions.kw.get("bind") if sessions is not None else None
        self._statements = (
            StatementConnection(bind.url)
            if bind is not None and bind.dialect.name == "postgresql"
            else None
        )

    async def close(self) -> None:
        """Close the writer's own PostgreSQL connection; a later flush opens it again."""
        if self._statements is not None:
            await self._statements.close()

    @property
    def pending(self) -> int:
        """Number of jobs waiting for a flush to start."""
        return len(self._pending)

    async def create_job(
        self,
        *,
        wallet_id: str,
        hold: int,
        values: dict[str, Any],
        monthly_limit: int | None = None,
        message: Any = None,
    ) -> bool:
        """Hold ``hold`` micro-USD on the wallet and insert the job, as
        ``broker.jobstore.create_job`` does; then publish ``message`` if one is given.

        Returns whether the message was published: False when the job was created
        alone or publishing failed, and the caller must publish it. Raises
        InsufficientFunds when the wallet (or the key's monthly limit) cannot cover the
        hold, and DuplicateIdempotencyKey when the account already has a job with the
        same key.
        """
        if monthly_limit is not None:
            await create_job(
                self.sessions,
                wallet_id=wallet_id,
                hold=hold,
                values=values,
                monthly_limit=monthly_limit,
            )
            return False
        loop = asyncio.get_running_loop()
        item = PendingJob(wallet_id, hold, values, message, loop.create_future())
        self._pending.append(item)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_pending())
        result = await item.future
        if result == ALONE:
            await create_job(self.sessions, wallet_id=wallet_id, hold=hold, values=values)
        return result == PUBLISHED

    async def _flush_pending(self) -> None:
        try:
            while self._pending:
                group: list[PendingJob] = []
                while self._pending and len(group) < self.max_group_size:
                    item = self._pending.popleft()
                    # A request cancelled while it waited no longer wants its job.
                    if not item.future.done():
                        group.append(item)
                if group:
                    await self._flush(group)
        finally:
            # Only reached with jobs pending when this task was cancelled (at shutdown):
            # their requests create them alone instead of waiting for a flush.
            while self._pending:
                _resolve(self._pending.popleft(), ALONE)

    async def _flush(self, group: list[PendingJob]) -> None:
        """Write a group, then resolve each request's future."""
        self.flushes += 1
        try:
            if self._single_statement() and not any(
                item.values.get("idempotency_key") for item in group
            ):
                outcome = await self._write_by_wallet(group, utcnow())
            else:
                outcome = await self._write_in_transaction(group, utcnow())
        except asyncio.CancelledError:
            # The commit may or may not have happened, so the requests get no result.
            for item in group:
                item.future.cancel()
            raise
        except Exception as exc:
            # The transaction was rolled back, so nothing of the group was written.
            self.failed_flushes += 1
            if isinstance(exc, SQLAlchemyError):
                cause = getattr(exc, "orig", None) or exc
                logger.info(
                    "group of %d jobs (first %s) rolled back, creating each alone: %s: %.200s",
                    len(group),
                    group[0].values.get("id"),
                    type(cause).__name__,
                    str(cause).partition("\n")[0],
                )
            else:
                logger.exception(
                    "group of %d jobs (first %s) failed, creating each alone",
                    len(group),
                    group[0].values.get("id"),
                )
            for item in group:
                _resolve(item, ALONE)
            return
        for item, error in outcome.rejected.items():
            if not item.future.done():
                item.future.set_exception(error)
        for item in outcome.alone:
            _resolve(item, ALONE)
        # The jobs of requests cancelled meanwhile are published too, because they are
        # committed.
        if outcome.held:
            task = asyncio.get_running_loop().create_task(self._publish_held(outcome.held))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    def _single_statement(self) -> bool:
        """Return whether groups may take ``_write_by_wallet``, which needs PostgreSQL."""
        return self._statements is not None

    async def _write_in_transaction(self, group: list[PendingJob], now: datetime) -> GroupOutcome:
        async with self.sessions.begin() as session:
            connection = await session.connection()
            return await _write_group(connection, group, now)

    async def _write_by_wallet(self, group: list[PendingJob], now: datetime) -> GroupOutcome:
        """Write each wallet's jobs with one statement, in wallet id order (PostgreSQL).

        Each statement commits on its own, so a wallet whose statement fails sends only
        its own jobs to be created alone. The wallets before it keep their jobs.
        """
        by_wallet: defaultdict[str, list[PendingJob]] = defaultdict(list)
        for item in group:
            by_wallet[item.wallet_id].append(item)
        outcome = GroupOutcome([], {}, [])
        statements = self._statements
        assert statements is not None
        for wallet_id in sorted(by_wallet):
            items = by_wallet[wallet_id]
            try:
                covered, available = await _hold_and_insert(statements, wallet_id, items, now)
                if not covered and len(items) > 1:
                    # The balance may cover some of the jobs when each is held alone.
                    part = await self._write_in_transaction(items, now)
                    outcome.held.extend(part.held)
                    outcome.rejected.update(part.rejected)
                    continue
            except (SQLAlchemyError, psycopg.Error) as exc:
                self.failed_flushes += 1
                cause = getattr(exc, "orig", None) or exc
                logger.info(
                    "writing %d jobs of wallet %s (first %s) failed, creating each alone: "
                    "%s: %.200s",
                    len(items),
                    wallet_id,
                    items[0].values.get("id"),
                    type(cause).__name__,
                    str(cause).partition("\n")[0],
                )
                outcome.alone.extend(items)
                continue
            if covered:
                outcome.held.extend(items)
            else:
                outcome.rejected[items[0]] = insufficient_funds(available or 0, items[0].hold)
        return outcome

    async def _publish_held(self, held: list[PendingJob]) -> None:
        messages = [item.message for item in held if item.message is not None]
        result = COMMITTED
        try:
            if self.publish is not None and messages:
                await asyncio.wait_for(self.publish(messages), PUBLISH_TIMEOUT_S)
                result = PUBLISHED
        except Exception as exc:  # noqa: BLE001  (each request publishes its own again)
            logger.warning(
                "publishing %d jobs (first %s) failed, each request retries alone: %s: %s",
                len(messages),
                held[0].values.get("id"),
                type(exc).__name__,
                exc,
            )
        finally:
            for item in held:
                _resolve(item, result if item.message is not None else COMMITTED)


def _resolve(item: PendingJob, result: str) -> None:
    # The future is already done when its request was cancelled during the flush.
    if not item.future.done():
        item.future.set_result(result)


async def _write_group(
    connection: AsyncConnection, group: list[PendingJob], now: datetime
) -> GroupOutcome:
    """Hold each wallet's jobs and insert their ledger entries and job rows."""
    seen_keys: set[tuple[str, str]] = set()
    alone: list[PendingJob] = []
    by_wallet: defaultdict[str, list[PendingJob]] = defaultdict(list)
    used = await used_idempotency_keys(
        connection,
        [
            (item.values["account_id"], item.values["idempotency_key"])
            for item in group
            if item.values.get("idempotency_key")
        ],
    )
    for item in group:
        key = item.values.get("idempotency_key")
        if key:
            account_key = (item.values["account_id"], key)
            # Both rows would violate the unique index and roll the group back, so the
            # repeat waits for this group's commit and then fails alone. A key already
            # used also fails alone, before any wallet is locked.
            if account_key in seen_keys or account_key in used:
                alone.append(item)
                continue
            seen_keys.add(account_key)
        by_wallet[item.wallet_id].append(item)

    held: list[PendingJob] = []
    rejected: dict[PendingJob, InsufficientFunds] = {}
    for wallet_id in sorted(by_wallet):
        items = by_wallet[wallet_id]
        total = sum(item.hold for item in items)
        if await _hold(connection, wallet_id, total, now):
            held.extend(items)
            continue
        # The wallet cannot cover the whole group. Holding the jobs one at a time
        # creates exactly those the balance covers (one job alone already failed).
        for item in items:
            if len(items) > 1 and await _hold(connection, wallet_id, item.hold, now):
                held.append(item)
            else:
                available = await connection.scalar(AVAILABLE_BALANCE, {"wallet_id": wallet_id})
                rejected[item] = insufficient_funds(available or 0, item.hold)

    if held:
        await connection.execute(INSERT_LEDGER_ENTRIES, [_hold_entry(item) for item in held])
        for rows in _job_rows(held):
            await connection.execute(INSERT_JOBS, rows)
    return GroupOutcome(held, rejected, alone)


async def _hold(connection: AsyncConnection, wallet_id: str, amount: int, now: datetime) -> bool:
    """Add ``amount`` to the wallet's held amount if its available balance covers it.

    The check and the hold are one statement, so concurrent transactions cannot
    together reserve more than the wallet has.
    """
    result = await connection.execute(
        HOLD_ON_WALLET, {"wallet_id": wallet_id, "amount": amount, "moment": now}
    )
    return result.rowcount == 1


def _hold_entry(item: PendingJob) -> dict[str, Any]:
    job_id = item.values["id"]
    return {
        "wallet_id": item.wallet_id,
        "kind": "hold",
        "amount_micro_usd": 0,
        "held_delta_micro_usd": item.hold,
        "idempotency_key": f"hold:{job_id}",
        "job_id": job_id,
        "note": "",
        "created_at": item.values["created_at"],
    }


def _job_rows(items: list[PendingJob]) -> list[list[dict[str, Any]]]:
    """Return the job rows keyed by column, one list per set of columns.

    Each multi-row INSERT needs the same columns in every row, and a column left out
    gets its default, which an explicit None would not.
    """
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in items:
        row = {JOB_COLUMN_KEYS[name]: value for name, value in item.values.items()}
        by_columns.setdefault(tuple(sorted(row)), []).append(row)
    return list(by_columns.values())


async def _hold_and_insert(
    statements: StatementConnection, wallet_id: str, items: list[PendingJob], now: datetime
) -> tuple[bool, int | None]:
    """Hold the sum of ``items`` on the wallet and insert their ledger entries and job
    rows, all or none, in one statement (PostgreSQL).

    Returns whether the wallet covered the sum, and its available balance before.
    """
    rows_by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in items:
        row = {JOB_COLUMN_NAMES[name]: value for name, value in item.values.items()}
        rows_by_columns.setdefault(tuple(sorted(row)), []).append(row)
    parameters: dict[str, Any] = {
        "wallet_id": wallet_id,
        "amount": sum(item.hold for item in items),
        "moment": now,
        "holds": json_rows(
            [
                {
                    "job_id": item.values["id"],
                    "held_delta_micro_usd": item.hold,
                    "created_at": item.values["created_at"],
                }
                for item in items
            ]
        ),
    }
    for index, rows in enumerate(rows_by_columns.values()):
        parameters[f"jobs_{index}"] = json_rows(rows)
    covered, available = await statements.fetchone(
        _hold_and_insert_sql(tuple(rows_by_columns)), parameters
    )
    return bool(covered), available


@functools.lru_cache(maxsize=64)
def _hold_and_insert_sql(column_sets: tuple[tuple[str, ...], ...]) -> str:
    """Return the statement of ``_hold_and_insert`` for job rows with these column sets.

    Data-modifying WITH clauses run exactly once, whether read or not, and all see the
    snapshot the statement started with, so the last SELECT reads the balance before
    the hold. Under READ COMMITTED, PostgreSQL rechecks the UPDATE's condition on the
    newest row version after waiting for a lock, so concurrent holds cannot overdraw it.
    """
    inserts = []
    for index, columns in enumerate(column_sets):
        names = ", ".join(f'"{column}"' for column in columns)
        picked = ", ".join(f'j."{column}"' for column in columns)
        inserts.append(
            f"jobs_{index} AS (INSERT INTO jobs ({names}) SELECT {picked} "
            f"FROM jsonb_populate_recordset(NULL::jobs, %(jobs_{index})s::jsonb) AS j "
            "WHERE EXISTS (SELECT FROM held))"
        )
    return (
        "WITH held AS ("
        "UPDATE wallets SET held_micro_usd = held_micro_usd + %(amount)s, "
        "updated_at = %(moment)s "
        "WHERE id = %(wallet_id)s AND balance_micro_usd - held_micro_usd >= %(amount)s "
        "RETURNING id), "
        "entries AS (INSERT INTO ledger_entries (wallet_id, kind, amount_micro_usd, "
        "held_delta_micro_usd, idempotency_key, job_id, note, created_at) "
        "SELECT held.id, 'hold', 0, h.held_delta_micro_usd, 'hold:' || h.job_id, h.job_id, "
        "'', h.created_at FROM held, jsonb_to_recordset(%(holds)s::jsonb) "
        "AS h(job_id text, held_delta_micro_usd bigint, created_at timestamptz)), "
        + ", ".join(inserts)
        + " SELECT EXISTS (SELECT FROM held), "
        "(SELECT balance_micro_usd - held_micro_usd FROM wallets WHERE id = %(wallet_id)s)"
    )
