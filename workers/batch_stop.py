"""Stopping a batch's jobs on cancel or expiry, and releasing their holds.

Unpublished jobs are stopped in the database at once. A published job that no worker
has taken yet gets its done marker first, so its queued message does nothing, and is
then stopped. A job a worker is running keeps running: on cancel it gets the cancel
key, and ``workers.dispatch.finish`` records it as cancelled, charged for its usage.
Stopped jobs are settled here, with the same ``settle_job`` and batch counting as the
billing worker.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update

from broker.ledger import FINAL_STATUSES, settle_job
from broker.replies import CANCEL_TTL_S
from broker.tables import Batch, Job, utcnow
from workers.batch_jobs import ACTIVE_STATUSES
from workers.context import WorkerContext
from workers.job_events import AfterSettle, on_job_settled
from workers.markers import DONE_TTL_S, done_key, lease_key
from workers.streaming import cancel_key

logger = logging.getLogger(__name__)

# Jobs settled per transaction.
SETTLE_CHUNK = 250


def _stop_published(ctx: WorkerContext, batch_id: str, status: str, error: dict[str, Any]) -> int:
    """Stop the published jobs no worker holds; ask running ones to cancel."""
    with ctx.sessions() as session:
        published = session.scalars(
            select(Job.id).where(
                Job.batch_id == batch_id,
                Job.status.in_(ACTIVE_STATUSES),
                Job.dispatched_at.is_not(None),
            )
        ).all()
    stopped = 0
    for job_id in published:
        if ctx.redis.exists(lease_key(job_id)):
            if status == "cancelled":
                ctx.redis.set(cancel_key(job_id), b"1", ex=CANCEL_TTL_S)
            continue
        # NOTE: a worker that took the message just before the marker was set still
        # calls the provider. Its outcome then finds the job final and is dropped.
        ctx.redis.set(done_key(job_id), b"1", ex=DONE_TTL_S)
        with ctx.sessions.begin() as session:
            stopped += session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
                .values(status=status, error=error, finished_at=utcnow())
            ).rowcount
    return stopped


def settle_stopped(ctx: WorkerContext, batch_id: str) -> AfterSettle:
    """Settle every finished, unsettled job of the batch; returns the last follow-ups.

    The chunk's job rows are locked first, skipping rows the billing worker is settling,
    then the batch's row, then the wallet's: the order of the billing worker's
    settlements (``ledger.settle_jobs``), so the two cannot deadlock.
    """
    merged = AfterSettle()
    while True:
        with ctx.sessions.begin() as session:
            job_ids = session.scalars(
                select(Job.id)
                .where(
                    Job.batch_id == batch_id,
                    Job.status.in_(FINAL_STATUSES),
                    Job.settled_at.is_(None),
                )
                .limit(SETTLE_CHUNK)
                .with_for_update(skip_locked=True)
            ).all()
            if job_ids:
                session.execute(
                    select(Batch.id).where(Batch.id == batch_id).with_for_update(key_share=True)
                )
            for job_id in job_ids:
                if settle_job(session, job_id) is None:
                    continue
                after = on_job_settled(session, job_id, ctx.settings)
                merged.finalize_batch = merged.finalize_batch or after.finalize_batch
        if len(job_ids) < SETTLE_CHUNK:
            return merged


def stop_jobs(ctx: WorkerContext, batch_id: str, status: str, error: dict[str, Any]) -> int:
    """Stop the batch's jobs that have not run (``status``: cancelled or expired), release
    their holds, and finalize the batch if that was its last outcome."""
    now = utcnow()
    with ctx.sessions.begin() as session:
        unpublished = session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == "queued", Job.dispatched_at.is_(None))
            .values(status=status, error=error, finished_at=now)
        ).rowcount
    stopped = unpublished + _stop_published(ctx, batch_id, status, error)
    after = settle_stopped(ctx, batch_id)
    # Stopping never publishes more jobs; only a finalize may follow.
    AfterSettle(finalize_batch=after.finalize_batch).send(ctx)
    logger.info("batch %s: %d jobs %s before they ran", batch_id, stopped, status)
    return stopped
