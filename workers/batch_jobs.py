"""The jobs of a batch: created with their holds, published a window at a time, stopped.

Each input line becomes one job. A chunk of lines is one transaction that holds each
job's worst-case cost on the wallet, with the same conditional update as the API
(``broker.jobstore.create_job``), so a wallet that runs dry mid-batch fails the
remaining lines with ``insufficient_quota`` instead of going below zero.

Jobs start unpublished (``dispatched_at`` null). At most ``batch_max_in_flight`` of a
batch are published at once; each settlement publishes the next one, and the periodic
pass tops the window up if a publication was missed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from broker.batches import BatchLine, prepare_line, start_finalizing
from broker.catalog import Catalog, queue_name
from broker.errors import BrokerError, Conflict, InsufficientFunds
from broker.ids import new_id
from broker.intake import Intake, Principal
from broker.jobstore import format_usd
from broker.tables import ApiKey, Batch, Job, LedgerEntry, Wallet, as_utc, utcnow
from workers.app import celery_app, encode_job_messages
from workers.context import WorkerContext
from workers.markers import queued_key

logger = logging.getLogger(__name__)

ACTIVE_STATUSES = ("queued", "running")
# Seconds the queued marker outlives a job's deadline.
MARKER_MARGIN_S = 300


def cancelled_error() -> dict[str, Any]:
    return Conflict(
        "This request was cancelled before it ran.", code="batch_cancelled"
    ).to_job_error()


def expired_error() -> dict[str, Any]:
    return Conflict(
        "This request could not be executed before the completion window expired.",
        code="batch_expired",
    ).to_job_error()


def request_checker(catalog: Catalog) -> Intake:
    """Return an Intake used only for its request checks, which need just the catalog."""
    return Intake(catalog, None, None, None, None, 0.0, 0.0)  # type: ignore[arg-type]


def load_principal(session: Session, batch: Batch, price_ppm: int) -> Principal:
    """Return who pays for the batch's jobs: its account, wallet and key limits.

    ``price_ppm`` is the batch price multiplier (``broker.batches.batch_price_ppm``).
    """
    wallet_id = session.scalar(select(Wallet.id).where(Wallet.account_id == batch.account_id))
    key = session.get(ApiKey, batch.api_key_id) if batch.api_key_id else None
    return Principal(
        account_id=batch.account_id,
        api_key_id=key.id if key else "",
        wallet_id=wallet_id,
        monthly_limit_micro_usd=key.monthly_limit_micro_usd if key else None,
        allowed_models=tuple(key.allowed_models) if key and key.allowed_models else None,
        region_pin=key.region_pin if key else None,
        price_multiplier_ppm=price_ppm,
    )


def _month_spent(session: Session, key_id: str, now: Any) -> int:
    """Return what the key spent or holds this month, locking its row first (the rule of
    ``broker.jobstore``: unsettled jobs count at their hold, settled ones at their cost)."""
    session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(
        session.scalar(
            select(
                func.coalesce(func.sum(func.coalesce(Job.cost_micro_usd, Job.hold_micro_usd)), 0)
            ).where(Job.api_key_id == key_id, Job.created_at >= month_start)
        )
        or 0
    )


@dataclass
class ChunkResult:
    queued: int = 0
    failed: int = 0
    finalizing: bool = False


def _job_row(batch: Batch, principal: Principal, line: BatchLine, now: Any) -> dict[str, Any]:
    """Return the columns every job row of a batch has, as a line that did not run."""
    return {
        "id": new_id("job"),
        "account_id": batch.account_id,
        "api_key_id": principal.api_key_id or None,
        "endpoint": batch.endpoint,
        "model": str(line.body.get("model"))[:100],
        "provider": "",
        "region": "",
        "lane": "batch",
        "status": "failed",
        "request": line.body,
        "response": None,
        "error": None,
        "reply_to": None,
        "route": [],
        "dispatch": None,
        "dispatched_at": None,
        "dispatch_count": 0,
        "deadline_at": as_utc(batch.expires_at),
        "batch_id": batch.id,
        "custom_id": line.custom_id,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "input_price_micro_usd": 0,
        "output_price_micro_usd": 0,
        "cached_input_price_micro_usd": None,
        "hold_micro_usd": 0,
        "cost_micro_usd": 0,
        "created_at": now,
        "finished_at": now,
        "settled_at": now,
    }


def create_chunk(
    ctx: WorkerContext,
    batch: Batch,
    principal: Principal,
    checker: Intake,
    lines: list[BatchLine],
) -> ChunkResult:
    """Create the jobs of ``lines`` with their holds, in one transaction.

    Lines that cannot run (the wallet or the key's monthly limit cannot cover them, the
    batch is being cancelled, or its completion window has passed) become finished,
    settled jobs with an error and no hold, counted as failed at once.
    """
    result = ChunkResult()
    now = utcnow()
    deadline = as_utc(batch.expires_at)
    rows: list[dict[str, Any]] = []
    holds: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], Any, int]] = []
    with ctx.sessions.begin() as session:
        status = session.scalar(select(Batch.status).where(Batch.id == batch.id))
        expired = now >= deadline
        stopping = status != "in_progress" or expired
        limit = principal.monthly_limit_micro_usd
        spent = (
            _month_spent(session, principal.api_key_id, now)
            if (limit is not None and not stopping)
            else None
        )
        for line in lines:
            row = _job_row(batch, principal, line, now)
            rows.append(row)
            if expired:
                row.update(status="expired", error=expired_error())
                continue
            if stopping:
                row.update(status="cancelled", error=cancelled_error())
                continue
            try:
                submission = prepare_line(checker, principal, batch.endpoint, line.body)
            except BrokerError as exc:
                row["error"] = exc.to_job_error()
                continue
            target, hold = submission.plan[0], submission.hold
            row.update(
                model=target.model.id,
                provider=target.model.provider,
                region=target.region,
                request=submission.body,
            )
            pending.append((row, submission, hold))
        # The wallet's row stays locked from its first update to the commit, and the API's
        # holds on the same wallet wait for it. So the lines are checked first and the
        # wallet is updated after them: once for the chunk when no key limit applies and
        # the balance covers it, otherwise line by line.
        if pending:
            # Settlements lock the batch's row before the wallet's (workers.billing), so
            # this takes them in that order too, which keeps the two from deadlocking.
            session.execute(
                select(Batch.id).where(Batch.id == batch.id).with_for_update(key_share=True)
            )
        held_all = (
            spent is None
            and bool(pending)
            and _hold(session, principal.wallet_id, sum(hold for _, _, hold in pending), now)
        )
        for row, submission, hold in pending:
            target = submission.plan[0]
            if spent is not None and limit is not None and spent + hold > limit:
                row["error"] = InsufficientFunds(
                    f"The API key's monthly spending limit ({format_usd(limit)}) cannot "
                    f"cover this request's worst-case cost ({format_usd(hold)}).",
                    code="key_limit_exceeded",
                ).to_job_error()
                continue
            if not (held_all or _hold(session, principal.wallet_id, hold, now)):
                row["error"] = InsufficientFunds(
                    "The wallet's available balance cannot cover this request's worst-case "
                    f"cost ({format_usd(hold)}). Top up the wallet and resubmit it."
                ).to_job_error()
                continue
            if spent is not None:
                spent += hold
            route = [t.to_spec() for t in submission.plan]
            row.update(
                status="queued",
                route=route,
                dispatch={
                    "job_id": row["id"],
                    "batch_id": batch.id,
                    "endpoint": batch.endpoint,
                    "body": submission.body,
                    "reply_to": None,
                    "deadline": deadline.timestamp(),
                    "route_index": 0,
                    "attempt_offset": 0,
                    "route": route,
                    **target.to_spec(),
                },
                input_price_micro_usd=target.input_price,
                output_price_micro_usd=target.output_price,
                cached_input_price_micro_usd=target.cached_input_price,
                hold_micro_usd=hold,
                cost_micro_usd=None,
                finished_at=None,
                settled_at=None,
            )
            holds.append(
                {
                    "wallet_id": principal.wallet_id,
                    "kind": "hold",
                    "amount_micro_usd": 0,
                    "held_delta_micro_usd": hold,
                    "idempotency_key": f"hold:{row['id']}",
                    "job_id": row["id"],
                    "note": f"batch {batch.id}",
                    "created_at": now,
                }
            )
        if holds:
            session.execute(insert(LedgerEntry), holds)
        session.execute(insert(Job), rows)
        result.queued = len(holds)
        result.failed = len(rows) - len(holds)
        if result.failed:
            session.execute(
                update(Batch)
                .where(Batch.id == batch.id)
                .values(failed=Batch.failed + result.failed)
            )
            result.finalizing = start_finalizing(session, batch.id)
    return result


def _hold(session: Session, wallet_id: str, amount: int, now: Any) -> bool:
    """Add ``amount`` to the wallet's held amount if its available balance covers it."""
    return (
        session.execute(
            update(Wallet)
            .where(
                Wallet.id == wallet_id,
                Wallet.balance_micro_usd - Wallet.held_micro_usd >= amount,
            )
            .values(held_micro_usd=Wallet.held_micro_usd + amount, updated_at=now)
        ).rowcount
        == 1
    )


