"""The periodic pass of the billing worker for asynchronous work.

Every ``async_pass_interval_s``, the one process that takes the Redis lock:

- publishes the webhook deliveries whose next attempt is due;
- tops up the published window of in-progress batches (a missed publication);
- stops the jobs of batches whose completion window passed, and publishes the
  finalize task again for batches left in finalizing;
- once a minute, deletes settled jobs older than ``job_retention_days``.

TODO: files, webhook deliveries and their attempts have no retention yet.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import delete, func, select

from broker.batches import PROCESS_BATCH_TASK, STOP_BATCH_TASK, send_batch_task
from broker.tables import Attempt, Batch, Job, as_utc, utcnow
from workers.app import celery_app
from workers.batch_jobs import top_up
from workers.batches import processing_key
from workers.context import WorkerContext, get_context
from workers.job_events import send_finalize
from workers.webhooks import publish_due_deliveries

logger = logging.getLogger(__name__)

LOCK_KEY = "broker:async-pass:lock"
# Seconds between retention purges, and jobs deleted per statement.
PURGE_INTERVAL_S = 60.0
PURGE_CHUNK = 1000
# Seconds before a batch task for the same batch and reason is published again.
REPEAT_TASK_AFTER_S = 300
# Batches examined per pass and kind.
BATCH_SCAN = 100


def _once(ctx: WorkerContext, name: str, batch_id: str) -> bool:
    """Return True at most once per ``REPEAT_TASK_AFTER_S`` for a batch and an action."""
    key = f"broker:batch:{batch_id}:{name}"
    return bool(ctx.redis.set(key, b"1", nx=True, ex=REPEAT_TASK_AFTER_S))


def _unfinished_creation(ctx: WorkerContext, batch_id: str) -> bool:
    """Return whether no task creates the batch's jobs although some lines have none.

    The count runs at most once per ``REPEAT_TASK_AFTER_S`` and batch.
    """
    if ctx.redis.exists(processing_key(batch_id)) or not _once(ctx, "count", batch_id):
        return False
    with ctx.sessions() as session:
        total = session.scalar(select(Batch.total).where(Batch.id == batch_id)) or 0
        created = session.scalar(
            select(func.count()).select_from(Job).where(Job.batch_id == batch_id)
        )
    return (created or 0) < total


def repair_batches(ctx: WorkerContext) -> None:
    """Keep batches moving when a task or a publication was lost."""
    now = utcnow()
    with ctx.sessions() as session:
        running = session.execute(
            select(Batch.id, Batch.expires_at)
            .where(Batch.status == "in_progress")
            .order_by(Batch.id)
            .limit(BATCH_SCAN)
        ).all()
        stuck = session.scalars(
            select(Batch.id)
            .where(
                Batch.status == "finalizing",
                Batch.finalizing_at < now - timedelta(seconds=REPEAT_TASK_AFTER_S),
            )
            .limit(BATCH_SCAN)
        ).all()
    for batch_id, expires_at in running:
        if _unfinished_creation(ctx, batch_id):
            # The process task died or failed; it resumes after the lines with jobs.
            logger.warning("batch %s has lines without jobs; publishing process again", batch_id)
            send_batch_task(celery_app, PROCESS_BATCH_TASK, batch_id)
        if as_utc(expires_at) <= now:
            if _once(ctx, "expire", batch_id):
                send_batch_task(celery_app, STOP_BATCH_TASK, batch_id, "expired")
            continue
        published = top_up(ctx, batch_id)
        if published:
            logger.info("batch %s: published %d more jobs", batch_id, published)
    for batch_id in stuck:
        if _once(ctx, "finalize", batch_id):
            logger.warning("batch %s stayed in finalizing; publishing finalize again", batch_id)
            send_finalize(batch_id)


def purge_old_jobs(ctx: WorkerContext) -> int:
    """Delete settled jobs, and their attempts, older than the retention period."""
    cutoff = utcnow() - timedelta(days=ctx.settings.job_retention_days)
    deleted = 0
    while True:
        with ctx.sessions.begin() as session:
            job_ids = session.scalars(
                select(Job.id)
                .where(Job.created_at < cutoff, Job.settled_at.is_not(None))
                .limit(PURGE_CHUNK)
            ).all()
            if not job_ids:
                return deleted
            session.execute(delete(Attempt).where(Attempt.job_id.in_(job_ids)))
            session.execute(delete(Job).where(Job.id.in_(job_ids)))
        deleted += len(job_ids)
        logger.info(
            "deleted %d jobs older than %d days", len(job_ids), ctx.settings.job_retention_days
        )


def run_pass(ctx: WorkerContext, purge: bool) -> None:
    """Run one pass; see the module docstring."""
    publish_due_deliveries(ctx)
    repair_batches(ctx)
    if purge:
        purge_old_jobs(ctx)


def start_async_pass(interval_s: float) -> threading.Event:
    """Run the pass every ``interval_s`` seconds in this process while it holds the lock."""
    stop = threading.Event()

    def loop() -> None:
        next_purge = time.monotonic()
        while not stop.wait(interval_s):
            ctx = get_context()
            try:
                if not ctx.redis.set(LOCK_KEY, b"1", nx=True, ex=max(1, int(interval_s))):
                    continue
                purge = time.monotonic() >= next_purge
                if purge:
                    next_purge = time.monotonic() + PURGE_INTERVAL_S
                run_pass(ctx, purge)
            except Exception:
                logger.exception("the asynchronous work pass failed; the next one tries again")

    threading.Thread(target=loop, name="async-pass", daemon=True).start()
    return stop