def in_flight(session: Session, batch_id: str) -> int:
    """Return how many of the batch's jobs are published and not finished."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.batch_id == batch_id,
                Job.status.in_(ACTIVE_STATUSES),
                Job.dispatched_at.is_not(None),
            )
        )
        or 0
    )


def publish_next(ctx: WorkerContext, batch_id: str, count: int) -> int:
    """Publish up to ``count`` unpublished jobs of an in-progress batch; returns how many."""
    if count <= 0:
        return 0
    now = utcnow()
    with ctx.sessions.begin() as session:
        status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
        if status != "in_progress":
            return 0
        rows = session.execute(
            select(Job.id, Job.dispatch)
            .where(Job.batch_id == batch_id, Job.status == "queued", Job.dispatched_at.is_(None))
            .limit(count)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return 0
        session.execute(
            update(Job)
            .where(Job.id.in_([row.id for row in rows]), Job.dispatched_at.is_(None))
            .values(dispatched_at=now, dispatch_count=1)
        )
    # The markers and the task messages go to Redis in one round trip; jobs of the same
    # queue share messages.
    pipe = ctx.redis.pipeline(transaction=False)
    for row in rows:
        ttl = int(max(60.0, row.dispatch["deadline"] - time.time()) + MARKER_MARGIN_S)
        pipe.set(queued_key(row.id), b"1", ex=ttl)
    jobs = [
        (queue_name(spec["provider"], spec["region"], spec["lane"]), spec)
        for spec in (row.dispatch for row in rows)
    ]
    for message in encode_job_messages(celery_app, jobs):
        pipe.lpush(message.key, message.payload)
    pipe.execute()
    return len(rows)


def top_up(ctx: WorkerContext, batch_id: str) -> int:
    """Publish jobs until the batch has its full window in flight; returns how many."""
    with ctx.sessions() as session:
        running = in_flight(session, batch_id)
    return publish_next(ctx, batch_id, ctx.settings.batch_max_in_flight - running)
